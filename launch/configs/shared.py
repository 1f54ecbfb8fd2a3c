"""Config keys every ``launch.train`` config shares: byzantine clients, robust aggregation, DP.

``add_robustness(config)`` adds them with values that turn everything off, so any
config takes ``--config.aggregator=median``, ``--config.attack=sign_flip
--config.malicious_fraction=0.2`` or ``--config.dp.clip=0.5`` (ml_collections only
overrides keys that exist). ``launch/robust.py`` reads them (``apply_robustness``) and
falls back to these same values when a key is absent; their meanings are its table.
"""
import ml_collections
from ml_collections import config_dict


def add_robustness(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the keys ``config`` lacks (a key it already has keeps its value); returns it."""
  for key, value in defaults().items(preserve_field_references=True):
    if key not in config:
      config[key] = value
  for key, value in compression_defaults().items(preserve_field_references=True):
    if key not in config:
      config[key] = value
  return config


def defaults() -> ml_collections.ConfigDict:
  """The shared keys with their defaults: mean aggregation, no attack, no DP."""
  config = ml_collections.ConfigDict()
  # Aggregation (fedjax_lab.aggregate): mean, median, trimmed_mean, krum, multi_krum,
  # geometric_median, norm_bounded, rffl (RFFL's own keys: robust_digits.py).
  config.aggregator = "mean"
  # None: each aggregator's paper convention (median, trimmed_mean, multi_krum's
  # average: unweighted; geometric_median (RFA) and norm_bounded: weighted by the
  # client weights); True / False: weighted / unweighted for all of them.
  config.robust_weighted = config_dict.placeholder(bool)
  config.trim_fraction = 0.2                                   # beta, from each end
  # Krum / Multi-Krum's f: a count, or a fraction of the round's valid clients
  # (floor(fraction * n)); at most one of the two; neither: malicious_fraction.
  config.krum_byzantine = config_dict.placeholder(int)
  config.krum_byzantine_fraction = config_dict.placeholder(float)
  config.multi_krum_selected = config_dict.placeholder(int)   # m; None: n - f
  config.geometric_median_iterations = 10
  config.norm_bound = 1.0
  # Byzantine clients (fedjax_lab.byzantine): none, sign_flip, scale, gaussian,
  # free_rider, free_rider_noise, label_flip, alie.
  config.attack = "none"
  config.attack_scale = config_dict.placeholder(float)        # None: the attack's default
  config.malicious_fraction = 0.0
  config.attack_seed = config_dict.placeholder(int)           # None: seed
  config.num_classes = 10                                     # label_flip: y -> 9 - y
  # DP-FedAvg or DP-FTRL (fedjax_lab.privacy); off while dp.clip is None.
  config.dp = ml_collections.ConfigDict()
  # gaussian: DP-FedAvg (noise on each round's sum) | tree: DP-FTRL (tree-aggregated noise,
  # cohorts from shuffled epochs, each client at most once per epoch).
  config.dp.mechanism = "gaussian"
  config.dp.clip = config_dict.placeholder(float)
  config.dp.noise_multiplier = 0.0
  config.dp.delta = 1e-5
  # poisson (each client joins w.p. q) | fixed (exactly C) | epochs (DP-FTRL's; the only
  # one for mechanism=tree). None: poisson for gaussian, epochs for tree.
  config.dp.sampling = config_dict.placeholder(str)
  config.dp.adaptive = False
  config.dp.target_quantile = 0.5
  config.dp.clip_lr = 0.2
  config.dp.count_noise = config_dict.placeholder(float)     # None: clients_per_round / 20
  # Simulate a deployment of M clients per round (noise z clip C / M on the sum of C);
  # the summary's dp_noise_cohort_epsilon is that deployment's, dp_epsilon this run's.
  config.dp.noise_cohort_size = config_dict.placeholder(int)
  return config


def compression_defaults() -> ml_collections.ConfigDict:
  """Compressed communication (``launch/compression.py``'s table); off while
  ``compression`` and ``downlink_compression`` are ``'none'``."""
  config = ml_collections.ConfigDict()
  config.compression = "none"          # identity, top_k, random_k, sign, sign_vote, qsgd, rotated, fedzip
  config.compression_bits = 4          # qsgd, rotated
  config.compression_fraction = 0.01   # top_k, random_k, fedzip (top-z)
  config.compression_norm = "l2"       # qsgd: l2 (QSGD eq. 1) | linf (uniform quantisation)
  config.compression_bucket = 128      # qsgd: entries per bucket (QSGD's bucketing); None: a layer
  config.compression_clusters = 3      # fedzip k-means centroids
  config.compression_keys = "delta"    # message entries compressed (SCAFFOLD: delta,control_delta)
  config.error_feedback = False
  config.error_feedback_kind = "ef"    # ef | ef21
  config.downlink_compression = "none"
  return config
