"""Host-side cohort streaming with prefetch, for populations too large for device memory.

The packed path (``FederatedData.device_arrays`` + ``gather_cohort`` inside the
jitted round) keeps every example on the device. Here the examples stay on the
host (numpy arrays, or any reader with ``client(i)`` such as
``sqlite_source.SQLiteClients``) and only one cohort's rows are on the device at a
time. A background thread gathers the cohorts of the next ``prefetch`` rounds and
copies them to the device while the current round runs.

Cohort ids are the engine's own (``algorithm.sample_cohort`` on the round's key),
computed ahead of time, so a streamed run samples the same clients, and gives the
same rounds, as the packed run with the same seed.

Two layouts:

* ``'packed'``: ``(arrays [capacity, ...], offsets [num_clients + 1])`` in which only
  the cohort's clients hold rows; ``gather_cohort`` on it returns exactly what it
  returns on the full data, so the engine's unchanged round (``algorithm.make_round``)
  consumes it. ``capacity = clients_per_round * max_examples`` is static: one
  compilation for the whole run.
* ``'padded'``: the ``gather_cohort`` layout itself, ``{name: [C, max_examples, ...]}``
  plus ``sizes [C]``, for research code with its own round.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence

import jax
import numpy as np

LAYOUTS = ("packed", "padded")


class ClientSource(Protocol):
  """What streaming reads: FederatedData, ``sqlite_source.SQLiteClients``, ..."""
  num_clients: int
  client_sizes: np.ndarray

  def client(self, i: int) -> Mapping[str, np.ndarray]:
    ...


class TransformedClients:
  """``source`` with ``fn`` applied to every client's arrays (``fn`` must keep the row count).

  E.g. ``TransformedClients(SQLiteClients(path), lambda ex: sqlite_source.task_arrays(
  'emnist', '', ex))`` streams EMNIST straight from the SQLite file.
  """

  def __init__(self, source: ClientSource, fn: Callable[[Mapping[str, np.ndarray]], Mapping]):
    self.source, self.fn = source, fn
    self.num_clients = source.num_clients
    self.client_sizes = np.asarray(source.client_sizes)

  def client(self, i: int) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v) for k, v in self.fn(self.source.client(i)).items()}
    if any(v.shape[0] != self.client_sizes[i] for v in out.values()):
      raise ValueError(f"the transform changed client {i}'s row count from {self.client_sizes[i]}")
    return out


def _template(source: ClientSource) -> dict[str, np.ndarray]:
  """One row per feature (shape and dtype) from the first non-empty client."""
  sizes = np.asarray(source.client_sizes)
  nonempty = np.flatnonzero(sizes > 0)
  if nonempty.size == 0:
    raise ValueError("every client is empty: nothing to stream")
  return {k: np.asarray(v)[:1] for k, v in source.client(int(nonempty[0])).items()}


def _rows(source: ClientSource, i: int, limit: int, template) -> dict[str, np.ndarray]:
  rows = {k: np.asarray(v)[:limit] for k, v in source.client(i).items()}
  if set(rows) != set(template):
    raise ValueError(f"client {i} has features {sorted(rows)}, expected {sorted(template)}")
  for k, v in rows.items():
    if v.shape[1:] != template[k].shape[1:]:
      raise ValueError(f"client {i}: feature {k!r} has shape {v.shape[1:]}, "
                       f"expected {template[k].shape[1:]}")
  return rows


def host_gather(source: ClientSource, cohort_ids: Sequence[int], max_examples: int,
                template: Optional[Mapping[str, np.ndarray]] = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """numpy twin of ``gather_cohort``: ``({name: [C, max_examples, ...]}, sizes int32 [C])``.

  Ids outside ``[0, num_clients)`` are padding clients (size 0, zero rows); larger
  clients keep their first ``max_examples`` rows.
  """
  template = template or _template(source)
  ids = np.asarray(cohort_ids).reshape(-1)
  cohort = {k: np.zeros((ids.shape[0], max_examples) + v.shape[1:], v.dtype)
            for k, v in template.items()}
  sizes = np.zeros(ids.shape[0], np.int32)
  for j, i in enumerate(ids.tolist()):
    if not 0 <= i < source.num_clients:
      continue
    rows = _rows(source, i, max_examples, template)
    sizes[j] = min(int(source.client_sizes[i]), max_examples)
    for k, v in rows.items():
      cohort[k][j, :sizes[j]] = v[:sizes[j]]
  return cohort, sizes


def pack_cohort(source: ClientSource, cohort_ids: Sequence[int], max_examples: int,
                capacity: int, template: Optional[Mapping[str, np.ndarray]] = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """A packed dataset holding only the cohort's rows: ``(arrays [capacity, ...], offsets)``.

  Client ``c`` of the cohort owns ``min(size_c, max_examples)`` rows at
  ``offsets[c]``, every other client owns none, and rows past the last client are
  zero. Hence ``gather_cohort(arrays, offsets, ids, max_examples)`` equals the
  gather from the full data for these ``ids``.

  Returns:
    ``arrays`` name -> ``[capacity, ...]`` and int32 ``offsets [num_clients + 1]``.
  """
  template = template or _template(source)
  ids = np.asarray(cohort_ids).reshape(-1)
  members = np.unique(ids[(ids >= 0) & (ids < source.num_clients)])
  counts = np.zeros(source.num_clients, np.int64)
  counts[members] = np.minimum(np.asarray(source.client_sizes)[members], max_examples)
  offsets = np.concatenate([[0], np.cumsum(counts)])
  if offsets[-1] > capacity:
    raise ValueError(f"the cohort holds {offsets[-1]} rows, more than capacity={capacity}")
  arrays = {k: np.zeros((capacity,) + v.shape[1:], v.dtype) for k, v in template.items()}
  for i in members.tolist():
    rows = _rows(source, i, max_examples, template)
    for k, v in rows.items():
      arrays[k][offsets[i]:offsets[i + 1]] = v[:counts[i]]
  return arrays, offsets.astype(np.int32)


class _RoundKey(NamedTuple):
  """What ``algorithm.sample_cohort`` reads from a server state."""
  rng: jax.Array
  round: jax.Array


class StreamItem(NamedTuple):
  """One round's cohort on the device.

  ``packed`` layout: ``data = (arrays, offsets)`` for ``round_fn(state, *item.data)``;
  ``padded`` layout: ``data = (cohort, sizes)`` as ``gather_cohort`` returns them.
  """
  round: int
  ids: np.ndarray
  data: tuple


class CohortStream:
  """Iterator over the cohorts of consecutive rounds, prefetched by a host thread.

  Args:
    source: the population (``FederatedData`` or any ``ClientSource``).
    state: the server state the run starts from (its ``rng`` and ``round`` fix
      the cohorts).
    clients_per_round: cohort size C.
    num_rounds: rounds to stream (None: until ``close``).
    layout: ``'packed'`` or ``'padded'`` (see the module docstring).
    max_examples: row budget per client (default: the largest client, as the
      packed round uses).
    prefetch: cohorts gathered ahead of the consumer.
    device: where to put the arrays (default: JAX's default device).

  Use as ``with CohortStream(...) as stream: for item in stream: ...``.
  """

  def __init__(self, source: ClientSource, state: Any, clients_per_round: int,
               num_rounds: Optional[int] = None, layout: str = "packed",
               max_examples: Optional[int] = None, prefetch: int = 2, device=None):
    from fedjax_lab import algorithm as algorithm_lib  # lazy: the engine imports this package
    from fedjax_lab import sampling

    if layout not in LAYOUTS:
      raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if prefetch < 1:
      raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    sampling.validate_cohort(source.num_clients, clients_per_round)
    self.source, self.layout, self.device = source, layout, device
    self.clients_per_round = int(clients_per_round)
    sizes = np.asarray(source.client_sizes)
    self.max_examples = int(sizes.max()) if max_examples is None else int(max_examples)
    self.capacity = self.clients_per_round * self.max_examples
    self._template = _template(source)
    num_clients = source.num_clients
    self._ids_fn = jax.jit(lambda key: algorithm_lib.sample_cohort(
        key, num_clients, self.clients_per_round)[0])
    self._rng = state.rng
    self._start = int(state.round)
    self._stop = None if num_rounds is None else self._start + int(num_rounds)
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def cohort_ids(self, round_index: int) -> np.ndarray:
    """int32 ``[C]``: the clients the engine samples in round ``round_index``."""
    key = _RoundKey(self._rng, jax.numpy.asarray(round_index, jax.numpy.int32))
    return np.asarray(self._ids_fn(key))

  def make(self, round_index: int) -> StreamItem:
    """Gathers round ``round_index``'s cohort and puts it on the device (no prefetch)."""
    ids = self.cohort_ids(round_index)
    if self.layout == "packed":
      host = pack_cohort(self.source, ids, self.max_examples, self.capacity, self._template)
    else:
      host = host_gather(self.source, ids, self.max_examples, self._template)
    return StreamItem(round_index, ids, jax.device_put(host, self.device))

  def _put(self, item) -> bool:
    """Blocks until ``item`` is queued or the stream is closed."""
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self):
    r = self._start
    try:
      while (self._stop is None or r < self._stop) and self._put(self.make(r)):
        r += 1
      self._put(StopIteration())
    except BaseException as e:  # surfaced in the consumer's thread
      self._put(e)

  def __iter__(self):
    return self

  def __next__(self) -> StreamItem:
    if self._closed.is_set():
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, StopIteration):
      self._closed.set()
      raise StopIteration
    if isinstance(item, BaseException):
      self.close()
      raise item
    return item

  def close(self):
    """Stops the producer thread."""
    self._closed.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _StreamedCohorts:
  """A rounds-loop action that feeds every round the cohort a ``CohortStream`` gathered."""

  def __init__(self, source: ClientSource, clients_per_round: int, rounds: int, prefetch: int):
    self.source, self.clients_per_round = source, clients_per_round
    self.rounds, self.prefetch, self.stream = rounds, prefetch, None

  def next_stop(self, current):
    return current + 1

  def start(self, loop):
    self.stream = CohortStream(self.source, loop.state, self.clients_per_round,
                               self.rounds - loop.round, "packed", prefetch=self.prefetch)
    if loop.round < self.rounds:
      loop.arrays, loop.offsets = next(self.stream).data

  def __call__(self, loop):
    # The next cohort was gathered by the host thread while this round ran.
    if loop.round < self.rounds:
      loop.arrays, loop.offsets = next(self.stream).data

  def close(self):
    if self.stream is not None:
      self.stream.close()


