"""Aggregators: stacked client messages ``[C, ...]`` + weights ``[C]`` -> one message.

Each runs inside the mapped region on the clients of its placement, and combines the
placements with the ``Collectives`` the backend hands it (``transforms.Collectives``:
``sum`` and ``gather`` over clients; the identity on one device, ``psum`` /
``all_gather`` when the clients are sharded over devices). None of them names a mesh
axis.

Aggregators that are weighted sums (``weighted_mean``, ``norm_bounded_mean``) also
carry a ``SumStream``: a chunked client map then adds each chunk's messages to a
running sum and never holds the ``[C, ...]`` stack. Their ``update`` is the stream
run over the whole cohort at once (``from_stream``), so the two agree by
construction. The robust statistics need every message at once and have none.
"""
from typing import Callable, Optional

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from fedjax_lab import hyperparams
from fedjax_lab.transforms import Aggregator, Collectives, SumStream, as_collectives


def weighted_sum(messages, weights: jax.Array, collectives: Optional[Collectives] = None):
  """``(sum_i w_i m_i, sum_i w_i)`` over all the clients (``collectives.sum`` of the
  placements' partial sums; None: all clients are here)."""
  chex.assert_rank(weights, 1)
  chex.assert_tree_shape_prefix(messages, weights.shape)
  total = jax.tree.map(lambda m: jnp.tensordot(weights.astype(m.dtype), m, axes=1), messages)
  weight = jnp.sum(weights)
  return as_collectives(collectives).sum((total, weight))


def message_shapes(messages):
  """One client's message as ``jax.ShapeDtypeStruct`` leaves (the clients axis dropped)."""
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape[1:], m.dtype), messages)


def from_stream(stream: SumStream, init: Callable[[], object] = lambda: ()) -> Aggregator:
  """The aggregator whose ``update`` runs ``stream`` over all the clients in one chunk."""
  def update(messages, weights, state, collectives=None):
    acc = stream.add(stream.zero(message_shapes(messages)), messages, weights, state)
    return stream.finish(acc, state, collectives)

  return Aggregator(init=init, update=update, stream=stream)


def mean_stream(transform: Optional[Callable] = None,
                reweigh: Optional[Callable] = None) -> SumStream:
  """``sum_i w_i t(m_i) / sum_i w_i`` as a running sum over chunks of clients.

  Args:
    transform: ``messages [K, ...] -> messages [K, ...]``, applied to each client
      on its own (e.g. clipping); None keeps the messages.
    reweigh: ``weights [K] -> weights [K]`` elementwise, mapping 0 to 0; None keeps
      them.

  The accumulator is ``(sum_i w_i t(m_i), sum_i w_i)``, float32 for the weight sum.
  """
  def zero(shapes):
    return (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
            jnp.zeros((), jnp.float32))

  def add(acc, messages, weights, state):
    del state
    if transform is not None:
      messages = transform(messages)
    if reweigh is not None:
      weights = reweigh(weights)
    total, weight = weighted_sum(messages, weights)
    return (jax.tree.map(jnp.add, acc[0], total), acc[1] + weight.astype(acc[1].dtype))

  def finish(acc, state, collectives=None):
    total, weight = as_collectives(collectives).sum(acc)
    mean = jax.tree.map(lambda t: t / jnp.maximum(weight, 1e-12).astype(t.dtype), total)
    return mean, state

  return SumStream(zero=zero, add=add, finish=finish)


def weighted_mean() -> Aggregator:
  """``sum_i w_i m_i / sum_i w_i`` (FedAvg's aggregation, McMahan et al. 2017).

  Zero-weight (padding) clients do not contribute; an all-zero cohort gives zeros.
  Streams (``mean_stream``).
  """
  return from_stream(mean_stream())


# ---------------------------------------------------------------------------
# Robust aggregators.
#
# Each sees the full cohort: ``collectives.gather`` concatenates the placements'
# clients in cohort order (on sharded clients, ``all_gather(tiled=True)`` in device
# order, so the stacked cohort is the same as on one device) and every device computes
# the same statistic. Zero-weight clients (cohort padding, empty clients) never influence
# the result.
#
# Weighting. The coordinate-wise median and trimmed mean (Yin et al. 2018) and
# Multi-Krum's average (Blanchard et al. 2017) are unweighted in their papers and are
# so here by default (``weighted=False``): every client with a positive weight counts
# once, whatever its example count, so the breakdown point counts clients. With
# ``weighted=True`` the statistic uses the client weights (the example counts under
# the usual ``weighting``). The geometric median keeps RFA's weights ``alpha_i``
# (proportional to the example counts) by default, and the norm-bounded mean is
# FedAvg's weighted mean of clipped updates; both take ``weighted=False``.
# ---------------------------------------------------------------------------


