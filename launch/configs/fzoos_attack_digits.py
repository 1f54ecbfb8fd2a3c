"""FZooS: federated black-box adversarial attack on the 8x8 digits (d = 64, 10 clients).

Every client holds its own MLP trained on 70% of the classes; the clients look for one
perturbation (|delta| <= 0.3) of one image that fools their models (untargeted margin).
``success_rate`` is the share of client models fooled; ``trial`` picks the image.

    python -m launch.zeroth_order --config=launch/configs/fzoos_attack_digits.py
    python -m launch.zeroth_order --config=launch/configs/fzoos_attack_digits.py --config.algorithm=fedzo
"""
from launch.configs import fzoos_synthetic


def get_config():
  config = fzoos_synthetic.get_config()
  config.problem = "attack"
  config.num_clients = 10
  config.clients_per_round = 10
  config.portion = 0.7
  config.eps = 0.3
  config.hidden = 32
  config.trial = 0
  config.local_steps = 5             # FZooS's MNIST setting: T = 5, R = 100
  config.rounds = 100
  del config["dim"], config["div"]
  return config