def run_streamed(algorithm, init_params, source: ClientSource, rounds: int,
                 clients_per_round: int, backend="vmap", seed: int = 0,
                 prefetch: int = 2, state=None):
  """Runs ``rounds`` rounds of ``algorithm`` with host-streamed cohorts.

  The rounds loop is ``training.train``'s (one round per call, the non-finite check),
  fed with ``'packed'`` stream items, so the result equals
  ``training.train(algorithm, init_params, data, opts)`` with the same seed,
  cohort size and backend (a ``parallel.Backend`` or its name).

  Returns:
    ``(state, history)``: final server state and one metrics dict per round.
  """
  from fedjax_lab import training   # lazy: the engine imports this package

  # make_round reads only num_clients and max_client_size from the data.
  shape = _Population(source.num_clients, int(np.asarray(source.client_sizes).max()))
  total = rounds if state is None else int(state.round) + rounds
  action = _StreamedCohorts(source, clients_per_round, total, prefetch)
  opts = training.TrainOptions(rounds=total, clients_per_round=clients_per_round,
                               backend=backend, seed=seed, eval_every=0, rounds_per_call=1,
                               progress=False)
  try:
    loop = training.run_loop(algorithm, init_params, shape, opts=opts, actions=(action,),
                             init_state=state)
  finally:
    action.close()
  return loop.state, loop.history


class _Population(NamedTuple):
  num_clients: int
  max_client_size: int