def gather_clients(tree, collectives: Optional[Collectives] = None):
  """The full stacked cohort ``[C, ...]`` on every placement (identity on one device)."""
  return as_collectives(collectives).gather(tree)


def _statistic_weights(weights: jax.Array, weighted: bool) -> jax.Array:
  """The weights a statistic uses: ``max(w, 0)``, or (unweighted) 1 for ``w > 0`` else 0.

  Either way a client of weight 0 (padding) gets 0 and is left out.
  """
  weights = jnp.maximum(weights.astype(jnp.float32), 0.0)
  return weights if weighted else (weights > 0).astype(jnp.float32)


def ravel_clients(messages):
  """``[C, D]`` float32 rows (one per client) and ``unravel(row [D]) -> message``."""
  flat = jax.vmap(lambda m: jax.flatten_util.ravel_pytree(m)[0])(messages)
  _, unravel = jax.flatten_util.ravel_pytree(jax.tree.map(lambda x: x[0], messages))
  return flat.astype(jnp.float32), unravel


def _sorted_with_weights(values: jax.Array, weights: jax.Array):
  """Sorts ``values [C, ...]`` along the clients axis; returns (sorted, their weights)."""
  order = jnp.argsort(values, axis=0)
  sorted_values = jnp.take_along_axis(values, order, axis=0)
  return sorted_values, weights[order]


