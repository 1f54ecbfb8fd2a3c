"""Cohort sampling, on device and keyed by the round's RNG.

``uniform`` (C distinct clients, each cohort equally likely), ``weighted`` (C distinct
clients drawn in turn with probability proportional to a weight, e.g. example counts),
``fixed_schedule`` (the cohorts given ahead, one row per round), ``poisson`` (each
client joins with probability q, DP-FedAvg's sampling; padded to a static maximum) and
``shuffled_epochs`` (each epoch a fresh permutation of the population cut into cohorts,
so a client joins at most once per epoch: DP-FTRL's participation).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# ``(key, round) -> ids [C]`` or ``(ids [C], info)``: how a round draws its cohort
# (make_round's ``sampler``); ``info`` scalars join the round's metrics (Poisson's
# ``cohort_size``, ``cohort_overflow``).
Sampler = Callable[[jax.Array, jax.Array], jax.Array]


def validate_cohort(num_clients: int, clients_per_round: int) -> None:
  """Raises a ValueError naming the problem with a population/cohort pair."""
  if num_clients <= 0:
    raise ValueError(f"The federated dataset has zero clients (num_clients={num_clients}).")
  if clients_per_round <= 0:
    raise ValueError(f"clients_per_round must be positive, got {clients_per_round}.")
  if clients_per_round > num_clients:
    raise ValueError(f"Cohort size clients_per_round={clients_per_round} is larger than "
                     f"the population of num_clients={num_clients} clients.")


def uniform(rng: jax.Array, num_clients: int, clients_per_round: int) -> jax.Array:
  """``clients_per_round`` distinct client ids drawn uniformly, int32 ``[C]``."""
  return jax.random.choice(rng, num_clients, (clients_per_round,), replace=False).astype(jnp.int32)


def weighted(rng: jax.Array, weights: jax.Array, clients_per_round: int) -> jax.Array:
  """``clients_per_round`` distinct ids, drawn one after another with probability
  proportional to ``weights`` among those not drawn yet (e.g. weights = example
  counts); int32 ``[C]``. With ``C = 1`` client i is drawn with probability
  ``w_i / sum(w)``. Clients of weight 0 are drawn only once all others are.
  """
  weights = jnp.asarray(weights, jnp.float32)
  probs = weights / jnp.sum(weights)
  return jax.random.choice(rng, weights.shape[0], (clients_per_round,), replace=False,
                           p=probs).astype(jnp.int32)


def _check_schedule_shape(schedule) -> None:
  if schedule.ndim != 2:
    raise ValueError(f"A cohort schedule is [rounds, clients_per_round], got shape "
                     f"{schedule.shape}.")


def fixed_schedule(schedule, round_index: jax.Array) -> jax.Array:
  """The cohort of round ``round_index`` from ``schedule [R, C]`` (row ``round % R``).

  A schedule fixed ahead (from a file, a trace of which clients were online, or the
  cohorts of another run) replaces the random draw; ids must be distinct per row.
  """
  schedule = jnp.asarray(schedule, jnp.int32)
  _check_schedule_shape(schedule)
  return schedule[jnp.asarray(round_index) % schedule.shape[0]]


def validate_schedule(schedule, num_clients: int) -> None:
  """Raises a ValueError naming a bad row of a cohort schedule (ids out of range, repeats)."""
  schedule = np.asarray(schedule)
  _check_schedule_shape(schedule)
  validate_cohort(num_clients, schedule.shape[1])
  for r, row in enumerate(schedule):
    if row.min() < 0 or row.max() >= num_clients:
      raise ValueError(f"Cohort schedule row {r} has ids outside [0, {num_clients}): {row}.")
    if len(set(row.tolist())) != len(row):
      raise ValueError(f"Cohort schedule row {r} repeats a client: {row}.")


def weighted_sampler(weights, clients_per_round: int) -> Sampler:
  """Cohorts drawn by ``weighted`` (e.g. ``weights = data.client_sizes``)."""
  weights = np.asarray(weights, np.float32)
  if weights.ndim != 1 or np.any(weights < 0) or not np.any(weights > 0):
    raise ValueError("weighted_sampler needs one non-negative weight per client, not all 0.")
  validate_cohort(weights.shape[0], clients_per_round)
  if np.count_nonzero(weights) < clients_per_round:
    raise ValueError(f"Only {np.count_nonzero(weights)} clients have a positive weight; a "
                     f"cohort of {clients_per_round} would take clients of weight 0.")
  return lambda key, round_index: weighted(key, weights, clients_per_round)


def schedule_sampler(schedule, num_clients: int) -> Sampler:
  """Round r takes row ``r % R`` of ``schedule [R, C]`` (checked by ``validate_schedule``)."""
  validate_schedule(schedule, num_clients)
  schedule = np.asarray(schedule, np.int32)
  return lambda key, round_index: fixed_schedule(schedule, round_index)


def poisson(rng: jax.Array, num_clients: int, rate, max_cohort: int) -> tuple[jax.Array, dict]:
  """Poisson sampling: every client joins independently with probability ``rate``.

  The cohort has a random size, so it is returned padded to the static
  ``max_cohort``: the joining ids in increasing order, then padding ids
  ``num_clients`` (zero-weight clients in the round). A cohort larger than
  ``max_cohort`` cannot be represented; it is reported, never silently truncated:
  ``info['cohort_overflow']`` counts the clients left out (the rounds loop raises on
  a positive count) and ``info['cohort_size']`` is the number that joined.

  Returns:
    ``(ids int32 [max_cohort], info)``.
  """
  joined = jax.random.bernoulli(rng, rate, (num_clients,))
  count = jnp.sum(joined.astype(jnp.int32))
  # Joined ids first, in id order: a stable sort on "not joined".
  order = jnp.argsort(~joined, stable=True).astype(jnp.int32)[:max_cohort]
  ids = jnp.where(jnp.arange(max_cohort) < count, order, num_clients).astype(jnp.int32)
  return ids, {"cohort_size": count, "cohort_overflow": jnp.maximum(count - max_cohort, 0)}


def poisson_max_cohort(num_clients: int, rate: float, overflow_probability: float = 1e-9) -> int:
  """The smallest m with P(Binomial(num_clients, rate) > m) < ``overflow_probability``."""
  from scipy import stats
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"The Poisson sampling rate must be in (0, 1], got {rate}.")
  m = int(stats.binom.isf(overflow_probability, num_clients, rate))
  while m < num_clients and stats.binom.sf(m, num_clients, rate) >= overflow_probability:
    m += 1
  return max(min(m, num_clients), 1)


def poisson_sampler(num_clients: int, rate: float,
                    overflow_probability: float = 1e-9) -> tuple[Sampler, int]:
  """``(sampler, max_cohort)`` for Poisson cohorts of rate q (DP-FedAvg's sampling).

  ``max_cohort`` is ``poisson_max_cohort``: the round runs that many client slots
  (pass it as ``clients_per_round``), and a cohort above it, with probability below
  ``overflow_probability`` per round, stops the run.
  """
  max_cohort = poisson_max_cohort(num_clients, rate, overflow_probability)
  return (lambda key, round_index: poisson(key, num_clients, rate, max_cohort)), max_cohort


def rounds_per_epoch(num_clients: int, clients_per_round: int) -> int:
  """Rounds of one ``shuffled_epochs`` epoch: ``floor(N / C)``."""
  validate_cohort(num_clients, clients_per_round)
  return num_clients // clients_per_round


def shuffled_epochs(key: jax.Array, num_clients: int, clients_per_round: int,
                    round_index: jax.Array) -> jax.Array:
  """The cohort of ``round_index`` when epochs are permutations of the population.

  Epoch ``e = round // E`` (``E = rounds_per_epoch``) permutes the N clients with
  ``fold_in(key, e)`` and round ``e E + j`` takes slice ``j`` of C ids; the last
  ``N mod C`` ids of a permutation sit that epoch out. Within an epoch no client joins
  twice, whatever the key: the participation DP-FTRL's accounting assumes.
  """
  per_epoch = rounds_per_epoch(num_clients, clients_per_round)
  round_index = jnp.asarray(round_index)
  order = jax.random.permutation(jax.random.fold_in(key, round_index // per_epoch), num_clients)
  start = (round_index % per_epoch) * clients_per_round
  return jax.lax.dynamic_slice(order, (start,), (clients_per_round,)).astype(jnp.int32)


def shuffled_epochs_sampler(num_clients: int, clients_per_round: int, seed: int = 0) -> Sampler:
  """Cohorts by ``shuffled_epochs`` with the epochs' key fixed by ``seed`` (the round's
  own key is not used: every round of an epoch must see the same permutation)."""
  rounds_per_epoch(num_clients, clients_per_round)   # validates the cohort
  key = jax.random.PRNGKey(seed)
  return lambda _, round_index: shuffled_epochs(key, num_clients, clients_per_round,
                                                round_index)
