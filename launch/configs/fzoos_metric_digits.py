"""FZooS: federated optimisation of a non-differentiable metric (1 - macro precision).

A softmax-regression digits classifier (d = 650 weights) is perturbed by x; 10 clients
score it on their own non-IID examples (30% of the classes each), as FZooS's
MetricOpt. ``score``: precision | recall | f1 | jaccard.

    python -m launch.zeroth_order --config=launch/configs/fzoos_metric_digits.py
"""
from launch.configs import fzoos_synthetic


def get_config():
  config = fzoos_synthetic.get_config()
  config.problem = "metric"
  config.score = "precision"
  config.portion = 0.3
  config.num_clients = 10
  config.clients_per_round = 10
  config.rounds = 50
  del config["dim"], config["div"]
  return config
