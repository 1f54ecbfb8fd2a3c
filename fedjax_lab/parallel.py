"""Backends as objects: the one place that maps over clients and aggregates.

A backend says how the clients of a cohort are placed and run:

* ``LoopBackend``: a Python loop calling one (jitted, or with ``jit=False`` eager)
  client function per client. The round around it is not jitted, so prints and
  breakpoints work; a failing client or aggregation raises ``ForEachClientError``
  naming the stage and the client. The performance baseline.
* ``VmapBackend``: all clients vectorised on one device.
* ``ShardedBackend(mesh)``: the clients axis split over a 1-D device mesh with
  ``jax.shard_map``, ``vmap`` within each device; the cohort is padded to a multiple
  of the device count with zero-weight clients. Multi-host runs use the same code
  after ``jax.distributed.initialize()``.

Every function that takes a ``backend`` accepts one of these objects or its name
(``'loop'``, ``'vmap'``, ``'sharded'``; ``get_backend``). The backend builds the
mapper (``make_mapper``), jits what should be compiled (``jit``), runs rounds
(``scan``, ``scan_rounds``), pads cohorts (``padded_cohort_size``) and prepares
arrays for several processes (``replicate_for_processes``); nothing outside this
module looks at a backend's name.

A mapper runs ``client_fn(shared, one_client) -> (message_up, weight, outputs)`` for
every client of the cohort and reduces the messages with the aggregator INSIDE the
mapped region, so on many devices only the aggregate leaves each device. Aggregators
do not know where the clients are: the backend hands them its ``collectives``
(``transforms.Collectives``: ``sum`` and ``gather`` over clients; the identity on one
device, ``psum`` / ``all_gather`` over the ``'clients'`` axis when sharded).

``chunk_size`` bounds the memory of large cohorts for ``vmap`` and ``sharded``: the
(per-device) clients run as vmapped chunks of ``chunk_size``, one chunk after another
(``map_clients``), so the intermediates of local training exist for one chunk at a
time. An aggregator with a ``stream`` (a weighted sum: ``weighted_mean``,
``norm_bounded_mean``) then adds each chunk's messages to a running sum
(``map_clients_streaming``), so the messages never exist for all ``C`` clients at
once; the other outputs (client states, losses, weights) stay stacked ``[C, ...]``.
Other aggregators (median, Krum, ...) see all the stacked messages.
"""
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_lab import loops
from fedjax_lab.transforms import LOCAL_COLLECTIVES, Aggregator, Collectives, SumStream

CLIENTS_AXIS = "clients"


def client_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all) with the axis ``'clients'``.

  Built from a device array rather than ``jax.make_mesh`` because the latter makes
  Explicit axes, which jit + shard_map over a clients axis does not want.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (CLIENTS_AXIS,))


def validate_chunk_size(chunk_size: Optional[int]) -> None:
  if chunk_size is None:
    return
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer or None (all clients in one "
                     f"vmap), got {chunk_size!r}.")


def _scan_chunks(chunk_fn: Callable, per_client, size: int, carry,
                 vary: Optional[Callable] = None):
  """``lax.scan`` of ``chunk_fn`` over the chunks of ``size`` clients of ``per_client``.

  ``chunk_fn(carry, chunk, fresh) -> (carry, stacked)``: ``chunk`` is ``per_client``'s
  slice ``[size, ...]`` and ``fresh`` bool ``[size]`` is False for the clients an
  earlier chunk already ran (the last chunk's overlap). ``stacked`` (leaves
  ``[size, ...]``) is written into ``[C, ...]`` buffers in client order. ``vary``
  (if given) is applied to the initial carry and buffers, which start as constants
  (a sharded region with the varying-axes check makes them varying).

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
  if vary is not None:
    carry, buffers = vary((carry, buffers))

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


def map_clients(client_fn: Callable, shared, per_client, chunk_size: Optional[int] = None,
                vary: Optional[Callable] = None):
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

  ``vary``: applied to the chunk scan's initial buffers (see ``_scan_chunks``).

  Returns:
    ``client_fn``'s outputs stacked ``[C, ...]`` in client order.
  """
  validate_chunk_size(chunk_size)
  count = jax.tree.leaves(per_client)[0].shape[0]
  vmapped = jax.vmap(client_fn, in_axes=(None, 0))
  if chunk_size is None or chunk_size >= count:
    return vmapped(shared, per_client)
  return _scan_chunks(lambda carry, chunk, fresh: (carry, vmapped(shared, chunk)),
                      per_client, int(chunk_size), (), vary)[1]


