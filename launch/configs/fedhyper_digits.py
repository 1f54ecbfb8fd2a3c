"""FedHyper (hypergradient learning rates) on the embedded digits set.

Data and model are those of fedavg_digits.py (100 clients, Dirichlet(0.5) label skew,
10 per round, MLP), so any registered method runs on identical data:
    python -m launch.train --config=launch/configs/fedhyper_digits.py                  # G
    python -m launch.train --config=launch/configs/fedhyper_digits.py --config.algorithm=fedavg
    python -m launch.train --config=launch/configs/fedhyper_digits.py \
        --config.algorithm=fedhyper_g_cl --config.client_lr=0.005 --config.server_lr=0.1
--config.server_lr / --config.client_lr are the initial global / local rates.
Variants: fedhyper_g, fedhyper_gm, fedhyper_sl, fedhyper_cl, fedhyper_g_cl, fedhyper_full;
baselines: fedavg, fedavgm, fedadam, fedadagrad, fedexp, fedavg_decay.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.algorithm = "fedhyper_g"
  # Data (as fedavg_digits.py).
  config.data = "digits"
  config.partition = "dirichlet"
  config.alpha = 0.5                 # Dirichlet concentration (label skew)
  config.num_clients = 100
  config.test_fraction = 0.2
  # Model (as fedavg_digits.py).
  config.model = "mlp"
  config.hidden = (200,)
  # Rounds and local work.
  config.rounds = 100
  config.clients_per_round = 10
  config.local_epochs = 5
  config.local_steps = 0             # > 0 replaces epochs by a fixed step count
  config.batch_size = 10
  config.client_lr = 0.05            # initial local rate eta_0
  config.server_lr = 1.0             # initial global rate
  config.weighting = "num_examples"
  # Server optimizer the rules chain onto: sgd | momentum | adam | yogi | adagrad.
  config.server_optimizer = "sgd"
  config.server_momentum = 0.9       # 'momentum' server optimizer and fedavgm
  config.server_b1 = 0.9
  config.server_b2 = 0.99
  config.server_tau = 1e-3
  # FedHyper-G/GM: A <- clip(A + h <m_{t-1}, Delta_t>, lo, hi); rate 1 + A.
  config.fedhyper_base = "fedavg"    # G/GM on top of any registered method (fedprox, scaffold, ...)
  config.fedhyper_clip_lo = config_dict.placeholder(float)   # None: -0.8 (G), -0.2 (GM)
  config.fedhyper_clip_hi = config_dict.placeholder(float)   # None: 4.0
  config.fedhyper_hyper_lr = 1.0
  config.fedhyper_momentum = 0.9     # GM
  # FedHyper-SL: local rate clip(eta_0 (1 + A), sl_min_lr, sl_max_lr).
  config.sl_min_lr = 1e-3
  config.sl_max_lr = 0.1
  # FedHyper-CL: beta <- clip(min(max_growth, 1 + hypergradient) beta, min, max).
  config.cl_max_growth = 1.1
  config.cl_min_scale = 0.1
  config.cl_max_scale = 10.0
  config.cl_global_weight = config_dict.placeholder(float)   # None: 0.1 / clients_per_round
  config.cl_hypergradient = "step"   # 'step': realised steps (code); 'direction': gradients (paper)
  config.cl_reset = True             # False: each client keeps its beta across rounds
  # Baselines.
  config.decay_rate = 0.995          # fedavg_decay: rates times decay_rate ** t
  config.decay_global = True
  config.decay_local = True
  config.fedexp_eps = 1e-3
  config.prox_mu = 0.01              # fedprox (also as fedhyper_base)
  # Execution.
  config.backend = "vmap"
  config.rounds_per_call = 10
  config.seed = 0
  config.eval_every = 10
  config.checkpoint_every = 50
  return config