def weighted_quantile_median(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Coordinate-wise weighted median of ``values [C, ...]`` with ``weights [C] >= 0``.

  The median is the value where the cumulative weight of the sorted values reaches
  half the total; when it lands exactly on a boundary the two neighbours are
  averaged, so equal weights give ``np.median``. Zero-weight rows are skipped.
  """
  v, w = _sorted_with_weights(values, weights)
  cum = jnp.cumsum(w, axis=0)
  total = cum[-1]
  lower = jnp.argmax(2 * cum >= total, axis=0)
  upper = jnp.argmax(2 * cum > total, axis=0)
  pick = lambda i: jnp.take_along_axis(v, i[None], axis=0)[0]
  median = 0.5 * (pick(lower) + pick(upper))
  return jnp.where(total > 0, median, 0.0).astype(values.dtype)


def coordinate_median(weighted: bool = False) -> Aggregator:
  """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018, Definition 1).

  ``agg_j = median_i m_ij`` over the ``n`` valid (positive-weight) clients, for every
  coordinate ``j`` of every leaf: ``np.median`` of their values (the mean of the two
  middle values when ``n`` is even). Padding clients (weight 0) are left out.

  Args:
    weighted: False (default, the paper's): every valid client counts once. True:
      the weighted median of ``weighted_quantile_median`` with the client weights
      (the value where the sorted values' cumulative weight reaches half the total).
  """
  def update(messages, weights, state, collectives=None):
    messages, weights = gather_clients((messages, weights), collectives)
    w = _statistic_weights(weights, weighted)
    return jax.tree.map(lambda m: weighted_quantile_median(m, w), messages), state

  return Aggregator(init=lambda: (), update=update)


def _trimmed_mean(values: jax.Array, weights: jax.Array, trim: jax.Array) -> jax.Array:
  """Mean of the sorted values after removing weight ``trim`` from each end.

  Row ``j`` of the sorted values covers the weight interval ``[cum_{j-1}, cum_j]``;
  it keeps the part inside ``[trim, total - trim]`` (boundary rows partially).
  """
  v, w = _sorted_with_weights(values, weights)
  cum = jnp.cumsum(w, axis=0)
  total = cum[-1]
  keep = jnp.clip(jnp.minimum(cum, total - trim) - jnp.maximum(cum - w, trim), 0.0, None)
  kept = total - 2 * trim
  mean = jnp.sum(keep * v, axis=0) / jnp.maximum(kept, 1e-12)
  return jnp.where(kept > 0, mean, 0.0).astype(values.dtype)


def trimmed_mean(beta: float, weighted: bool = False) -> Aggregator:
  """Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018, Definition 2).

  Unweighted (default, the paper's): per coordinate, drop the ``floor(beta * n)``
  largest and smallest of the ``n`` valid (positive-weight) clients' values and
  average the other ``n - 2 floor(beta * n)`` (``scipy.stats.trim_mean``). Weighted:
  drop weight ``beta * W`` (``W`` the total client weight) from each end of the
  sorted values, rows on the boundary counting in part, and take the weighted mean
  of what is left. Padding clients (weight 0) are left out either way.

  Args:
    beta: fraction trimmed from each end, in ``[0, 0.5)``; a number or a scalar array.
    weighted: use the client weights (default False: every valid client weighs 1).
  """
  hyperparams.check(beta, lambda b: 0.0 <= b < 0.5,
                    f"trimmed_mean needs 0 <= beta < 0.5, got beta={beta}.")

  def update(messages, weights, state, collectives=None):
    messages, weights = gather_clients((messages, weights), collectives)
    w = _statistic_weights(weights, weighted)
    total = jnp.sum(w)
    trim = beta * total if weighted else jnp.floor(beta * total)
    return jax.tree.map(lambda m: _trimmed_mean(m, w, trim), messages), state

  return Aggregator(init=lambda: (), update=update)


def _pairwise_sq_distances(flat: jax.Array) -> jax.Array:
  """``[C, C]`` squared Euclidean distances, one row at a time (memory ``C * D``)."""
  return jax.lax.map(lambda row: jnp.sum((flat - row) ** 2, axis=1), flat)


def krum_scores(flat: jax.Array, valid: jax.Array, num_byzantine: jax.Array) -> jax.Array:
  """Krum scores (Blanchard et al., NeurIPS 2017, Sec. 4).

  ``score_i = sum_{i -> j} ||m_i - m_j||^2`` over the ``n - f - 2`` valid clients
  ``j != i`` closest to ``m_i``, ``n`` the number of valid clients and
  ``f = num_byzantine``. The paper assumes ``n > 2f + 2``; outside it the neighbour
  count is clamped to ``[1, n - 1]``. Invalid clients score ``inf``.

  Args:
    flat: ``[C, D]`` client messages.
    valid: bool ``[C]``.
    num_byzantine: int scalar ``f``.
  """
  count = flat.shape[0]
  d2 = _pairwise_sq_distances(flat)
  eye = jnp.eye(count, dtype=bool)
  d2 = jnp.where(valid[None, :] & ~eye, d2, jnp.inf)
  n = jnp.sum(valid.astype(jnp.int32))
  neighbours = jnp.clip(n - num_byzantine - 2, 1, jnp.maximum(n - 1, 0))
  closest = jnp.sort(d2, axis=1)
  take = jnp.arange(count)[None, :] < neighbours
  scores = jnp.sum(jnp.where(take, closest, 0.0), axis=1)
  return jnp.where(valid, scores, jnp.inf)


def _num_byzantine(valid, num_byzantine, byzantine_fraction):
  if num_byzantine is not None:
    return jnp.asarray(num_byzantine, jnp.int32)
  if byzantine_fraction is None:
    return jnp.zeros((), jnp.int32)
  n = jnp.sum(valid.astype(jnp.int32))
  return jnp.floor(byzantine_fraction * n).astype(jnp.int32)


def _check_byzantine(num_byzantine, byzantine_fraction):
  if num_byzantine is not None and byzantine_fraction is not None:
    raise ValueError(f"Give f as num_byzantine (a count) or as byzantine_fraction, not "
                     f"both (got num_byzantine={num_byzantine}, "
                     f"byzantine_fraction={byzantine_fraction}).")
  if num_byzantine is not None and num_byzantine < 0:
    raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}.")
  if byzantine_fraction is not None:
    hyperparams.check(byzantine_fraction, lambda f: 0.0 <= f < 1.0,
                      f"byzantine_fraction must be in [0, 1), got {byzantine_fraction}.")


def multi_krum(num_selected: Optional[int] = None, num_byzantine: Optional[int] = None,
               byzantine_fraction: Optional[float] = None,
               weighted: bool = False) -> Aggregator:
  """Multi-Krum (Blanchard et al., NeurIPS 2017): mean of the ``m`` best-scored clients.

  ``f`` is the count ``num_byzantine``, or ``floor(byzantine_fraction * n)`` for the
  ``n`` valid clients of the round (at most one of the two; neither: ``f = 0``).
  Scores are ``krum_scores``; ``m = num_selected`` or, if None, ``n - f``. The
  selected messages are averaged unweighted, as in the paper (``weighted=True``:
  with the client weights). Ties in score go to the lower cohort position.
  ``byzantine_fraction`` may be a scalar array; ``num_selected`` and
  ``num_byzantine`` are Python ints (or None).
  """
  if num_selected is not None and num_selected < 1:
    raise ValueError(f"multi_krum needs num_selected >= 1 (or None for n - f), got {num_selected}.")
  _check_byzantine(num_byzantine, byzantine_fraction)

  def update(messages, weights, state, collectives=None):
    messages, weights = gather_clients((messages, weights), collectives)
    flat, _ = ravel_clients(messages)
    valid = weights > 0
    f = _num_byzantine(valid, num_byzantine, byzantine_fraction)
    scores = krum_scores(flat, valid, f)
    n = jnp.sum(valid.astype(jnp.int32))
    m = jnp.maximum(n - f, 1) if num_selected is None else num_selected
    rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    selected = valid & (rank < m)
    w = jnp.where(selected, _statistic_weights(weights, weighted), 0.0)
    # A selected client of weight 0 cannot happen (valid means weight > 0). The
    # messages are the gathered cohort: the mean is local.
    return weighted_mean().update(messages, w, state)

  return Aggregator(init=lambda: (), update=update)


def krum(num_byzantine: Optional[int] = None,
         byzantine_fraction: Optional[float] = None) -> Aggregator:
  """Krum (Blanchard et al., NeurIPS 2017): the single message with the lowest score.

  ``f`` as in ``multi_krum``: the count ``num_byzantine`` or
  ``floor(byzantine_fraction * n)``. The weights only mark the valid clients.
  """
  return multi_krum(1, num_byzantine, byzantine_fraction)


def weiszfeld(flat: jax.Array, weights: jax.Array, iterations: int, nu: float = 1e-6):
  """Smoothed Weiszfeld iterations for the weighted geometric median (RFA, Algorithm 3).

  ``z <- sum_i beta_i x_i / sum_i beta_i`` with ``beta_i = w_i / max(nu, ||z - x_i||)``,
  starting from the weighted mean; minimises ``sum_i w_i max(nu, ||z - x_i||)``.

  Args:
    flat: ``[C, D]`` points.
    weights: ``[C]`` non-negative weights.
    iterations: static number of steps.
    nu: smoothing, keeps the step defined when ``z`` hits a point.
  """
  total = jnp.maximum(jnp.sum(weights), 1e-12)
  z = weights @ flat / total

  def step(_, z):
    dist = jnp.sqrt(jnp.sum((flat - z) ** 2, axis=1))
    beta = weights / jnp.maximum(dist, nu)
    return beta @ flat / jnp.maximum(jnp.sum(beta), 1e-30)

  return jax.lax.fori_loop(0, iterations, step, z)


def geometric_median(iterations: int = 10, nu: float = 1e-6, weighted: bool = True) -> Aggregator:
  """Geometric median of the whole messages (RFA: Pillutla, Kakade, Harchaoui 2022).

  ``argmin_z sum_i alpha_i ||z - m_i||`` by ``iterations`` smoothed Weiszfeld steps.
  ``alpha_i`` are the client weights by default, as RFA's (proportional to the
  example counts); ``weighted=False``: 1 for every valid client (the unweighted
  geometric median). Padding clients (weight 0) are left out either way.
  """
  if iterations < 1:
    raise ValueError(f"geometric_median needs iterations >= 1, got {iterations}.")

  def update(messages, weights, state, collectives=None):
    messages, weights = gather_clients((messages, weights), collectives)
    flat, unravel = ravel_clients(messages)
    z = weiszfeld(flat, _statistic_weights(weights, weighted), iterations, nu)
    return unravel(z), state

  return Aggregator(init=lambda: (), update=update)


def clip_clients(messages, max_norm):
  """Scales each client's message to global L2 norm at most ``max_norm`` (optax's rule).

  Returns (clipped messages ``[C, ...]``, norms before clipping ``[C]``).
  """
  clip = optax.clip_by_global_norm(max_norm)
  clipped = jax.vmap(lambda m: clip.update(m, clip.init(m))[0])(messages)
  norms = jax.vmap(optax.tree.norm)(messages)
  return clipped, norms


def norm_bounded_mean(max_norm: float, weighted: bool = True) -> Aggregator:
  """Weighted mean of the messages after clipping each to norm ``max_norm``.

  Norm bounding (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated
  Learning?", 2019): ``sum_i w_i m_i min(1, M / ||m_i||) / sum_i w_i``. Only sums
  cross placements (``collectives.sum``), no gather. Streams (clipping is per client).
  ``max_norm`` is a number or a scalar array.
  """
  hyperparams.check(max_norm, lambda m: m > 0,
                    f"norm_bounded_mean needs max_norm > 0, got {max_norm}.")
  return from_stream(mean_stream(transform=lambda m: clip_clients(m, max_norm)[0],
                                 reweigh=lambda w: _statistic_weights(w, weighted)))


AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
               "norm_bounded")
