"""DP-FedAvg: per-client clipping, Gaussian noise on the sum, adaptive clipping, accounting.

User-level central differential privacy (McMahan, Ramage, Talwar, Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018, Algorithm 1 with the
fixed-denominator estimator, every client weighing 1):

    Delta = ( sum_{i in cohort} clip(Delta_i, C) + N(0, (z_Delta C)^2 I) ) / m

``clip`` scales a client's whole message to L2 norm at most C (the server enforces
it, so the bound holds whatever a client sends) and ``m`` is the expected number of
clients per round. The noise is drawn once per round, after the cross-device sum.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021, Algorithm 1, geometric update):

    b   = ( sum_i 1[||Delta_i|| <= C] + N(0, sigma_b^2) ) / m
    C  <- C * exp(-eta_C (b - gamma))

and the update's noise multiplier ``z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` keeps the
pair of releases at total noise multiplier ``z`` (their Theorem 1), so the
accountant uses ``z``.

Accounting uses Google's ``dp-accounting`` for ``rounds`` compositions of a subsampled
Gaussian mechanism, for the sampling the run performs:

* ``poisson`` (every client joins with probability ``q = m / N``; ``sampling.poisson``):
  add/remove-one neighbours, sensitivity C, so the Gaussian event has noise multiplier
  z; RDP and PLD (dp-accounting's default PLD precision).
* ``fixed`` (exactly m clients without replacement; ``sampling.uniform``): replace-one
  neighbours, under which the sum of clipped updates moves by up to 2C, so the event's
  noise multiplier (std over sensitivity) is z / 2; RDP only (dp-accounting's PLD has
  no without-replacement event).

``report`` gives both accountants' epsilon where valid and the smaller as ``epsilon``.

DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep)
Learning without Sampling or Shuffling", ICML 2021, Algorithm 1 with tree restarts,
Appendix D), ``tree_aggregation_aggregator``: no sampling assumption, only that a
client joins at most once per tree (``sampling.shuffled_epochs``, one tree per epoch of
E rounds). The tree's nodes over the rounds of an epoch carry independent noise
``N(0, (z C)^2 I)``; the noisy prefix sum after tau rounds is

    S~_tau = sum_{s <= tau} sum_{i in cohort_s} clip(Delta_i, C) + sum_{nodes of [1, tau]} noise

(one node per set bit of tau), and round tau releases the mean of the residual
``(S~_tau - S~_{tau-1}) / m``, so a plain SGD server of rate eta ends the epoch at
``theta_start - eta S~_E / m``: FTRL with regulariser ``m / (2 eta) ||theta - theta_start||^2``,
restarted at each epoch from its last model. Accounting: dp-accounting's
``SingleEpochTreeAggregationDpEvent(z, E)`` per tree, composed over the epochs, with
replace-by-a-special-record neighbours (one client's clipped update replaced by zero
moves every node it is in by at most C): RDP (``tree_epsilon``).
"""
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_lab import aggregate as aggregate_lib
from fedjax_lab import hyperparams
from fedjax_lab.transforms import Aggregator, SumStream, as_collectives

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")
NEIGHBORING = {"poisson": "add_remove_one", "fixed": "replace_one", "epochs": "replace_special"}


class DPState(NamedTuple):
  """``key``: uint32[2] noise key, split every round; ``clip``: current clip norm C;
  ``noise_multiplier``: z, an array so a run can be vmapped over a grid of z."""
  key: jax.Array
  clip: jax.Array
  noise_multiplier: jax.Array


class AdaptiveClip(NamedTuple):
  """Quantile-based clip adaptation (Andrew et al. 2021).

  Attributes:
    target_quantile: gamma, the fraction of clients to leave unclipped.
    learning_rate: eta_C of the geometric update.
    count_noise: sigma_b, std of the noise on the unclipped count; None uses
      ``expected_clients / 20`` as in the paper's experiments.
  """
  target_quantile: float = 0.5
  learning_rate: float = 0.2
  count_noise: Optional[float] = None


def update_noise_multiplier(noise_multiplier, count_noise):
  """``z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` (Andrew et al. 2021, Theorem 1).

  A float for numbers (checked: ``2 sigma_b > z``); a float32 array when either is an
  array (not checked).
  """
  if not (hyperparams.is_concrete(noise_multiplier) and hyperparams.is_concrete(count_noise)):
    return _update_noise_multiplier(noise_multiplier, count_noise)
  if noise_multiplier == 0:
    return 0.0
  if not 2 * count_noise > noise_multiplier:
    raise ValueError(f"count_noise={count_noise} is too small for noise_multiplier="
                     f"{noise_multiplier}: need 2 * count_noise > noise_multiplier.")
  return float(_update_noise_multiplier(noise_multiplier, count_noise))


