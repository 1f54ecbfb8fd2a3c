"""Robustness and privacy from a config: byzantine clients, robust aggregation, DP-FedAvg.

``apply_robustness(method, config)`` reads these keys (an absent key changes nothing):

=========================  ===========================================================
key                        meaning
=========================  ===========================================================
``aggregator``             ``mean`` (default) or one of ``AGGREGATORS`` (incl. ``rffl``)
``attack``                 ``none`` or one of ``byzantine.ATTACKS``
``attack_scale``           the attack's strength (``byzantine`` module table)
``malicious_fraction``     share of the population that is malicious
``dp.clip``                DP-FedAvg clip norm C (turns DP on)
``dp.noise_multiplier``    z (0: clipping only)
=========================  ===========================================================

and, when present, the options ``attack_seed`` (default ``seed``), ``num_classes``
(label flipping, default 10), ``trim_fraction``, ``krum_byzantine_fraction`` (default
``malicious_fraction``), ``multi_krum_selected``, ``geometric_median_iterations``,
``norm_bound``, ``robust_weighted``, ``rffl_alpha`` / ``rffl_beta`` / ``rffl_clip`` /
``rffl_personalized``, ``dp.adaptive``, ``dp.target_quantile``, ``dp.clip_lr``,
``dp.count_noise``, ``dp.delta``.

The wrappers apply in the order aggregator, DP, attack: the attack is outermost, so
its clients misbehave whatever the server does, and DP's clipping bounds even a
malicious client's influence.
"""
import dataclasses
from typing import Any, Optional

from fedjax_lab import aggregate, byzantine, privacy
from fedjax_lab.algorithm import FederatedAlgorithm

AGGREGATORS = aggregate.AGGREGATORS + ("rffl",)
DEFAULT_DELTA = 1e-5


def _get(config, key, default=None):
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def _dp(config) -> Optional[Any]:
  dp = _get(config, "dp")
  if dp is None:
    return None
  clip = _get(dp, "clip")
  noise = _get(dp, "noise_multiplier", 0.0)
  if clip is None or clip == 0:
    if noise:
      raise ValueError(f"dp.noise_multiplier={noise} needs a clip norm: set dp.clip > 0.")
    return None
  return dp


def make_aggregator(name: str, config) -> Any:
  """The aggregator ``name`` with its options read from ``config``."""
  weighted = bool(_get(config, "robust_weighted", True))
  if name == "mean":
    return aggregate.weighted_mean()
  if name == "median":
    return aggregate.coordinate_median(weighted)
  if name == "trimmed_mean":
    return aggregate.trimmed_mean(float(_get(config, "trim_fraction", 0.2)), weighted)
  if name in ("krum", "multi_krum"):
    fraction = float(_get(config, "krum_byzantine_fraction",
                          _get(config, "malicious_fraction", 0.0)))
    if name == "krum":
      return aggregate.krum(byzantine_fraction=fraction)
    return aggregate.multi_krum(_get(config, "multi_krum_selected"), byzantine_fraction=fraction,
                                weighted=weighted)
  if name == "geometric_median":
    return aggregate.geometric_median(int(_get(config, "geometric_median_iterations", 10)),
                                      weighted=weighted)
  if name == "norm_bounded":
    return aggregate.norm_bounded_mean(float(_get(config, "norm_bound", 1.0)), weighted)
  raise ValueError(f"Unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}.")


