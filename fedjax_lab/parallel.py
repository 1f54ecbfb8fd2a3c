"""The one place that maps over clients: ``loop``, ``vmap`` and ``sharded``.

A mapper runs ``client_fn(shared, one_client) -> (message_up, weight, outputs)`` for
every client of the cohort and reduces the messages with the aggregator INSIDE the
mapped region, so on many devices only the aggregate leaves each device. The
aggregator does not know where the clients are: the mapper hands it the backend's
``Collectives`` (``sum`` / ``gather`` over clients: the identity on ``loop`` and
``vmap``, ``psum`` / ``all_gather`` over the ``'clients'`` axis on ``sharded``).

* ``loop``: a Python loop calling one jitted client function per client (debugging,
  the performance baseline). The round around it is not jitted.
* ``vmap``: all clients vectorised on one device.
* ``sharded``: the clients axis split over a 1-D device mesh with ``jax.shard_map``,
  ``vmap`` within each device; the cohort is padded to a multiple of the device count
  with zero-weight clients. Multi-host runs use the same code after
  ``jax.distributed.initialize()``.

``chunk_size`` bounds the memory of large cohorts for ``vmap`` and ``sharded``: the
(per-device) clients run as vmapped chunks of ``chunk_size``, one chunk after another
(``map_clients``), so the intermediates of local training exist for one chunk at a
time. An aggregator with a ``stream`` (a weighted sum: ``weighted_mean``,
``norm_bounded_mean``) then adds each chunk's messages to a running sum
(``map_clients_streaming``), so the messages never exist for all ``C`` clients at
once; the other outputs (client states, losses, weights) stay stacked ``[C, ...]``.
Other aggregators (median, Krum, ...) see all the stacked messages.
"""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_lab.transforms import LOCAL_COLLECTIVES, Aggregator, Collectives, SumStream

CLIENTS_AXIS = "clients"
BACKENDS = ("loop", "vmap", "sharded")

# The sharded backend's reductions over the clients axis.
SHARDED_COLLECTIVES = Collectives(
    sum=lambda tree: jax.lax.psum(tree, CLIENTS_AXIS),
    gather=lambda tree: jax.lax.all_gather(tree, CLIENTS_AXIS, tiled=True))


def validate_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")


def client_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all) with the axis ``'clients'``.

  Built from a device array rather than ``jax.make_mesh`` because the latter makes
  Explicit axes, which jit + shard_map over a clients axis does not want.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (CLIENTS_AXIS,))