def _update_noise_multiplier(z, count_noise):
  # jnp form of update_noise_multiplier, for z held in the state (0 stays 0).
  z = jnp.asarray(z, jnp.float32)
  rest = 1.0 / jnp.maximum(z, 1e-12) ** 2 - 1.0 / (2.0 * count_noise) ** 2
  return jnp.where(z > 0, jax.lax.rsqrt(jnp.maximum(rest, 1e-30)), 0.0)


def adaptive_clip_update(clip, unclipped_count, noise, expected_clients, target_quantile,
                         learning_rate):
  """One geometric step: ``C * exp(-eta ((count + noise) / m - gamma))``."""
  b = (unclipped_count + noise) / expected_clients
  return clip * jnp.exp(-learning_rate * (b - target_quantile))


def dp_fedavg_aggregator(clip: float, noise_multiplier: float, expected_clients: float,
                         seed: int = 0, adaptive: Optional[AdaptiveClip] = None,
                         noise_cohort_size: Optional[float] = None) -> Aggregator:
  """DP-FedAvg's aggregation (module docstring), with optional adaptive clipping.

  Args:
    clip: C (the initial value when adaptive).
    noise_multiplier: z, the total noise multiplier the accountant sees (its
      initial value in the state: replace ``state.noise_multiplier`` to sweep z).
    expected_clients: m, expected clients per round (the fixed cohort size here).
    seed: seed of the noise key kept in the aggregator state.
    adaptive: clip adaptation settings, or None for a fixed clip.
    noise_cohort_size: M, simulate a deployment whose cohorts are M clients (pfl's
      ``noise_cohort_size``): the noise on the sum of the m simulated clients is
      ``z clip m / M``, so the mean carries the noise the mean of M clients would.
      The privacy of such a run is that of the M-client deployment
      (``report(..., noise_cohort_size=M)``), not of the simulation itself.

  ``clip``, ``noise_multiplier``, ``expected_clients`` and the fields of ``adaptive``
  may be scalar arrays (a traced sweep); they are range-checked only when numbers.

  Returns:
    An aggregator with state ``DPState``; every client with a positive weight
    counts 1, zero-weight (padding) clients are ignored.
  """
  hyperparams.check(clip, lambda c: c > 0, f"dp clip must be > 0, got {clip}.")
  hyperparams.check(noise_multiplier, lambda z: not z < 0,
                    f"dp noise_multiplier must be >= 0, got {noise_multiplier}.")
  hyperparams.check(expected_clients, lambda m: m > 0,
                    f"expected_clients must be > 0, got {expected_clients}.")
  if noise_cohort_size is not None:
    hyperparams.check(noise_cohort_size, lambda n: n >= expected_clients,
                      f"noise_cohort_size={noise_cohort_size} must be at least the expected "
                      f"cohort {expected_clients}.")
  # The noise on the simulated sum, as a share of z clip: m / M with a noise cohort.
  noise_scale = 1.0 if noise_cohort_size is None else expected_clients / noise_cohort_size
  if adaptive is not None:
    hyperparams.check(adaptive.target_quantile, lambda q: 0.0 <= q <= 1.0,
                      f"target_quantile must be in [0, 1], got {adaptive.target_quantile}.")
    count_noise = (expected_clients / 20 if adaptive.count_noise is None
                   else adaptive.count_noise)
    if hyperparams.is_concrete(count_noise) and count_noise > 0:
      update_noise_multiplier(noise_multiplier, count_noise)    # validates numbers
  else:
    count_noise = 0.0
  # With sigma_b = 0 (or no adaptive clipping) the update's noise multiplier is z.
  static_count_noise = hyperparams.static_value(count_noise)

  def update_z(z):
    if static_count_noise is not None:
      return _update_noise_multiplier(z, count_noise) if static_count_noise > 0 else z
    positive = count_noise > 0
    safe = jnp.where(positive, count_noise, 1.0)
    return jnp.where(positive, _update_noise_multiplier(z, safe), z)

  def init():
    return DPState(key=jax.random.PRNGKey(seed), clip=jnp.asarray(clip, jnp.float32),
                   noise_multiplier=jnp.asarray(noise_multiplier, jnp.float32))

  # A running sum of the clipped updates and of the unclipped count, so chunked client
  # maps stream it; noise, the division by m and the clip step come once, in finish.
  def zero(shapes):
    return (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
            jnp.zeros((), jnp.float32))

  def add(acc, messages, weights, state):
    unit = (weights > 0).astype(jnp.float32)
    clipped, norms = aggregate_lib.clip_clients(messages, state.clip)
    total, _ = aggregate_lib.weighted_sum(clipped, unit)
    return (jax.tree.map(jnp.add, acc[0], total),
            acc[1] + jnp.sum(unit * (norms <= state.clip)))

  def finish(acc, state, collectives=None):
    total, unclipped = as_collectives(collectives).sum(acc)
    key, noise_key, count_key = jax.random.split(state.key, 3)
    z_update = update_z(state.noise_multiplier)
    leaves, treedef = jax.tree.flatten(total)
    noisy = [t + (noise_scale * z_update * state.clip) * jax.random.normal(
        jax.random.fold_in(noise_key, i), t.shape, t.dtype) for i, t in enumerate(leaves)]
    mean = jax.tree.map(lambda t: t / expected_clients, jax.tree.unflatten(treedef, noisy))
    new_clip = state.clip
    if adaptive is not None:
      noise = count_noise * jax.random.normal(count_key, ())
      new_clip = adaptive_clip_update(state.clip, unclipped, noise, expected_clients,
                                      adaptive.target_quantile, adaptive.learning_rate)
    return mean, state._replace(key=key, clip=new_clip)

  return aggregate_lib.from_stream(SumStream(zero, add, finish), init)


