"""Robustness and privacy from a config: byzantine clients, robust aggregation, DP-FedAvg.

``apply_robustness(method, config)`` reads these keys. ``launch/configs/shared.py``
(``add_robustness``) adds them to every ``launch.train`` config with the values below,
which turn everything off; an absent key takes the same value, so a config without
them, or with them off, leaves the method unchanged.

===============================  =========================================================
key (default)                    meaning
===============================  =========================================================
``aggregator`` (``mean``)        ``mean`` or one of ``AGGREGATORS`` (incl. ``rffl``)
``robust_weighted`` (None)       None: each aggregator's convention (next table); True /
                                 False: weighted / unweighted for all that take it
``trim_fraction`` (0.2)          ``trimmed_mean``'s beta, trimmed from each end
``krum_byzantine`` (None)        Krum / Multi-Krum's f as a count
``krum_byzantine_fraction``      f as ``floor(fraction * n)``, ``n`` the round's valid
(None)                           clients; neither key: ``malicious_fraction``; both: error
``multi_krum_selected`` (None)   Multi-Krum's m; None: ``n - f``
``geometric_median_iterations``  Weiszfeld steps (10)
``norm_bound`` (1.0)             ``norm_bounded``'s M
``attack`` (``none``)            ``none`` or one of ``byzantine.ATTACKS``
``attack_scale`` (None)          the attack's strength; None: its default (``byzantine``)
``malicious_fraction`` (0.0)     share of the population that is malicious
``attack_seed`` (None)           chooses the malicious set; None: ``seed``
``num_classes`` (10)             ``label_flip``: ``y -> num_classes - 1 - y``
``dp.clip`` (None)               DP clip norm C (turns DP on)
``dp.noise_multiplier`` (0.0)    z (0: clipping only)
``dp.mechanism`` (``gaussian``)  ``gaussian``: DP-FedAvg; ``tree``: DP-FTRL (tree
                                 aggregation over shuffled epochs, ``privacy``)
``dp.sampling`` (None)           ``poisson`` / ``fixed`` (gaussian; None: poisson) or
                                 ``epochs`` (tree; None: epochs)
===============================  =========================================================

and ``dp.delta``, ``dp.adaptive``, ``dp.target_quantile``, ``dp.clip_lr``,
``dp.count_noise`` (shared.py), ``rffl_alpha`` / ``rffl_beta`` / ``rffl_clip`` /
``rffl_personalized`` (``launch/configs/robust_digits.py``).

The aggregators, over the ``n`` valid clients of a round (weight ``w_i > 0``; padding
clients, weight 0, never count), ``fedjax_lab.aggregate``:

====================  ======================================================  ============
aggregator            statistic                                               weighting
====================  ======================================================  ============
``median``            coordinate-wise median, ``np.median`` (Yin et al. 2018)  unweighted
``trimmed_mean``      per coordinate, drop the ``floor(beta n)`` largest and   unweighted
                      smallest, mean of the rest (Yin et al. 2018)
``krum``              the message of lowest score; ``score_i`` = sum of its    none
                      ``n - f - 2`` smallest squared distances to the others
                      (Blanchard et al. 2017)
``multi_krum``        mean of the ``m`` lowest-scored messages                 unweighted
``geometric_median``  ``argmin_z sum_i alpha_i ||z - m_i||`` (RFA, Weiszfeld)  weighted
``norm_bounded``      ``sum_i w_i clip_M(m_i) / sum_i w_i`` (Sun et al. 2019)  weighted
====================  ======================================================  ============

Weighted (``robust_weighted=True``; ``weighted=True`` in code) uses the client weights
``w_i``, the example counts under the default ``weighting``: the weighted median (the
sorted value where the cumulative weight reaches half the total), the trimmed mean that
drops weight ``beta W`` from each end, Multi-Krum's mean weighted by ``w_i``,
``alpha_i = w_i``. Unweighted gives every valid client the weight 1.

The wrappers apply in the order aggregator, DP, attack: the attack is outermost, so
its clients misbehave whatever the server does, and DP's clipping bounds even a
malicious client's influence.
"""
import dataclasses
from typing import Any, Optional

