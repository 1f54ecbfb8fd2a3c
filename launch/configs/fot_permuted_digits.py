"""FOT and its baselines on 10 permuted-digits tasks (embedded scikit-learn digits).

Each task permutes the 64 pixels with its own fixed permutation (task 0: identity);
20 clients per task with Dirichlet(0.5) label skew, 5 per round, 40 rounds per task;
an MLP 64-128-128-10 without biases, so every parameter is a projected kernel.

    python -m launch.continual --config=launch/configs/fot_permuted_digits.py
    python -m launch.continual --config=launch/configs/fot_permuted_digits.py:fedavg
    python -m launch.continual --config=launch/configs/fot_permuted_digits.py:fedavg_ewc

The optional argument after ':' picks a preset: fot (default), fedavg (sequential
fine-tuning), fedprox, fedavg_ewc, gpm (centralized upper reference: one client with
all of a task's data, every step projected). ``--config.algorithm=NAME`` runs NAME on
the identical stream with the shared settings.
"""
import ml_collections

PRESETS = ("fot", "fedavg", "fedprox", "fedavg_ewc", "gpm")


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.algorithm = "fot"
  # Stream.
  config.data = "digits"
  config.stream = "permuted"         # permuted | task | class
  config.num_tasks = 10
  config.test_fraction = 0.2
  config.partition = "dirichlet"     # iid | dirichlet
  config.alpha = 0.5
  config.min_partition_size = 2
  config.num_clients = 20
  # Model.
  config.model = "mlp"
  config.hidden = (128, 128)
  config.use_bias = False
  # Rounds and local work (uniform client weights, as the FOT code).
  config.rounds_per_task = 40
  config.clients_per_round = 5
  config.local_epochs = 1
  config.local_steps = 0
  config.batch_size = 10
  config.client_lr = 0.05
  config.server_lr = 1.0
  config.weighting = "uniform"
  config.weight_decay = 0.0
  # FOT / GPM.
  config.fot_eps = 0.95              # energy threshold of the first task
  config.fot_eps_inc = 0.0           # added after every task
  config.fot_extraction = "local"    # the last cohort's local models | global
  config.fot_clients = 0             # global extraction: clients uploading (0: all)
  config.fot_samples = 0             # examples per client (0: all)
  config.fot_exclude = ()            # regexes of kernels left unprojected (task heads)
  config.fot_max_columns = 0         # 0: pre-allocate d columns per layer
  config.fot_squared_ratio = False   # True: GPM's exact energy criterion
  config.fot_min_new = 1             # the code adds >= 1 direction per task
  config.gpm_samples = 300
  # FedHyper on a base method (--config.algorithm=fedhyper_g --config.fedhyper_base=fot).
  config.fedhyper_base = "fedavg"
  # Baselines.
  config.prox_mu = 0.01
  config.ewc_lambda = 10.0          # larger values make local SGD unstable (lr * lambda * F > 2)
  config.ewc_gamma = 1.0
  config.ewc_clients = 0
  config.ewc_samples = 0
  # Execution.
  config.backend = "vmap"
  config.rounds_per_call = 20
  config.eval_every = 0              # > 0: accuracy of all tasks every k rounds (curves)
  config.seed = 0                     # model init, cohort draws, client shuffles
  config.data_seed = 0                # partition and train/test split (shared by seeds)
  return config


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
  config.algorithm = preset
  if preset == "gpm":
    # Centralized: one client holds the pooled task data; a round is one epoch.
    config.rounds_per_task = 5
    config.rounds_per_call = 5
  return config


def get_config(preset: str = "fot") -> ml_collections.ConfigDict:
  return apply_preset(base_config(), preset or "fot")