class TreeState(NamedTuple):
  """``key``: the noise key of every tree; ``round``: rounds released so far."""
  key: jax.Array
  round: jax.Array


def tree_depth(rounds_per_tree: int) -> int:
  """Levels of a binary tree over ``rounds_per_tree`` leaves: ``ceil(log2(E + 1))``."""
  return max(int(rounds_per_tree).bit_length(), 1)


def tree_prefix_noise(key: jax.Array, tree: jax.Array, prefix: jax.Array, depth: int,
                      shapes) -> list:
  """The noise of prefix sum ``[1, prefix]`` of tree ``tree``: unit normals of its nodes.

  The prefix covers one node per set bit ``l`` of ``prefix``: the one at level ``l``
  with index ``2 (prefix >> (l + 1))`` (it spans ``2^l`` rounds); every node's noise is
  a fixed function of ``(key, tree, level, index)``, so two prefixes share their
  common nodes exactly.
  """
  tree_key = jax.random.fold_in(key, tree)
  total = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  for level in range(depth):
    present = ((prefix >> level) & 1).astype(jnp.float32)
    node_key = jax.random.fold_in(jax.random.fold_in(tree_key, level),
                                  2 * (prefix >> (level + 1)))
    total = [t + present.astype(s.dtype) * jax.random.normal(jax.random.fold_in(node_key, i),
                                                             s.shape, s.dtype)
             for i, (t, s) in enumerate(zip(total, shapes))]
  return total


