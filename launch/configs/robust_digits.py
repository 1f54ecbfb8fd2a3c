"""Byzantine clients, robust aggregation and DP-FedAvg on the embedded digits set.

20 clients (Dirichlet(0.5) label skew), all in every round (RFFL assumes it), 20%
of them sending sign-flipped updates scaled by 10, aggregated by the coordinate-wise
median:
    python -m launch.train --config=launch/configs/robust_digits.py
    python -m launch.train --config=launch/configs/robust_digits.py --config.aggregator=krum
    python -m launch.train --config=launch/configs/robust_digits.py --config.aggregator=rffl \
        --config.rffl_clip=0.5
    python -m launch.train --config=launch/configs/robust_digits.py --config.attack=none \
        --config.malicious_fraction=0 --config.num_clients=100 --config.clients_per_round=10 \
        --config.aggregator=mean --config.dp.clip=0.5 --config.dp.noise_multiplier=1.0
"""
import ml_collections
from ml_collections import config_dict

from launch.configs import fedavg_digits


def get_config() -> ml_collections.ConfigDict:
  config = fedavg_digits.get_config()
  config.num_clients = 20
  config.clients_per_round = 20
  config.rounds = 50
  config.eval_every = 10
  config.checkpoint_every = 0
  # Byzantine clients (fedjax_lab.byzantine): none, sign_flip, scale, gaussian,
  # free_rider, free_rider_noise, label_flip, alie.
  config.attack = "sign_flip"
  config.attack_scale = 10.0          # sign_flip: -10 x delta
  config.malicious_fraction = 0.2
  config.attack_seed = 0
  config.num_classes = 10             # label_flip: y -> 9 - y
  # Aggregation: mean, median, trimmed_mean, krum, multi_krum, geometric_median,
  # norm_bounded, rffl.
  config.aggregator = "median"
  config.robust_weighted = True
  config.trim_fraction = 0.2
  config.krum_byzantine_fraction = 0.2
  config.multi_krum_selected = config_dict.placeholder(int)   # None: n - f
  config.geometric_median_iterations = 10
  config.norm_bound = 1.0
  config.rffl_alpha = 0.95
  config.rffl_beta = 1.0 / 3.0
  config.rffl_clip = config_dict.placeholder(float)           # Gamma; None: no clipping
  config.rffl_personalized = False
  # DP-FedAvg (fedjax_lab.privacy); off while dp.clip is None.
  config.dp = ml_collections.ConfigDict()
  config.dp.clip = config_dict.placeholder(float)
  config.dp.noise_multiplier = 0.0
  config.dp.delta = 1e-5
  config.dp.sampling = "poisson"     # poisson (each client joins w.p. q) | fixed (exactly C)
  config.dp.adaptive = False
  config.dp.target_quantile = 0.5
  config.dp.clip_lr = 0.2
  config.dp.count_noise = config_dict.placeholder(float)     # None: clients_per_round / 20
  return config
