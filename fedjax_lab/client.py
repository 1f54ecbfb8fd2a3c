"""Local training: the first step, then one ``lax.scan`` over the rest, on padded,
masked client data.

Every client of a cohort holds ``max_examples`` rows of which the first ``size`` are
real. The schedule turns (step, size) into the indices and mask of one batch, so
clients of different sizes run in one vmapped call: a step whose batch holds no real
example leaves params and optimizer state untouched, and padded rows inside a batch
are masked out of the loss.
"""
import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import loops
from fedjax_lab.transforms import GradientOracle
from fedjax_lab.types import Params, PRNGKey, PyTree


@dataclasses.dataclass(frozen=True)
class LocalSchedule:
  """How many local steps a client runs and on which examples.

  At most one of ``epochs`` and ``steps`` is set; neither means one epoch.

  Attributes:
    batch_size: examples per step; None means the client's whole data (full batch).
    epochs: passes over the client's data; a client with n examples runs
      ``epochs * ceil(n / batch_size)`` real steps (the rest of the static scan is masked).
    steps: a fixed number of steps for every non-empty client, cycling through one
      shuffle of its data.
    shuffle: reshuffle each epoch (epochs mode) or once per round (steps mode).
    unroll: unroll the scan of local steps (None: ``loops.unroll_steps`` decides).
  """
  batch_size: Optional[int] = 32
  epochs: Optional[int] = None
  steps: Optional[int] = None
  shuffle: bool = True
  # Unroll the local steps' scan: None decides (loops.unroll_steps: on the CPU when a
  # step convolves); the numbers are the same either way.
  unroll: Optional[bool] = None

  def __post_init__(self):
    if self.epochs is None and self.steps is None:
      object.__setattr__(self, "epochs", 1)
    if self.epochs is not None and self.steps is not None:
      raise ValueError(f"LocalSchedule needs exactly one of epochs and steps, got "
                       f"epochs={self.epochs}, steps={self.steps}.")
    for name in ("epochs", "steps", "batch_size"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"LocalSchedule.{name} must be positive, got {value}.")

  def resolved_batch_size(self, max_examples: int) -> int:
    return max_examples if self.batch_size is None else self.batch_size

  def num_steps(self, max_examples: int) -> int:
    """Static length of the local scan for clients padded to ``max_examples``."""
    if self.steps is not None:
      return self.steps
    return self.epochs * math.ceil(max_examples / self.resolved_batch_size(max_examples))


def _orders(rng: PRNGKey, size: jax.Array, max_examples: int, num_orders: int,
            shuffle: bool) -> jax.Array:
  """``[num_orders, max_examples]`` permutations with the real examples first.

  Each is the stable argsort of ``jax.random.uniform`` keys for the real slots and
  ``2 + slot`` for the padded ones. Uniform draws ``bits >> 9`` times 2^-23, so its
  order is that of the 23-bit integers; sorting those is cheaper on the CPU. With
  partitionable threefry (JAX's default), ``bits(key, (n,))[:m]`` does not depend on
  n, so the order of the real examples does not depend on how far the client was padded.
  """
  slots = jnp.arange(max_examples)
  if not shuffle:
    return jnp.broadcast_to(slots, (num_orders, max_examples))

  def one(order_index):
    bits = jax.random.bits(jax.random.fold_in(rng, order_index), (max_examples,), jnp.uint32)
    keys = jnp.where(slots < size, bits >> 9, (1 << 23) + slots.astype(jnp.uint32))
    return stable_argsort(keys)

  return jax.vmap(one)(jnp.arange(num_orders))


# Up to this many keys, counting comparisons beats XLA:CPU's sort (15x for 1,000 clients
# x 5 epochs of 32 keys) in one fused loop; from 48 keys XLA keeps the n x n comparisons
# in memory (46 MB there) and the gain is 1.2x.
COMPARISON_SORT_MAX = 32
# Up to this many keys below 2^24, a key and its index fit one uint32, and XLA:CPU sorts
# a single integer array 6-8x faster than it argsorts (32 clients of 128 keys: 61 against
# 388 us; 23 of 160: 60 against 482 us).
PACKED_SORT_MAX = 256
PACKED_KEY_BITS = 24


def stable_argsort(keys: jax.Array) -> jax.Array:
  """``jnp.argsort(keys, stable=True)`` of a 1-D array of uint32 keys below 2^24.

  Up to ``COMPARISON_SORT_MAX`` keys by counting, for each key, the keys before it
  (smaller, or equal at a lower index); up to ``PACKED_SORT_MAX`` by sorting
  ``key << 8 | index`` (unique, so any sort is stable); longer ones by ``jnp.argsort``.
  """
  n = keys.shape[0]
  index = jnp.arange(n)
  if n <= COMPARISON_SORT_MAX:
    before = ((keys[None, :] < keys[:, None])
              | ((keys[None, :] == keys[:, None]) & (index[None, :] < index[:, None])))
    rank = jnp.sum(before, axis=1, dtype=index.dtype)     # where key i goes
    return jnp.sum(jnp.where(rank[None, :] == index[:, None], index[None, :], 0), axis=1)
  if n <= PACKED_SORT_MAX:
    shift = 32 - PACKED_KEY_BITS
    packed = (keys.astype(jnp.uint32) << shift) | index.astype(jnp.uint32)
    return (jnp.sort(packed) & ((1 << shift) - 1)).astype(index.dtype)
  return jnp.argsort(keys, stable=True)