def tree_aggregation_aggregator(clip: float, noise_multiplier: float, clients_per_round: int,
                                rounds_per_tree: int, seed: int = 0) -> Aggregator:
  """DP-FTRL's aggregation (module docstring): the clipped sum plus the tree residual noise.

  Args:
    clip: C, the L2 bound on each client's message.
    noise_multiplier: z, each node's noise std over C.
    clients_per_round: m, the cohort size (the fixed denominator).
    rounds_per_tree: E, rounds between restarts (``sampling.rounds_per_epoch``).
    seed: seed of the node-noise key.

  Returns:
    An aggregator with state ``TreeState``; clients with weight 0 are ignored.
  """
  hyperparams.check(clip, lambda c: c > 0, f"dp clip must be > 0, got {clip}.")
  hyperparams.check(noise_multiplier, lambda z: not z < 0,
                    f"dp noise_multiplier must be >= 0, got {noise_multiplier}.")
  if rounds_per_tree < 1:
    raise ValueError(f"rounds_per_tree must be >= 1, got {rounds_per_tree}.")
  depth = tree_depth(rounds_per_tree)

  def init():
    return TreeState(key=jax.random.PRNGKey(seed), round=jnp.zeros((), jnp.int32))

  def zero(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def add(acc, messages, weights, state):
    clipped, _ = aggregate_lib.clip_clients(messages, clip)
    total, _ = aggregate_lib.weighted_sum(clipped, (weights > 0).astype(jnp.float32))
    return jax.tree.map(jnp.add, acc, total)

  def finish(acc, state, collectives=None):
    total = as_collectives(collectives).sum(acc)
    leaves, treedef = jax.tree.flatten(total)
    tree, tau = state.round // rounds_per_tree, state.round % rounds_per_tree
    now = tree_prefix_noise(state.key, tree, tau + 1, depth, leaves)
    before = tree_prefix_noise(state.key, tree, tau, depth, leaves)
    std = noise_multiplier * clip
    noisy = [(t + std * (a - b)) / clients_per_round for t, a, b in zip(leaves, now, before)]
    return jax.tree.unflatten(treedef, noisy), state._replace(round=state.round + 1)

  return aggregate_lib.from_stream(SumStream(zero, add, finish), init)


# ---------------------------------------------------------------------------
# Accounting (dp-accounting).
# ---------------------------------------------------------------------------


def _check_sampling(sampling: str) -> None:
  if sampling not in SAMPLINGS:
    raise ValueError(f"Unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}.")


def dp_event(noise_multiplier: float, rounds: int, sampling_rate: float,
             sampling: str = "poisson", population: Optional[int] = None):
  """The ``dp_accounting`` event of ``rounds`` rounds of DP-FedAvg.

  ``noise_multiplier`` is z, the noise std over the clip norm. For ``'fixed'``
  cohorts (replace-one neighbours, sensitivity 2 x clip) the Gaussian event's noise
  multiplier is z / 2.
  """
  import dp_accounting
  _check_sampling(sampling)
  if sampling == "poisson":
    one = dp_accounting.PoissonSampledDpEvent(sampling_rate,
                                              dp_accounting.GaussianDpEvent(noise_multiplier))
  else:
    if population is None:
      raise ValueError("sampling='fixed' needs the population size.")
    one = dp_accounting.SampledWithoutReplacementDpEvent(
        population, int(round(sampling_rate * population)),
        dp_accounting.GaussianDpEvent(noise_multiplier / 2.0))
  return dp_accounting.SelfComposedDpEvent(one, rounds)


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
            accountant: str = "rdp", sampling: str = "poisson",
            population: Optional[int] = None, pld_discretization: float = 1e-4) -> float:
  """epsilon of ``rounds`` rounds of DP-FedAvg at ``delta`` (inf without noise).

  Args:
    noise_multiplier: z (noise std / clip).
    sampling_rate: q, expected clients per round / population.
    rounds: number of rounds (0 gives epsilon 0).
    delta: target delta.
    accountant: ``'rdp'`` (Renyi DP, Mironov 2017) or ``'pld'`` (privacy loss
      distributions, Koskela et al. / Doroshenko et al. 2022).
    sampling: ``'poisson'`` (add/remove-one neighbours) or ``'fixed'`` (a fixed-size
      sample without replacement: RDP only, replace-one neighbours, sensitivity
      2 x clip; Wang, Balle, Kasiviswanathan 2019).
    population: number of clients (for ``'fixed'``).
    pld_discretization: the PLD accountant's ``value_discretization_interval``
      (dp-accounting's default 1e-4; a coarser grid is pessimistic, up to 2x at small q).
  """
  import dp_accounting
  from dp_accounting import pld, rdp
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"Unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}.")
  _check_sampling(sampling)
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1), got {delta}.")
  if rounds < 0:
    raise ValueError(f"rounds must be >= 0, got {rounds}.")
  if rounds == 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  if accountant == "pld" and sampling != "poisson":
    raise ValueError("The PLD accountant here supports sampling='poisson' only.")
  if accountant == "pld":
    acc = pld.PLDAccountant(value_discretization_interval=pld_discretization)
  elif sampling == "poisson":
    acc = rdp.RdpAccountant()
  else:
    # Fixed-size sampling is analysed for neighbours that replace one client.
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  acc.compose(dp_event(noise_multiplier, rounds, sampling_rate, sampling, population))
  return float(acc.get_epsilon(delta))


