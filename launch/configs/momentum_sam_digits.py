"""Client momentum, sharpness-aware and normalised methods on the digits task.

fedavg_digits.py's task (100 clients, Dirichlet(0.5), 10 per round) with a fixed number
of local steps; ``get_config(name)`` sets ``algorithm`` to one of fedavg_cm, scaffold_m,
mimelite, fedsam, fedspeed, fednova, feddyn.
    python -m launch.train --config=launch/configs/momentum_sam_digits.py:fedavg_cm
    python -m launch.train --config=launch/configs/momentum_sam_digits.py:feddyn \
        --config.feddyn_alpha=0.1
"""
from launch.configs import fedavg_digits

METHODS = ("fedavg_cm", "scaffold_m", "mimelite", "fedsam", "fedspeed", "fednova", "feddyn")


def get_config(algorithm: str = "fedavg_cm"):
  if algorithm not in METHODS:
    raise ValueError(f"momentum_sam_digits.py has configs for {', '.join(METHODS)}, "
                     f"got {algorithm!r}.")
  config = fedavg_digits.get_config()
  config.algorithm = algorithm
  config.local_steps = 10            # K; fedavg_cm / scaffold_m: gamma = server_lr * client_lr * K
  config.client_lr = 0.05
  config.global_lr = 0.0             # fedavg_cm / scaffold_m's gamma (0: server_lr * client_lr * K)
  config.momentum_beta = 0.1         # fedavg_cm / scaffold_m: weight of the fresh gradient
  config.mime_beta = 0.9             # mimelite: SGD-momentum's beta
  config.sam_rho = 0.05              # fedsam (SAM radius), fedspeed (ascent step)
  config.fedspeed_lambda = 10.0
  config.fedspeed_alpha = 0.5
  config.local_momentum = 0.0        # fednova: local heavy ball rho
  config.feddyn_alpha = 0.01
  if algorithm == "fednova":
    config.local_steps = 0           # epochs: clients of different sizes run different K
    config.local_epochs = 2
  # The papers average uniformly over the cohort; FedSAM and FedNova weight by examples.
  config.weighting = "num_examples" if algorithm in ("fedsam", "fednova") else "uniform"
  return config