from fedjax_lab import aggregate, byzantine, privacy, sampling
from fedjax_lab.algorithm import FederatedAlgorithm
from launch.configs import shared

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


_DEFAULTS = shared.defaults()


def _option(config, key, section: Optional[str] = None):
  """``config[key]``, or shared.py's default when it is absent or None."""
  defaults = _DEFAULTS if section is None else _DEFAULTS[section]
  return _get(config, key, defaults[key])


def krum_byzantine(config) -> dict:
  """Krum's f from ``config``: ``{'num_byzantine': f}`` or ``{'byzantine_fraction': r}``.

  ``krum_byzantine`` is a count, ``krum_byzantine_fraction`` a fraction of the round's
  valid clients; at most one may be set. Neither: ``malicious_fraction``.
  """
  count = _option(config, "krum_byzantine")
  fraction = _option(config, "krum_byzantine_fraction")
  if count is not None and fraction is not None:
    raise ValueError(f"Give Krum's f once: krum_byzantine={count} (a count) or "
                     f"krum_byzantine_fraction={fraction} (a fraction), not both.")
  if count is not None:
    if isinstance(count, bool) or float(count) != int(count) or count < 0:
      raise ValueError(f"krum_byzantine is a count of clients (an int >= 0), got {count!r}.")
    return {"num_byzantine": int(count)}
  if fraction is None:
    fraction = _option(config, "malicious_fraction")
  return {"byzantine_fraction": float(fraction)}


def make_aggregator(name: str, config) -> Any:
  """The aggregator ``name`` with its options read from ``config`` (module tables)."""
  weighted = _option(config, "robust_weighted")
  kw = {} if weighted is None else {"weighted": bool(weighted)}   # None: the library's
  if name == "mean":
    return aggregate.weighted_mean()
  if name == "median":
    return aggregate.coordinate_median(**kw)
  if name == "trimmed_mean":
    return aggregate.trimmed_mean(float(_option(config, "trim_fraction")), **kw)
  if name == "krum":
    return aggregate.krum(**krum_byzantine(config))
  if name == "multi_krum":
    return aggregate.multi_krum(_option(config, "multi_krum_selected"),
                                **krum_byzantine(config), **kw)
  if name == "geometric_median":
    return aggregate.geometric_median(int(_option(config, "geometric_median_iterations")), **kw)
  if name == "norm_bounded":
    return aggregate.norm_bounded_mean(float(_option(config, "norm_bound")), **kw)
  raise ValueError(f"Unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}.")


MECHANISMS = ("gaussian", "tree")


def dp_mechanism(config) -> Optional[str]:
  """``dp.mechanism`` (``'gaussian'`` DP-FedAvg or ``'tree'`` DP-FTRL); None without DP."""
  dp = _dp(config)
  if dp is None:
    return None
  mechanism = _get(dp, "mechanism", "gaussian")
  if mechanism not in MECHANISMS:
    raise ValueError(f"Unknown dp.mechanism {mechanism!r}; choose one of {', '.join(MECHANISMS)}.")
  return mechanism


