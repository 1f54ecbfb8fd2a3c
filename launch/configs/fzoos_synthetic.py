"""FZooS on the heterogeneous synthetic quadratic of its paper (d = 300, 5 clients).

    python -m launch.zeroth_order --config=launch/configs/fzoos_synthetic.py
    python -m launch.zeroth_order --config=launch/configs/fzoos_synthetic.py --config.algorithm=fedzo
    python -m launch.zeroth_order --config=launch/configs/fzoos_synthetic.py --config.problem=levy

Defaults are those of the authors' code and README (div 0.5, T = 10, R = 50, Adam(0.01)).
``algorithm`` is any of fzoos, fedzo, fedzo_prox, fedzo_scaf, fedzo_diff: every method
sees the identical problem (same seed).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.algorithm = "fzoos"
  # Problem: quadratic | ackley | levy (| attack | metric, see their configs).
  config.problem = "quadratic"
  config.dim = 300
  config.num_clients = 5
  config.div = 0.5                   # heterogeneity of the clients' coefficients
  config.problem_seed = 0
  # Rounds and local work.
  config.rounds = 50
  config.clients_per_round = 5
  config.local_steps = 10            # T
  config.client_optimizer = "adam"
  config.client_lr = 0.01
  config.server_lr = 1.0
  config.safeguard = True            # keep x_r when F does not decrease (the code)
  config.project = False             # True: project local iterates onto [0, 1]^d
  config.refit_at = "global"         # FZooS's round-end fit around x_{r+1} | client
  # FedZO and its corrections: two-point estimator.
  config.num_directions = 20         # q
  config.smoothing = 0.01            # mu
  config.directions = "orthonormal"  # gaussian | sphere | orthonormal
  config.scale = "1"                 # '1' (FZooS's code) or 'd' (FedZO paper)
  config.prox_mu = 1.0               # fedzo_prox
  # FZooS: local GP surrogate and exploration.
  config.kernel = "matern52"         # se | matern52
  config.lengthscale = 0.0           # 0: marginal-likelihood choice from lengthscale_grid
  config.lengthscale_grid = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
  config.gp_noise = 1e-4
  config.gp_points = 150
  config.num_init = 10
  config.init_radius = 0.01
  config.num_explore = 5
  config.num_candidates = 100
  config.explore_radius = 0.01
  config.buffer_size = 1024
  # FZooS: shared random-Fourier-feature surrogate and the correction.
  config.rff_features = 10000
  config.rff_lengthscale = 1.0
  config.rff_kernel = "se"
  config.rff_noise = 1e-4
  config.rff_points = 500
  config.rff_explore = 50
  config.rff_candidates = 200
  config.rff_seed = 0
  config.gamma = "decay"             # 1/(tau+1) | constant
  config.correction = True
  # Execution.
  config.backend = "vmap"
  config.rounds_per_call = 1
  config.seed = 0
  config.checkpoint_every = 0
  return config