def map_clients_streaming(client_fn: Callable, shared, per_client, stream: SumStream,
                          agg_state, chunk_size: Optional[int] = None,
                          vary: Optional[Callable] = None):
  """``map_clients`` whose messages go into ``stream``'s running sum, not a stack.

  Args:
    client_fn: ``(shared, one_client) -> (message_up, weight, outputs)``.
    stream: the aggregator's ``SumStream``; its accumulator is the scan's carry.
    agg_state: the aggregator state ``stream.add`` reads (e.g. a clip norm).
    chunk_size: clients per chunk (None, or ``C`` or more: one chunk).
    vary: applied to the scan's initial accumulator and buffers (``_scan_chunks``).

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

  return _scan_chunks(chunk_fn, per_client, size, stream.zero(message_shapes), vary)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _count(per_client) -> int:
  return jax.tree.leaves(per_client)[0].shape[0]


def streams_aggregate(aggregator: Aggregator, chunk_size: Optional[int], count: int) -> bool:
  """Whether ``count`` clients in chunks of ``chunk_size`` go through the aggregator's stream."""
  return aggregator.stream is not None and chunk_size is not None and chunk_size < count


def _map_and_aggregate(client_fn: Callable, aggregator: Aggregator, chunk_size: Optional[int],
                       shared, per_client, agg_state, collectives: Collectives):
  """All of ``per_client``'s clients here: map (chunked, streamed) and aggregate."""
  if streams_aggregate(aggregator, chunk_size, _count(per_client)):
    acc, outputs = map_clients_streaming(client_fn, shared, per_client, aggregator.stream,
                                         agg_state, chunk_size)
    aggregate, agg_state = aggregator.stream.finish(acc, agg_state, collectives)
    return aggregate, outputs, agg_state
  messages, weights, outputs = map_clients(client_fn, shared, per_client, chunk_size)
  aggregate, agg_state = aggregator.update(messages, weights, agg_state, collectives)
  return aggregate, outputs, agg_state


# -------------------------------------------------------------------------- errors


class ForEachClientError(RuntimeError):
  """A client's local update, or the aggregation, failed on the ``loop`` backend.

  As FedJAX's ``for_each_client`` debug backend: the message names the stage
  (``LOCAL_UPDATE`` or ``AGGREGATION``) and, for a local update, the client's position
  in the cohort and its id when the round passed the ids; the original exception is
  chained (``__cause__``) with its own traceback.

  Attributes:
    stage: ``'local update'`` or ``'aggregation'``.
    position: the client's position in the cohort (None for the aggregation).
    client_id: the client's id (None when unknown, and for the aggregation).
    cohort_size: clients in the (padded) cohort.
  """
  LOCAL_UPDATE = "local update"
  AGGREGATION = "aggregation"

  def __init__(self, stage: str, error: BaseException, position: Optional[int] = None,
               client_id: Optional[int] = None, cohort_size: Optional[int] = None):
    self.stage, self.position, self.client_id, self.cohort_size = (
        stage, position, client_id, cohort_size)
    if position is None:
      where = "" if cohort_size is None else f" (cohort of {cohort_size} clients)"
    else:
      where = f" for the client at cohort position {position}"
      if cohort_size is not None:
        where += f" of {cohort_size}"
      if client_id is not None:
        where += f" (client id {client_id})"
    super().__init__(f"The loop backend's {stage} failed{where}: "
                     f"{type(error).__name__}: {error}")


