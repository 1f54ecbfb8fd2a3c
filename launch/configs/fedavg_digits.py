"""FedAvg on the embedded digits set (scikit-learn's load_digits; no download).

100 clients, Dirichlet(0.5) label skew, 10 clients per round.
    python -m launch.train --config=launch/configs/fedavg_digits.py --config.rounds=300
    python -m launch.train --config.dp.clip=0.5 --config.dp.noise_multiplier=1.0
    python -m launch.train --config.aggregator=median --config.attack=sign_flip \
        --config.malicious_fraction=0.2
The robustness and privacy keys (aggregator, attack, dp.*, ...) are shared.py's.
"""
import ml_collections
from ml_collections import config_dict

from launch.configs import shared


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.algorithm = "fedavg"
  # Data.
  config.data = "digits"
  config.partition = "dirichlet"
  config.alpha = 0.5                 # Dirichlet concentration (label skew)
  config.num_clients = 100
  config.test_fraction = 0.2
  # Model.
  config.model = "mlp"
  config.hidden = (200,)
  # Rounds and local work.
  config.rounds = 200
  config.clients_per_round = 10
  config.local_epochs = 5
  config.local_steps = 0             # > 0 replaces epochs by a fixed step count
  config.batch_size = 10
  config.client_lr = 0.1
  config.server_lr = 1.0
  config.weighting = "num_examples"
  # Method-specific knobs (ignored by methods that do not use them).
  config.prox_mu = 0.01
  config.server_b1 = 0.9
  config.server_b2 = 0.99
  config.server_tau = 1e-3
  config.server_convention = "reddi"   # FedOpt: "reddi" (Alg. 2 of the paper) | "optax"
  # Execution.
  config.backend = "vmap"
  # Clients vectorised at once; None: automatic (training.resolve_chunk_size).
  config.chunk_size = config_dict.placeholder(int)
  config.donate_state = False        # True: update the state in place (large client-state tables)
  config.client_states = "device"    # "host": per-client state table in host memory (huge N)
  config.client_state_dir = config_dict.placeholder(str)   # with "host": table as memmap files
  config.rounds_per_call = 10
  config.seed = 0                     # model init, cohort draws, client shuffles
  config.data_seed = 0                # partition and train/test split (shared by seeds)
  config.eval_every = 20
  config.checkpoint_every = 50
  return shared.add_robustness(config)
