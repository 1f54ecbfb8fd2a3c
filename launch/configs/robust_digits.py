"""Byzantine clients, robust aggregation and DP-FedAvg on the embedded digits set.

20 clients (Dirichlet(0.5) label skew), all in every round (RFFL assumes it), 20%
of them sending sign-flipped updates scaled by 10, aggregated by the (unweighted)
coordinate-wise median:
    python -m launch.train --config=launch/configs/robust_digits.py
    python -m launch.train --config=launch/configs/robust_digits.py --config.aggregator=krum
    python -m launch.train --config=launch/configs/robust_digits.py --config.aggregator=krum \
        --config.krum_byzantine=4
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
  # The shared robustness / DP keys (shared.py, through fedavg_digits.py) are all off
  # there; this config overrides what differs.
  config = fedavg_digits.get_config()
  config.num_clients = 20
  config.clients_per_round = 20
  config.rounds = 50
  config.eval_every = 10
  config.checkpoint_every = 0
  config.attack = "sign_flip"
  config.attack_scale = 10.0          # sign_flip: -10 x delta
  config.malicious_fraction = 0.2     # also Krum's f (floor(0.2 n)) unless krum_byzantine*
  config.attack_seed = 0              # the malicious set does not move with seed
  config.aggregator = "median"        # unweighted coordinate-wise median (Yin et al. 2018)
  # RFFL (aggregator='rffl', algorithms/rffl.py).
  config.rffl_alpha = 0.95
  config.rffl_beta = 1.0 / 3.0
  config.rffl_clip = config_dict.placeholder(float)           # Gamma; None: no clipping
  config.rffl_personalized = False
  return config
