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

from launch.configs import fedavg_digits


def get_config() -> ml_collections.ConfigDict:
  # Data, model, execution and the shared robustness / DP keys are fedavg_digits.py's, so
  # baselines see identical runs.
  config = fedavg_digits.get_config()
  config.algorithm = "fedhyper_g"
  config.rounds = 100
  config.client_lr = 0.05            # initial local rate eta_0
  config.server_lr = 1.0             # initial global rate
  # Server optimizer the rules chain onto: sgd | momentum | adam | yogi | adagrad.
  config.server_optimizer = "sgd"
  config.server_momentum = 0.9       # 'momentum' server optimizer and fedavgm
  # FedHyper-G/GM: A <- clip(A + h <m_{t-1}, Delta_t>, lo, hi); rate 1 + A.
  # 'paper': rate alpha_0 = server_lr, alpha += <Delta_t, Delta_{t-1}>; 'scaled': server_lr (1 + A).
  config.fedhyper_global_rate = "paper"
  config.fedhyper_base = "fedavg"    # G/GM on top of any registered method (fedprox, scaffold, ...)
  config.fedhyper_clip_lo = config_dict.placeholder(float)   # None: -0.8 (G), -0.2 (GM)
  config.fedhyper_clip_hi = config_dict.placeholder(float)   # None: 4.0
  config.fedhyper_hyper_lr = 1.0
  config.fedhyper_normalize = False  # True: cosine of the updates (scale-free) for G/GM/SL
  config.fedhyper_momentum = 0.9     # GM
  # FedHyper-SL: local rate clip(eta_0 (1 + A), sl_min_lr, sl_max_lr).
  config.sl_min_lr = 1e-3
  config.sl_max_lr = 0.1
  # FedHyper-CL: beta <- clip(min(max_growth, 1 + hypergradient) beta, min, max).
  config.cl_max_growth = 1.1
  config.cl_min_scale = 0.1
  config.cl_max_scale = 10.0
  config.cl_global_weight = config_dict.placeholder(float)   # None: 0.1 / clients_per_round
  # 'step': realised steps (code); 'direction': gradients (paper); 'cosine': scale-free.
  config.cl_hypergradient = "step"
  config.cl_hyper_lr = 1.0
  config.cl_reset = True             # False: each client keeps its beta across rounds
  # Baselines.
  config.decay_rate = 0.995          # fedavg_decay: rates times decay_rate ** t
  config.decay_global = True
  config.decay_local = True
  config.fedexp_eps = 1e-3
  config.eval_every = 10             # denser curves than fedavg_digits.py
  return config