def padded_cohort_size(cohort_size: int, backend: str, mesh: Optional[Mesh] = None) -> int:
  """Cohort size rounded up to a multiple of the device count (sharded only)."""
  if backend != "sharded":
    return cohort_size
  shards = (mesh or client_mesh()).size
  return -(-cohort_size // shards) * shards


def validate_chunk_size(chunk_size: Optional[int]) -> None:
  if chunk_size is None:
    return
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer or None (all clients in one "
                     f"vmap), got {chunk_size!r}.")


def _scan_chunks(chunk_fn: Callable, per_client, size: int, carry):
  """``lax.scan`` of ``chunk_fn`` over the chunks of ``size`` clients of ``per_client``.

  ``chunk_fn(carry, chunk, fresh) -> (carry, stacked)``: ``chunk`` is ``per_client``'s
  slice ``[size, ...]`` and ``fresh`` bool ``[size]`` is False for the clients an
  earlier chunk already ran (the last chunk's overlap). ``stacked`` (leaves
  ``[size, ...]``) is written into ``[C, ...]`` buffers in client order.

  Returns:
    ``(carry, stacked [C, ...])``.
  """
  count = jax.tree.leaves(per_client)[0].shape[0]

  def chunk_at(start):
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), per_client)

  one_chunk = jax.tree.map(lambda x: jax.ShapeDtypeStruct((size,) + x.shape[1:], x.dtype),
                           per_client)
  fresh_shape = jax.ShapeDtypeStruct((size,), jnp.bool_)
  shapes = jax.eval_shape(chunk_fn, carry, one_chunk, fresh_shape)[1]
  buffers = jax.tree.map(lambda s: jnp.zeros((count,) + s.shape[1:], s.dtype), shapes)

  def step(state, index):
    carry, buffers = state
    # The last chunk ends at the cohort's end; it may start inside the one before.
    start = jnp.minimum(index * size, count - size)
    fresh = start + jnp.arange(size) >= index * size
    carry, stacked = chunk_fn(carry, chunk_at(start), fresh)
    buffers = jax.tree.map(lambda b, o: jax.lax.dynamic_update_slice_in_dim(b, o, start, 0),
                           buffers, stacked)
    return (carry, buffers), None

  return jax.lax.scan(step, (carry, buffers), jnp.arange(-(-count // size)))[0]


def map_clients(client_fn: Callable, shared, per_client, chunk_size: Optional[int] = None):
  """``client_fn(shared, .)`` over the leading clients axis of ``per_client``.

  One ``vmap`` over all ``C`` clients, or, when ``chunk_size < C``, a ``lax.scan`` over
  ``ceil(C / chunk_size)`` vmapped chunks that writes each chunk's outputs into one
  ``[C, ...]`` buffer. Chunks are read with ``dynamic_slice`` from the cohort as it
  is; when ``chunk_size`` does not divide ``C`` the last chunk starts at
  ``C - chunk_size`` and recomputes up to ``chunk_size - 1`` clients of the one
  before (same inputs, same outputs) rather than a smaller remainder.

  Why not ``jax.lax.map(..., batch_size=chunk_size)``: for a remainder it traces the
  client a second time (a separate, smaller vmap) and concatenates, which copies the
  stacked outputs and the cohort's data; at 512 clients and a chunk of 13 its compiled
  temporaries were as large as the unchunked vmap's.

  Returns:
    ``client_fn``'s outputs stacked ``[C, ...]`` in client order.
  """
  validate_chunk_size(chunk_size)
  count = jax.tree.leaves(per_client)[0].shape[0]
  vmapped = jax.vmap(client_fn, in_axes=(None, 0))
  if chunk_size is None or chunk_size >= count:
    return vmapped(shared, per_client)
  return _scan_chunks(lambda carry, chunk, fresh: (carry, vmapped(shared, chunk)),
                      per_client, int(chunk_size), ())[1]


def map_clients_streaming(client_fn: Callable, shared, per_client, stream: SumStream,
                          agg_state, chunk_size: Optional[int] = None):
  """``map_clients`` whose messages go into ``stream``'s running sum, not a stack.

  Args:
    client_fn: ``(shared, one_client) -> (message_up, weight, outputs)``.
    stream: the aggregator's ``SumStream``; its accumulator is the scan's carry.
    agg_state: the aggregator state ``stream.add`` reads (e.g. a clip norm).
    chunk_size: clients per chunk (None, or ``C`` or more: one chunk).

  Returns:
    ``(acc, outputs)``: the accumulator over all ``C`` clients, each added once (the
    clients the last chunk recomputes are added with weight 0), not yet
    ``stream.finish``-ed; ``outputs`` stacked ``[C, ...]``.
  """
  validate_chunk_size(chunk_size)
  count = jax.tree.leaves(per_client)[0].shape[0]
  size = count if chunk_size is None else min(int(chunk_size), count)
  vmapped = jax.vmap(client_fn, in_axes=(None, 0))
  one_client = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), per_client)
  message_shapes = jax.eval_shape(client_fn, shared, one_client)[0]

  def chunk_fn(acc, chunk, fresh):
    messages, weights, outputs = vmapped(shared, chunk)
    weights = jnp.where(fresh, weights, jnp.zeros_like(weights))
    return stream.add(acc, messages, weights, agg_state), outputs

  return _scan_chunks(chunk_fn, per_client, size, stream.zero(message_shapes))


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def make_mapper(client_fn: Callable, aggregator: Aggregator, backend: str,
                mesh: Optional[Mesh] = None, chunk_size: Optional[int] = None) -> Callable:
  """Returns ``mapper(shared, per_client, agg_state) -> (aggregate, outputs, agg_state)``.

  Args:
    client_fn: ``(shared, one_client) -> (message_up, weight, outputs)``; pure.
    aggregator: reduces the ``message_up`` with the weights (stacked, or streamed),
      given the backend's ``Collectives``.
    backend: one of ``BACKENDS``.
    mesh: device mesh for ``sharded`` (default: all local devices).
    chunk_size: clients vectorised at once, per device (None: all of them). Bounds
      the memory of local training for large cohorts; ignored by ``loop``, which
      already runs one client at a time.

  ``per_client`` leaves have a leading clients axis ``[C, ...]``; ``outputs`` comes
  back stacked the same way. With ``chunk_size`` below the (per-device) cohort and
  an aggregator that has a ``stream``, the messages are summed chunk by chunk
  (``map_clients_streaming``) and never stacked.
  """
  validate_backend(backend)
  validate_chunk_size(chunk_size)

  def map_and_aggregate(shared, per_client, agg_state, collectives):
    count = jax.tree.leaves(per_client)[0].shape[0]
    if aggregator.stream is not None and chunk_size is not None and chunk_size < count:
      acc, outputs = map_clients_streaming(client_fn, shared, per_client, aggregator.stream,
                                           agg_state, chunk_size)
      aggregate, agg_state = aggregator.stream.finish(acc, agg_state, collectives)
      return aggregate, outputs, agg_state
    messages, weights, outputs = map_clients(client_fn, shared, per_client, chunk_size)
    aggregate, agg_state = aggregator.update(messages, weights, agg_state, collectives)
    return aggregate, outputs, agg_state

  if backend == "vmap":
    return lambda shared, per_client, agg_state: map_and_aggregate(
        shared, per_client, agg_state, LOCAL_COLLECTIVES)

  if backend == "loop":
    jitted = jax.jit(client_fn)

    def looped(shared, per_client, agg_state):
      count = jax.tree.leaves(per_client)[0].shape[0]
      results = [jitted(shared, jax.tree.map(lambda x, i=i: x[i], per_client))
                 for i in range(count)]
      messages, weights, outputs = _stack(results)
      aggregate, agg_state = aggregator.update(messages, weights, agg_state, LOCAL_COLLECTIVES)
      return aggregate, outputs, agg_state
    return looped

  mesh = mesh or client_mesh()

  def per_device(shared, per_client, agg_state):
    # per_client holds this device's clients only, so chunks are per device.
    return map_and_aggregate(shared, per_client, agg_state, SHARDED_COLLECTIVES)

  sharded = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(CLIENTS_AXIS), P()),
      out_specs=(P(), P(CLIENTS_AXIS), P()),
      # Without vma checking, jax.grad w.r.t. the replicated params is per device (with
      # it, it would be summed over devices unless every input were pcast to varying),
      # and any optax transform that starts a counter from a constant composes as is.
      # The aggregator's collectives (psum) are what make the outputs replicated.
      check_vma=False)

  def mapper(shared, per_client, agg_state):
    count = jax.tree.leaves(per_client)[0].shape[0]
    if count % mesh.size:
      raise ValueError(f"The sharded backend needs a cohort padded to a multiple of "
                       f"{mesh.size} devices, got {count} clients.")
    return sharded(shared, per_client, agg_state)
  return mapper
