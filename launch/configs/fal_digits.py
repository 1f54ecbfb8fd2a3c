"""FAL (FedAvg + PGD adversarial training) on the embedded digits set, with robust evaluation.

Digits pixels are in [0, 1]; l_inf radius eps = 0.2. Training attack: PGD-10 with step
eps/4 and a random start; evaluation: clean, FGSM and PGD-20 (step eps/8, random start)
accuracy of the global model every ``eval_every`` rounds (``robust_accuracy`` = PGD-20).

    python -m launch.train --config=launch/configs/fal_digits.py
    python -m launch.train --config=launch/configs/fal_digits.py --config.algorithm=fedavg  # baseline
    python -m launch.train --config=launch/configs/fal_digits.py --config.algorithm=fat --config.mix_ratio=0.5
    python -m launch.train --config=launch/configs/fal_digits.py --config.algorithm=feddynat
    python -m launch.train --config=launch/configs/fal_digits.py --config.adversarial_base=fedprox

Every algorithm sees the same data, model and robust evaluation. The byzantine,
robust-aggregation and DP keys are shared.py's (``--config.aggregator=median``, ...).
"""
import ml_collections

from launch.configs import shared

EPS = 0.2


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.algorithm = "fal"            # fal | fat | feddynat | any registered method (baseline)
  # Data.
  config.data = "digits"
  config.partition = "iid"
  config.alpha = 0.5                  # Dirichlet concentration, with partition='dirichlet'
  config.num_clients = 50
  config.test_fraction = 0.2
  # Model.
  config.model = "mlp"
  config.hidden = (256, 256)
  # Rounds and local work.
  config.rounds = 60
  config.clients_per_round = 10
  config.local_epochs = 5
  config.local_steps = 0              # > 0 replaces epochs by a fixed step count
  config.batch_size = 10
  config.shuffle = True               # reshuffle client data every epoch
  config.client_lr = 0.1
  config.server_lr = 1.0
  config.weighting = "num_examples"   # FedAvg, FAT, FedDynAT
  config.fal_weighting = "uniform"    # FAL: the paper's 1/N average ("num_examples": by n_c)
  # Adversarial training: the attack every local step runs on the current local model.
  config.adversarial_training = ml_collections.ConfigDict(dict(
      norm="linf", eps=EPS, step_size=EPS / 4, steps=10, rand_init=True,
      clip_min=0.0, clip_max=1.0,
      eps_warmup_rounds=0))           # > 0: eps (and step) ramp to full over that many rounds
  config.adversarial_base = "fedavg"  # the method FAL/FAT/FedDynAT wrap (fedprox, fedadam, ...)
  config.mix_ratio = 0.5              # FAT only: loss (1 - r) clean + r adversarial
  config.feddynat = ml_collections.ConfigDict(dict(
      initial_steps=30, decay=0.95, min_steps=5, mix_ratio=1.0))
  # Base-method knobs (ignored by methods that do not use them).
  config.prox_mu = 0.01
  config.server_b1 = 0.9
  config.server_b2 = 0.99
  config.server_tau = 1e-3
  config.server_convention = "reddi"   # fedadam/fedyogi/fedadagrad base: "reddi" | "optax"
  # Robust evaluation of the global model (clean, FGSM, PGD-20), for every algorithm.
  config.robust_eval = ml_collections.ConfigDict(dict(
      eps=EPS, norm="linf", pgd_steps=20, pgd_step_size=EPS / 8, rand_init=True, fgsm=True,
      clip_min=0.0, clip_max=1.0, batch_size=512))
  # Execution.
  config.backend = "vmap"
  config.rounds_per_call = 10
  config.seed = 0                     # model init, cohort draws, client shuffles
  config.data_seed = 0                # partition and train/test split (shared by seeds)
  config.eval_every = 10
  config.checkpoint_every = 0
  return shared.add_robustness(config)