def _known_ids(client_ids, count: int) -> Optional[np.ndarray]:
  """The ids as numpy, or None when absent or traced (a loop round under ``jax.jit``)."""
  if client_ids is None:
    return None
  try:
    ids = np.asarray(client_ids)
  except Exception:  # pylint: disable=broad-except   (a tracer)
    return None
  return ids if ids.shape == (count,) else None


# ------------------------------------------------------------------------ backends


class Backend:
  """How the clients of a cohort are placed and run; subclass to add one.

  Attributes:
    name: ``'loop'``, ``'vmap'``, ``'sharded'`` (or a subclass's own).
    compiled: whether rounds run as compiled programs (``jit`` and ``scan`` are
      ``jax.jit`` and ``lax.scan``); False on ``loop``, where they run from Python.
    collectives: the ``transforms.Collectives`` aggregators get inside the mapper.
  """
  name: str = "backend"
  compiled: bool = True
  spans_devices: bool = False   # splits its work over the devices of a mesh
  # Runs the cohort as one vectorised program on one device (rounds of one SGD step
  # may then run as one gradient: fedjax_lab.one_step).
  vectorizes_cohort: bool = False
  collectives: Collectives = LOCAL_COLLECTIVES

  def padded_cohort_size(self, cohort_size: int) -> int:
    """Clients the round runs for a cohort of ``cohort_size`` (padding has weight 0)."""
    return cohort_size

  def make_mapper(self, client_fn: Callable, aggregator: Aggregator,
                  chunk_size: Optional[int] = None) -> Callable:
    """``mapper(shared, per_client, agg_state, client_ids=None) -> (aggregate, outputs,
    agg_state)``.

    Args:
      client_fn: ``(shared, one_client) -> (message_up, weight, outputs)``; pure.
      aggregator: reduces the ``message_up`` with the weights (stacked, or streamed),
        given this backend's ``collectives``.
      chunk_size: clients vectorised at once, per device (None: all of them).

    ``per_client`` leaves have a leading clients axis ``[C, ...]``; ``outputs``
    comes back stacked the same way. ``client_ids`` (int ``[C]``, optional) only
    names clients in errors.
    """
    raise NotImplementedError

  def jit(self, fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)``, or ``fn`` itself where nothing is compiled."""
    return jax.jit(fn, **jit_kwargs)

  def scan(self, f: Callable, init, xs=None, length: Optional[int] = None,
           unroll: bool = False):
    """``loops.scan(f, init, xs, length, unroll)`` (a Python loop where nothing is compiled)."""
    return loops.scan(f, init, xs, length=length, unroll=unroll)

  def scan_rounds(self, round_fn: Callable, donate_state: bool = False,
                  max_rounds: Optional[int] = None,
                  on_trace: Optional[Callable[[], None]] = None) -> Callable:
    """``run(state, arrays, offsets, num_rounds) -> (state, metrics [num_rounds])``.

    The rounds ``round_fn(state, arrays, offsets) -> (state, metrics)`` run as one
    jitted ``lax.scan``; with ``donate_state`` the input state's buffers are donated to
    the output. Without ``max_rounds``, ``num_rounds`` is static (one compilation per
    distinct length). With it, every call compiles to the same scan of ``max_rounds``
    steps whose steps past ``num_rounds`` are skipped (``lax.cond``), so chunks of any
    length up to ``max_rounds`` share one compilation. ``on_trace()`` runs each time
    the rounds are traced, i.e. compiled.
    """
    traced = on_trace or (lambda: None)
    if max_rounds is None or max_rounds <= 1 or not self.compiled:
      def run(state, arrays, offsets, num_rounds):
        traced()
        # A single round is no loop (XLA:CPU convolutions are slow inside loops).
        return self.scan(lambda s, _: round_fn(s, arrays, offsets), state, None,
                         length=num_rounds, unroll=num_rounds == 1)
      return self.jit(run, static_argnums=3, donate_argnums=(0,) if donate_state else ())

    probing = [False]   # a trace made only to decide how the rounds run is no compile

    def run_padded(state, arrays, offsets, num_rounds):
      if not probing[0]:
        traced()
      metric_shapes = jax.eval_shape(round_fn, state, arrays, offsets)[1]

      def skip(s):
        return s, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)

      def step(s, i):
        return jax.lax.cond(i < num_rounds, lambda t: round_fn(t, arrays, offsets), skip, s)

      return self.scan(step, state, jnp.arange(max_rounds))

    padded = self.jit(run_padded, donate_argnums=(0,) if donate_state else ())

    def run_one(state, arrays, offsets):
      traced()
      return round_fn(state, arrays, offsets)

    one = self.jit(run_one, donate_argnums=(0,) if donate_state else ())
    from_python = []   # decided at the first call

    def run(state, arrays, offsets, num_rounds):
      if not 0 <= num_rounds <= max_rounds:
        raise ValueError(f"num_rounds={num_rounds} is outside [0, max_rounds={max_rounds}].")
      count = jnp.asarray(num_rounds, jnp.int32)
      if not from_python:
        # Rounds that convolve run one jitted round per Python iteration on the CPU
        # (XLA:CPU's convolutions are slow inside the rounds' scan). The decision reads
        # the scan's own trace, which jit reuses when it compiles the scan.
        convolves = False
        if jax.default_backend() == "cpu":
          probing[0] = True
          try:
            convolves = loops.convolves(padded.trace(state, arrays, offsets, count).jaxpr)
          finally:
            probing[0] = False
          if not convolves:
            traced()   # the probe's trace is the compilation's
        from_python.append(convolves)
      if from_python[0]:
        records = []
        for _ in range(num_rounds):
          state, metrics = one(state, arrays, offsets)
          records.append(metrics)
        if not records:
          return state, jax.tree.map(lambda m: jnp.zeros((0,) + m.shape, m.dtype),
                                     jax.eval_shape(round_fn, state, arrays, offsets)[1])
        return state, jax.tree.map(lambda *rows: jnp.stack(rows), *records)
      state, metrics = padded(state, arrays, offsets, count)
      return state, jax.tree.map(lambda m: m[:num_rounds], metrics)
    return run

  def place_state(self, tree):
    """``tree`` (a run state) placed as the rounds return it, so the first call of the
    compiled rounds and the later ones share one compilation (identity here)."""
    return tree

  def replicate_for_processes(self, tree, what: str = "tree"):
    """``tree`` ready to enter this backend's rounds when several processes run them.

    Identity, except on ``sharded`` with several processes: every leaf becomes a
    global array replicated on the mesh (``distributed.replicate``) and the
    processes are checked to hold the same values (``what`` names them in the error).
    """
    del what
    return tree

  def _key(self) -> tuple:
    return ()

  def __eq__(self, other):
    return type(self) is type(other) and self._key() == other._key()

  def __hash__(self):
    return hash((type(self), self._key()))

  def __repr__(self):
    return f"{type(self).__name__}({', '.join(map(repr, self._key()))})"


class VmapBackend(Backend):
  """All clients vectorised with ``jax.vmap`` on one device (chunked with ``chunk_size``)."""
  name = "vmap"
  vectorizes_cohort = True

  def make_mapper(self, client_fn, aggregator, chunk_size=None):
    validate_chunk_size(chunk_size)

    def mapper(shared, per_client, agg_state, client_ids=None):
      del client_ids
      return _map_and_aggregate(client_fn, aggregator, chunk_size, shared, per_client,
                                agg_state, self.collectives)
    return mapper


class LoopBackend(Backend):
  """A Python loop over the clients, one client function call each: for debugging.

  The round and the rounds are not jitted (``jit`` is the identity, ``scan`` a Python
  loop). A client whose local update raises, or an aggregation that raises, gives a
  ``ForEachClientError`` that names the stage and the client (cohort position, and id
  when the round passes them) and chains the original error.

  Args:
    jit: jit the client function (compiled once, called per client). False runs the
      client and the aggregation under ``jax.disable_jit()``: every operation,
      the local steps' ``lax.scan`` included, runs eagerly on concrete values, so
      ``print``, breakpoints and ``jax.debug_nans`` see the actual numbers. Slow.
  """
  name = "loop"
  compiled = False

  def __init__(self, jit: bool = True):
    self.jit_clients = bool(jit)

  def _key(self):
    return (self.jit_clients,)

  def __repr__(self):
    return f"LoopBackend(jit={self.jit_clients})"

  def jit(self, fn, **jit_kwargs):
    del jit_kwargs
    return fn

  def scan(self, f, init, xs=None, length=None, unroll=False):
    del unroll   # a Python loop already
    # Eager steps take jax arrays (a numpy carry would not accept .at[] updates).
    xs = None if xs is None else jax.tree.map(jnp.asarray, xs)
    return loops.scan(f, jax.tree.map(jnp.asarray, init), xs, length=length, unroll=True)

  def make_mapper(self, client_fn, aggregator, chunk_size=None):
    validate_chunk_size(chunk_size)   # accepted, and moot: one client at a time
    run_client = jax.jit(client_fn) if self.jit_clients else client_fn
    eager = self.jit_clients is False

    def mapper(shared, per_client, agg_state, client_ids=None):
      count = _count(per_client)
      ids = _known_ids(client_ids, count)
      results = []
      for i in range(count):
        one_client = jax.tree.map(lambda x, i=i: x[i], per_client)
        try:
          if eager:
            with jax.disable_jit():
              results.append(run_client(shared, one_client))
          else:
            results.append(run_client(shared, one_client))
        except Exception as e:  # pylint: disable=broad-except
          raise ForEachClientError(
              ForEachClientError.LOCAL_UPDATE, e, position=i, cohort_size=count,
              client_id=None if ids is None else int(ids[i])) from e
      messages, weights, outputs = _stack(results)
      try:
        if eager:
          with jax.disable_jit():
            aggregate, agg_state = aggregator.update(messages, weights, agg_state,
                                                     self.collectives)
        else:
          aggregate, agg_state = aggregator.update(messages, weights, agg_state,
                                                   self.collectives)
      except Exception as e:  # pylint: disable=broad-except
        raise ForEachClientError(ForEachClientError.AGGREGATION, e, cohort_size=count) from e
      return aggregate, outputs, agg_state
    return mapper


def _psum_clients(tree):
  return jax.lax.psum(tree, CLIENTS_AXIS)


def _gather_clients(tree):
  # 'invarying': the gathered cohort is the same on every device (a value the
  # varying-axes check knows is replicated), so statistics of it can leave the region.
  return jax.lax.all_gather(tree, CLIENTS_AXIS, tiled=True, to="invarying")


SHARDED_COLLECTIVES = Collectives(sum=_psum_clients, gather=_gather_clients)


def _to_varying(tree):
  """Each leaf marked as varying over ``'clients'`` (leaves that already vary kept)."""
  def one(x):
    if CLIENTS_AXIS in jax.typeof(x).mat.varying:
      return x
    return jax.lax.pcast(x, CLIENTS_AXIS, to="varying")
  return jax.tree.map(one, tree)


class ShardedBackend(Backend):
  """The clients axis split over a 1-D device mesh (``jax.shard_map``), vmap per device.

  The cohort is padded to a multiple of the device count with zero-weight clients
  (``padded_cohort_size``). A mapper is two ``shard_map`` regions in one program, and
  the messages stay on their devices between them:

  1. local updates: each device runs its clients (``map_clients``, chunked and
     streamed as on ``vmap``); its stacked messages (or its streamed partial sum)
     stay sharded. ``check_vma=False`` here by default: the region has no collective
     and every output is per client, so the check guards nothing, and with it every
     ``lax.scan`` carry that the client code starts from a constant must be made
     varying by that code (``client.local_train``'s step count, loss sums and optax
     state are not, and fail the check). ``check_local_vma=True`` turns it on for
     client functions that do: the shared inputs are then ``pcast`` to varying (else
     ``jax.grad`` w.r.t. the replicated params would be summed over devices) and so
     are the chunk scans' carries.
  2. aggregation: the aggregator gets ``collectives`` (``psum`` and
     ``all_gather(tiled=True)`` over ``'clients'``) with ``check_vma=True``, and the
     aggregate and its state leave replicated (``P()``): an aggregator that forgets a
     collective fails when the round is traced.

  Args:
    mesh: a 1-D mesh with the axis ``'clients'`` (default: ``client_mesh()``, all
      devices of all processes, resolved when first needed).
    check_local_vma: the varying-axes check on the local-update region too (see 1.).
  """
  name = "sharded"
  spans_devices = True
  collectives = SHARDED_COLLECTIVES

  def __init__(self, mesh: Optional[Mesh] = None, check_local_vma: bool = False):
    if mesh is not None and tuple(mesh.axis_names) != (CLIENTS_AXIS,):
      raise ValueError(f"The sharded backend needs a 1-D mesh with the axis "
                       f"{CLIENTS_AXIS!r} (parallel.client_mesh), got axes "
                       f"{tuple(mesh.axis_names)}.")
    self._mesh = mesh
    self.check_local_vma = bool(check_local_vma)

  @property
  def mesh(self) -> Mesh:
    if self._mesh is None:
      self._mesh = client_mesh()
    return self._mesh

  def _key(self):
    return (self.mesh, self.check_local_vma)

  def __repr__(self):
    extra = ", check_local_vma=True" if self.check_local_vma else ""
    return f"ShardedBackend(mesh={self._mesh!r}{extra})"

  def padded_cohort_size(self, cohort_size):
    shards = self.mesh.size
    return -(-cohort_size // shards) * shards

  def place_state(self, tree):
    from fedjax_lab import distributed  # pylint: disable=g-import-not-at-top (it imports us)
    return distributed.replicate(tree, self.mesh)

  def replicate_for_processes(self, tree, what="tree"):
    if jax.process_count() == 1:
      return tree
    from fedjax_lab import distributed  # pylint: disable=g-import-not-at-top (it imports us)
    tree = distributed.replicate(tree, self.mesh)
    distributed.check_same_on_all_processes(tree, what)
    return tree

  def make_mapper(self, client_fn, aggregator, chunk_size=None):
    validate_chunk_size(chunk_size)
    mesh, collectives, checked = self.mesh, self.collectives, self.check_local_vma
    vary = _to_varying if checked else None

    def local_updates(streaming):
      def local_updates_on_device(shared, per_client, agg_state):
        # per_client holds this device's clients only, so chunks are per device.
        if checked:   # per-device copies, so that grads w.r.t. them stay per device
          shared = _to_varying(shared)
        if streaming:
          acc, outputs = map_clients_streaming(client_fn, shared, per_client,
                                               aggregator.stream, agg_state, chunk_size,
                                               vary)
          return jax.tree.map(lambda a: a[None], acc), outputs   # [1, ...] per device
        messages, weights, outputs = map_clients(client_fn, shared, per_client, chunk_size,
                                                 vary)
        return (messages, weights), outputs
      return jax.shard_map(local_updates_on_device, mesh=mesh,
                           in_specs=(P(), P(CLIENTS_AXIS), P()),
                           out_specs=(P(CLIENTS_AXIS), P(CLIENTS_AXIS)),
                           check_vma=checked)

    def aggregation(streaming):
      def aggregate_on_device(uploads, agg_state):
        if streaming:
          acc = jax.tree.map(lambda a: a[0], uploads)
          return aggregator.stream.finish(acc, agg_state, collectives)
        messages, weights = uploads
        return aggregator.update(messages, weights, agg_state, collectives)
      region = jax.shard_map(aggregate_on_device, mesh=mesh, in_specs=(P(CLIENTS_AXIS), P()),
                             out_specs=(P(), P()), check_vma=True)

      def aggregate(uploads, agg_state):
        try:
          return region(uploads, agg_state)
        except ValueError as e:
          if "out_specs" not in str(e):
            raise
          raise ValueError(
              "On the sharded backend the aggregate (out_specs[0]) or the aggregator state "
              "(out_specs[1]) still depends on one device's clients: reduce over all of "
              "them with the collectives the aggregator is given (collectives.sum for "
              "sums, collectives.gather for statistics of the whole cohort). "
              f"shard_map says: {e}") from e
      return aggregate

    def mapper(shared, per_client, agg_state, client_ids=None):
      del client_ids
      count = _count(per_client)
      if count % mesh.size:
        raise ValueError(f"The sharded backend needs a cohort padded to a multiple of "
                         f"{mesh.size} devices, got {count} clients.")
      streaming = streams_aggregate(aggregator, chunk_size, count // mesh.size)
      uploads, outputs = local_updates(streaming)(shared, per_client, agg_state)
      aggregate, agg_state = aggregation(streaming)(uploads, agg_state)
      return aggregate, outputs, agg_state
    return mapper


_BY_NAME = {"loop": LoopBackend, "vmap": VmapBackend, "sharded": ShardedBackend}
BACKENDS = tuple(_BY_NAME)
BackendLike = Union[str, Backend]


def get_backend(backend: BackendLike, mesh: Optional[Mesh] = None) -> Backend:
  """The ``Backend`` for a name (``'loop'``, ``'vmap'``, ``'sharded'``) or a Backend.

  Args:
    backend: a name of ``BACKENDS`` or a ``Backend`` (returned as is).
    mesh: with the name ``'sharded'``, its mesh (default: all devices); ignored by the
      other names. Give a ``ShardedBackend(mesh)`` object its mesh directly.

  Raises:
    ValueError: an unknown name, or a mesh given with a Backend object.
  """
  if isinstance(backend, Backend):
    if mesh is not None:
      raise ValueError(f"Got a mesh and the backend object {backend!r}; give the mesh to "
                       f"ShardedBackend(mesh) instead.")
    return backend
  if not isinstance(backend, str) or backend not in _BY_NAME:
    raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} "
                     f"(or pass a parallel.Backend).")
  if backend == "sharded":
    return ShardedBackend(mesh)
  return _BY_NAME[backend]()


def validate_backend(backend: BackendLike) -> None:
  """Raises ValueError unless ``backend`` is a name of ``BACKENDS`` or a ``Backend``."""
  get_backend(backend)


def padded_cohort_size(cohort_size: int, backend: BackendLike, mesh: Optional[Mesh] = None
                       ) -> int:
  """Cohort size rounded up to a multiple of the device count (sharded only)."""
  return get_backend(backend, mesh).padded_cohort_size(cohort_size)


def make_mapper(client_fn: Callable, aggregator: Aggregator, backend: BackendLike,
                mesh: Optional[Mesh] = None, chunk_size: Optional[int] = None) -> Callable:
  """``get_backend(backend, mesh).make_mapper(client_fn, aggregator, chunk_size)``.

  Returns ``mapper(shared, per_client, agg_state, client_ids=None) -> (aggregate,
  outputs, agg_state)``; see ``Backend.make_mapper``. With ``chunk_size`` below the
  (per-device) cohort and an aggregator that has a ``stream``, the messages are summed
  chunk by chunk (``map_clients_streaming``) and never stacked.
  """
  return get_backend(backend, mesh).make_mapper(client_fn, aggregator, chunk_size)
