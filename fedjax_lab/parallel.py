"""The one place that maps over clients: ``loop``, ``vmap`` and ``sharded``.

A mapper runs ``client_fn(shared, one_client) -> (message_up, weight, outputs)`` for
every client of the cohort and reduces the messages with the aggregator INSIDE the
mapped region, so on many devices only the aggregate leaves each device (``psum``).

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
time; only the stacked messages and outputs ``[C, ...]`` stay whole, and the
aggregator still sees them all inside the mapped region.
"""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_lab.transforms import Aggregator

CLIENTS_AXIS = "clients"
BACKENDS = ("loop", "vmap", "sharded")


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
  size = int(chunk_size)

  def chunk_at(start):
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), per_client)

  one_chunk = jax.tree.map(lambda x: jax.ShapeDtypeStruct((size,) + x.shape[1:], x.dtype),
                           per_client)
  shapes = jax.eval_shape(vmapped, shared, one_chunk)
  buffers = jax.tree.map(lambda s: jnp.zeros((count,) + s.shape[1:], s.dtype), shapes)

  def step(buffers, index):
    start = jnp.minimum(index * size, count - size)
    outputs = vmapped(shared, chunk_at(start))
    buffers = jax.tree.map(lambda b, o: jax.lax.dynamic_update_slice_in_dim(b, o, start, 0),
                           buffers, outputs)
    return buffers, None

  return jax.lax.scan(step, buffers, jnp.arange(-(-count // size)))[0]


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def make_mapper(client_fn: Callable, aggregator: Aggregator, backend: str,
                mesh: Optional[Mesh] = None, chunk_size: Optional[int] = None) -> Callable:
  """Returns ``mapper(shared, per_client, agg_state) -> (aggregate, outputs, agg_state)``.

  Args:
    client_fn: ``(shared, one_client) -> (message_up, weight, outputs)``; pure.
    aggregator: reduces the stacked ``message_up`` with the weights.
    backend: one of ``BACKENDS``.
    mesh: device mesh for ``sharded`` (default: all local devices).
    chunk_size: clients vectorised at once, per device (None: all of them). Bounds
      the memory of local training for large cohorts; ignored by ``loop``, which
      already runs one client at a time.

  ``per_client`` leaves have a leading clients axis ``[C, ...]``; ``outputs`` comes
  back stacked the same way.
  """
  validate_backend(backend)
  validate_chunk_size(chunk_size)

  if backend == "vmap":
    def vmapped(shared, per_client, agg_state):
      messages, weights, outputs = map_clients(client_fn, shared, per_client, chunk_size)
      aggregate, agg_state = aggregator.update(messages, weights, agg_state, None)
      return aggregate, outputs, agg_state
    return vmapped

  if backend == "loop":
    jitted = jax.jit(client_fn)

    def looped(shared, per_client, agg_state):
      count = jax.tree.leaves(per_client)[0].shape[0]
      results = [jitted(shared, jax.tree.map(lambda x, i=i: x[i], per_client))
                 for i in range(count)]
      messages, weights, outputs = _stack(results)
      aggregate, agg_state = aggregator.update(messages, weights, agg_state, None)
      return aggregate, outputs, agg_state
    return looped

  mesh = mesh or client_mesh()

  def per_device(shared, per_client, agg_state):
    # per_client holds this device's clients only, so chunks are per device.
    messages, weights, outputs = map_clients(client_fn, shared, per_client, chunk_size)
    aggregate, agg_state = aggregator.update(messages, weights, agg_state, CLIENTS_AXIS)
    return aggregate, outputs, agg_state

  sharded = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(CLIENTS_AXIS), P()),
      out_specs=(P(), P(CLIENTS_AXIS), P()),
      # Without vma checking, jax.grad w.r.t. the replicated params is per device (with
      # it, it would be summed over devices unless every input were pcast to varying),
      # and any optax transform that starts a counter from a constant composes as is.
      # The aggregator's psum is what makes the outputs replicated.
      check_vma=False)

  def mapper(shared, per_client, agg_state):
    count = jax.tree.leaves(per_client)[0].shape[0]
    if count % mesh.size:
      raise ValueError(f"The sharded backend needs a cohort padded to a multiple of "
                       f"{mesh.size} devices, got {count} clients.")
    return sharded(shared, per_client, agg_state)
  return mapper