def apply_robustness(method: FederatedAlgorithm, config) -> FederatedAlgorithm:
  """``method`` with the config's aggregator, DP-FedAvg and byzantine clients.

  Raises:
    ValueError: unknown aggregator/attack names, bad values, or DP combined with a
      robust aggregator (DP-FedAvg's noisy sum replaces the aggregator).
  """
  name = _get(config, "aggregator", "mean")
  if name not in AGGREGATORS:
    raise ValueError(f"Unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}.")
  dp = _dp(config)
  if dp is not None and name != "mean":
    raise ValueError(f"DP-FedAvg replaces the aggregator with a clipped, noised sum; use "
                     f"aggregator='mean' with dp.clip (got aggregator={name!r}).")
  if name == "rffl":
    from algorithms import rffl   # algorithms import fedjax_lab, not the reverse at load time
    method = rffl.rffl(method, float(_get(config, "rffl_alpha", 0.95)),
                       float(_get(config, "rffl_beta", 1.0 / 3.0)), _get(config, "rffl_clip"),
                       bool(_get(config, "rffl_personalized", False)))
  elif name != "mean":
    method = dataclasses.replace(method, aggregator=make_aggregator(name, config))

  if dp is not None:
    adaptive = None
    if _get(dp, "adaptive", False):
      adaptive = privacy.AdaptiveClip(float(_get(dp, "target_quantile", 0.5)),
                                      float(_get(dp, "clip_lr", 0.2)), _get(dp, "count_noise"))
    aggregator = privacy.dp_fedavg_aggregator(
        float(dp.clip), float(_get(dp, "noise_multiplier", 0.0)),
        float(_get(config, "clients_per_round")), int(_get(config, "seed", 0)) + 7919, adaptive)
    method = dataclasses.replace(method, aggregator=aggregator)

  attack = _get(config, "attack", "none")
  fraction = float(_get(config, "malicious_fraction", 0.0))
  if attack not in byzantine.ATTACKS:
    raise ValueError(f"Unknown attack {attack!r}; choose one of {', '.join(byzantine.ATTACKS)}.")
  if attack != "none" and fraction > 0:
    method = byzantine.with_attack(
        method, attack, fraction, _get(config, "attack_scale"),
        int(_get(config, "attack_seed", _get(config, "seed", 0))),
        int(_get(config, "num_classes", 10)))
  return method


def privacy_report(config, num_clients: int, rounds: Optional[int] = None) -> dict:
  """epsilon of the config's DP-FedAvg run for the sampling it performs; ``{}`` without DP.

  ``dp.sampling``: ``'poisson'`` (default; ``launch.common.run`` then samples Poisson
  cohorts of rate ``clients_per_round / N``), accounted with add/remove-one
  neighbours (RDP and PLD), or ``'fixed'`` (exactly ``clients_per_round`` clients),
  accounted with replace-one neighbours and sensitivity 2 x clip (RDP).

  Args:
    config: run config (``dp.*``, ``clients_per_round``, ``rounds``).
    num_clients: population size N (sampling rate ``q = clients_per_round / N``).
    rounds: rounds to account for (default ``config.rounds``), e.g. the rounds done.

  Returns:
    ``privacy.report``'s dict: ``{'dp_sampling', 'dp_neighboring', 'dp_epsilon_rdp',
    'dp_epsilon_pld' (Poisson only), 'dp_epsilon', 'dp_delta', 'dp_noise_multiplier',
    'dp_sampling_rate', 'dp_rounds'}``; epsilon is ``inf`` without noise.
  """
  dp = _dp(config)
  if dp is None:
    return {}
  rounds = int(_get(config, "rounds", 0) if rounds is None else rounds)
  return privacy.report(float(_get(dp, "noise_multiplier", 0.0)),
                        int(_get(config, "clients_per_round")), num_clients, rounds,
                        float(_get(dp, "delta", DEFAULT_DELTA)), dp_sampling(config))


def dp_sampling(config) -> Optional[str]:
  """How a DP run samples its cohorts: ``dp.sampling`` (default ``'poisson'``); None
  without DP (cohorts are then fixed-size uniform samples)."""
  dp = _dp(config)
  if dp is None:
    return None
  sampling = _get(dp, "sampling", "poisson")
  if sampling not in privacy.SAMPLINGS:
    raise ValueError(f"Unknown dp.sampling {sampling!r}; choose one of "
                     f"{', '.join(privacy.SAMPLINGS)}.")
  return sampling