def tree_dp_event(noise_multiplier: float, rounds: int, rounds_per_tree: int):
  """The ``dp_accounting`` event of ``rounds`` rounds of DP-FTRL restarted every
  ``rounds_per_tree`` rounds: one tree-aggregation event per tree, composed."""
  import dp_accounting
  full, rest = divmod(int(rounds), int(rounds_per_tree))
  events = []
  if full:
    events.append(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, rounds_per_tree), full))
  if rest:
    events.append(dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, rest))
  return dp_accounting.ComposedDpEvent(events)


def tree_epsilon(noise_multiplier: float, rounds: int, rounds_per_tree: int,
                 delta: float) -> float:
  """epsilon of DP-FTRL (RDP, replace-by-a-special-record neighbours); inf without noise."""
  import dp_accounting
  from dp_accounting import rdp
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1), got {delta}.")
  if rounds <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  acc.compose(tree_dp_event(noise_multiplier, rounds, rounds_per_tree))
  return float(acc.get_epsilon(delta))


def tree_report(noise_multiplier: float, clients_per_round: int, num_clients: int, rounds: int,
                delta: float) -> dict:
  """The privacy of ``rounds`` rounds of DP-FTRL over shuffled epochs of the population:
  ``report``'s keys (``dp_sampling='epochs'``, ``dp_neighboring='replace_special'``, no
  PLD: dp-accounting's PLD has no tree event) plus ``dp_mechanism`` and
  ``dp_rounds_per_tree``."""
  from fedjax_lab import sampling
  per_tree = sampling.rounds_per_epoch(num_clients, clients_per_round)
  eps = tree_epsilon(noise_multiplier, rounds, per_tree, delta)
  return {"dp_mechanism": "tree_aggregation", "dp_sampling": "epochs",
          "dp_neighboring": NEIGHBORING["epochs"], "dp_epsilon_rdp": eps, "dp_epsilon": eps,
          "dp_delta": delta, "dp_noise_multiplier": noise_multiplier,
          "dp_sampling_rate": clients_per_round / num_clients, "dp_rounds": rounds,
          "dp_rounds_per_tree": per_tree}


def report(noise_multiplier: float, clients_per_round: int, num_clients: int, rounds: int,
           delta: float, sampling: str = "poisson",
           noise_cohort_size: Optional[int] = None) -> dict:
  """The privacy of ``rounds`` rounds of DP-FedAvg as the run sampled them.

  With ``noise_cohort_size`` M (the aggregator's option of that name) the run's noise
  is ``z m / M`` times the clip: ``dp_epsilon*`` are this simulation's own, for that
  effective noise multiplier, and ``dp_noise_cohort_epsilon`` is the epsilon of the
  deployment the run stands for (Poisson cohorts of rate M / N at noise multiplier z).

  Returns:
    ``{'dp_sampling', 'dp_neighboring', 'dp_epsilon_rdp', 'dp_epsilon_pld' (Poisson
    only), 'dp_epsilon' (the smaller valid one), 'dp_delta', 'dp_noise_multiplier',
    'dp_sampling_rate', 'dp_rounds'}`` (+ ``dp_noise_cohort_size``,
    ``dp_noise_cohort_epsilon``); epsilon is ``inf`` without noise.
  """
  _check_sampling(sampling)
  if noise_cohort_size is not None:
    if not clients_per_round <= noise_cohort_size <= num_clients:
      raise ValueError(f"noise_cohort_size={noise_cohort_size} must be in [clients_per_round="
                       f"{clients_per_round}, num_clients={num_clients}].")
    deployment = report(noise_multiplier, noise_cohort_size, num_clients, rounds, delta)
    own = report(noise_multiplier * clients_per_round / noise_cohort_size, clients_per_round,
                 num_clients, rounds, delta, sampling)
    return {**own, "dp_noise_cohort_size": noise_cohort_size,
            "dp_noise_cohort_epsilon": deployment["dp_epsilon"]}
  q = clients_per_round / num_clients
  out = {"dp_sampling": sampling, "dp_neighboring": NEIGHBORING[sampling],
         "dp_epsilon_rdp": epsilon(noise_multiplier, q, rounds, delta, "rdp", sampling,
                                   num_clients)}
  if sampling == "poisson":
    out["dp_epsilon_pld"] = epsilon(noise_multiplier, q, rounds, delta, "pld")
  out["dp_epsilon"] = min(v for k, v in out.items() if k.startswith("dp_epsilon_"))
  out.update(dp_delta=delta, dp_noise_multiplier=noise_multiplier, dp_sampling_rate=q,
             dp_rounds=rounds)
  return out