def apply_robustness(method: FederatedAlgorithm, config,
                     num_clients: Optional[int] = None) -> FederatedAlgorithm:
  """``method`` with the config's aggregator, DP-FedAvg / DP-FTRL and byzantine clients.

  ``num_clients`` (the population N; default ``config.num_clients``) sets DP-FTRL's
  rounds per tree, ``floor(N / clients_per_round)``.

  Raises:
    ValueError: unknown aggregator/attack names, bad values, or DP combined with a
      robust aggregator (DP-FedAvg's noisy sum replaces the aggregator).
  """
  name = _option(config, "aggregator")
  if name not in AGGREGATORS:
    raise ValueError(f"Unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}.")
  krum_byzantine(config)   # both of Krum's f keys set is an error whatever the aggregator
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

  if dp is not None and dp_mechanism(config) == "tree":
    dp_sampling(config)    # validates the pairing of mechanism and sampling
    for key in ("adaptive", "noise_cohort_size"):
      if _get(dp, key):
        raise ValueError(f"dp.{key} is a DP-FedAvg option; dp.mechanism='tree' has no {key}.")
    population = int(num_clients if num_clients is not None else _get(config, "num_clients"))
    cohort = int(_get(config, "clients_per_round"))
    aggregator = privacy.tree_aggregation_aggregator(
        float(dp.clip), float(_option(dp, "noise_multiplier", "dp")), cohort,
        sampling.rounds_per_epoch(population, cohort), int(_get(config, "seed", 0)) + 7919)
    method = dataclasses.replace(method, aggregator=aggregator)
  elif dp is not None:
    adaptive = None
    if _option(dp, "adaptive", "dp"):
      adaptive = privacy.AdaptiveClip(float(_option(dp, "target_quantile", "dp")),
                                      float(_option(dp, "clip_lr", "dp")),
                                      _option(dp, "count_noise", "dp"))
    aggregator = privacy.dp_fedavg_aggregator(
        float(dp.clip), float(_option(dp, "noise_multiplier", "dp")),
        float(_get(config, "clients_per_round")), int(_get(config, "seed", 0)) + 7919, adaptive,
        _get(dp, "noise_cohort_size"))
    method = dataclasses.replace(method, aggregator=aggregator)

  attack = _option(config, "attack")
  fraction = float(_option(config, "malicious_fraction"))
  if attack not in byzantine.ATTACKS:
    raise ValueError(f"Unknown attack {attack!r}; choose one of {', '.join(byzantine.ATTACKS)}.")
  if attack != "none" and fraction > 0:
    method = byzantine.with_attack(
        method, attack, fraction, _option(config, "attack_scale"),
        int(_get(config, "attack_seed", _get(config, "seed", 0))),
        int(_option(config, "num_classes")))
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
  if dp_mechanism(config) == "tree":
    return privacy.tree_report(float(_get(dp, "noise_multiplier", 0.0)),
                               int(_get(config, "clients_per_round")), num_clients, rounds,
                               float(_get(dp, "delta", DEFAULT_DELTA)))
  return privacy.report(float(_get(dp, "noise_multiplier", 0.0)),
                        int(_get(config, "clients_per_round")), num_clients, rounds,
                        float(_get(dp, "delta", DEFAULT_DELTA)), dp_sampling(config),
                        _get(dp, "noise_cohort_size"))


def dp_sampling(config) -> Optional[str]:
  """How a DP run samples its cohorts: ``dp.sampling``, by default ``'poisson'`` for
  DP-FedAvg and ``'epochs'`` (``sampling.shuffled_epochs``, the only one its
  accounting holds for) for DP-FTRL; None without DP (cohorts are then fixed-size
  uniform samples)."""
  mechanism = dp_mechanism(config)
  if mechanism is None:
    return None
  chosen = _get(_dp(config), "sampling")
  if mechanism == "tree":
    if chosen not in (None, "epochs"):
      raise ValueError(f"dp.mechanism='tree' (DP-FTRL) is accounted for shuffled epochs only; "
                       f"dp.sampling={chosen!r} is not (use 'epochs' or leave it unset).")
    return "epochs"
  chosen = chosen or "poisson"
  if chosen not in privacy.SAMPLINGS:
    raise ValueError(f"Unknown dp.sampling {chosen!r} for dp.mechanism='gaussian'; choose "
                     f"one of {', '.join(privacy.SAMPLINGS)} ('epochs' goes with "
                     f"dp.mechanism='tree').")
  return chosen