def batch_plan(schedule: LocalSchedule, size: jax.Array, max_examples: int,
               rng: PRNGKey) -> tuple[jax.Array, jax.Array]:
  """Indices and mask of every local step.

  Args:
    schedule: the local schedule.
    size: int scalar, the client's real example count (0 for a padding client).
    max_examples: static padded length.
    rng: the client's shuffle key.

  Returns:
    (indices int32 [num_steps, B], mask bool [num_steps, B]).
  """
  batch = schedule.resolved_batch_size(max_examples)
  num_steps = schedule.num_steps(max_examples)
  if schedule.steps is not None:
    order = _orders(rng, size, max_examples, 1, schedule.shuffle)[0]
    positions = jnp.arange(num_steps * batch).reshape(num_steps, batch)
    indices = order[positions % jnp.maximum(size, 1)]
    mask = jnp.broadcast_to(size > 0, indices.shape)
    return indices, mask
  steps_per_epoch = num_steps // schedule.epochs
  orders = _orders(rng, size, max_examples, schedule.epochs, schedule.shuffle)
  within = jnp.arange(steps_per_epoch * batch).reshape(steps_per_epoch, batch)
  mask = jnp.tile(within < size, (schedule.epochs, 1))
  indices = orders[:, jnp.minimum(within, max_examples - 1)]   # [epochs, steps_per_epoch, B]
  return indices.reshape(num_steps, batch), mask


class LocalResult(NamedTuple):
  """What local training hands to the method's ``client_final``."""
  params: Params          # params after the last local step
  opt_state: PyTree       # client optimizer state after the last step
  oracle_state: PyTree
  num_steps: jax.Array    # int32, steps that saw at least one real example
  mean_loss: jax.Array    # mean batch loss over those steps
  aux_totals: dict        # each oracle aux scalar summed over those steps


def _select(flag, new, old):
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def local_train(oracle: GradientOracle, client_tx: optax.GradientTransformationExtraArgs,
                schedule: LocalSchedule, params: Params, data: dict[str, jax.Array],
                size: jax.Array, rng: PRNGKey, extra_args: dict[str, Any],
                max_examples: int, oracle_state: PyTree = None,
                step_limit: Optional[jax.Array] = None) -> LocalResult:
  """Runs the local steps of one client: the first, then a ``lax.scan`` of the rest.

  Args:
    oracle: gradient oracle.
    client_tx: optax transform applied to each step's gradients; receives
      ``extra_args`` as keyword arguments.
    schedule: local schedule.
    params: starting params (the broadcast model).
    data: the client's arrays, each ``[max_examples, ...]``.
    size: number of real rows.
    rng: the client's key for this round.
    extra_args: keyword arguments for ``client_tx.update``.
    max_examples: static padded length.
    oracle_state: the oracle's starting state (None: ``oracle.init(params)``), e.g.
      a query history kept in the client's persistent state.
    step_limit: optional int scalar; the steps after the first ``step_limit`` real
      ones (steps that see an example) are masked, so a per-round number of local
      steps (e.g. decaying) keeps static shapes.
  """
  shuffle_key, step_key = jax.random.split(rng)
  indices, mask = batch_plan(schedule, size, max_examples, shuffle_key)
  opt_state = client_tx.init(params)
  if oracle_state is None:
    oracle_state = oracle.init(params)
  if step_limit is not None:
    # Counted over real steps: with several epochs a small client's empty steps sit
    # between its epochs.
    real = jnp.any(mask, axis=1).astype(jnp.int32)
    mask = mask & ((jnp.cumsum(real) - real) < step_limit)[:, None]
  def gather_batch(step_indices, step_mask):
    # The indices are in bounds: "clip" gathers without take's fill (a select per row).
    batch = {name: jnp.take(array, step_indices, axis=0, mode="clip")
             for name, array in data.items()}
    return {**batch, "mask": step_mask}

  # One trace of a step's gradients gives the aux shapes and what decides unrolling.
  oracle_jaxpr, aux_template = jax.make_jaxpr(
      lambda: oracle.update(params, gather_batch(indices[0], mask[0]), step_key, oracle_state)[1],
      return_shape=True)()
  aux_zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_template)

  def step(carry, plan):
    params, opt_state, oracle_state, num_steps, aux_sum = carry
    k, step_indices, step_mask = plan
    grads, aux, new_oracle_state = oracle.update(
        params, gather_batch(step_indices, step_mask), jax.random.fold_in(step_key, k), oracle_state)
    updates, new_opt_state = client_tx.update(grads, opt_state, params, **extra_args)
    new_params = optax.apply_updates(params, updates)
    active = jnp.any(step_mask)
    carry = (_select(active, new_params, params),
             _select(active, new_opt_state, opt_state),
             _select(active, new_oracle_state, oracle_state),
             num_steps + active.astype(jnp.int32),
             jax.tree.map(lambda t, a: t + jnp.where(active, a, 0), aux_sum, aux))
    return carry, None

  init = (params, opt_state, oracle_state, jnp.zeros((), jnp.int32), aux_zeros)
  steps = jnp.arange(indices.shape[0])
  if indices.shape[0] > 0:
    # The first step outside the scan: there the params are still the broadcast ones,
    # so under vmap its forward and input gradients are one matmul over every
    # client's examples (a scan's carry is batched from its first step on).
    init, _ = step(init, (steps[0], indices[0], mask[0]))
    steps, indices, mask = steps[1:], indices[1:], mask[1:]
  unroll = schedule.unroll
  if unroll is None:
    unroll = loops.unroll_steps(loops.primitive_names(oracle_jaxpr), indices.shape[0])
  (params, opt_state, oracle_state, num_steps, aux_sum), _ = loops.scan(
      step, init, (steps, indices, mask), unroll=bool(unroll))
  mean_loss = aux_sum["loss"] / jnp.maximum(num_steps, 1).astype(aux_sum["loss"].dtype)
  return LocalResult(params, opt_state, oracle_state, num_steps, mean_loss, aux_sum)
