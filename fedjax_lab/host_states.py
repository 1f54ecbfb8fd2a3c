"""Per-client state tables kept in host memory, for populations too large for the device.

A stateful method (SCAFFOLD's control variates c_i, personalized models, ...) keeps
one row per client: ``[N, ...]`` leaves of ``ServerState.client_states``. With
N = 10^5..10^6 clients and a params-sized row, that table outgrows device memory
long before the cohort does. Here the table is a pytree of numpy arrays (or
``np.memmap`` files) on the host, and each round moves only the cohort's rows:

    ids      = sample_cohort(state)            # the device round's RNG: same cohort
    rows     = table[ids]                      # numpy fancy indexing; padding ids read 0
    state, rows', metrics = core(state, ids, rows, arrays, offsets)    # jitted, [P, ...]
    table[ids] = rows'                         # padding ids dropped

``core`` is ``algorithm.make_round_core``: the same program as the device round
minus its gather/scatter, so both paths give the same numbers. The device sees the
state without its table plus ``P`` rows; what it holds does not grow with N. Hooks
that read the whole table from the state (``server_update``, ``round_metrics``) see
``()`` here; no method in the registry does.

``make_host_state_multi_round`` runs ``K`` rounds per device call: the cohorts of
rounds ``r..r+K-1`` depend only on ``(rng, r)``, so their union (at most ``K * P``
rows) is gathered once, the rounds run in a ``lax.scan`` on that small table, and
it is written back once.
"""
import mmap
import os
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import algorithm as algorithm_lib
from fedjax_lab import parallel
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.types import Params, PyTree


class _RoundKey(NamedTuple):
  """What ``algorithm.sample_cohort`` reads from a server state."""
  rng: jax.Array
  round: jax.Array


def table_bytes_per_client(table: PyTree) -> int:
  """Bytes of one client's row of a ``[N, ...]`` table (numpy or jax leaves)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape[1:]))
                 for x in jax.tree.leaves(table)))


def lazy_zeros(shape: tuple, dtype) -> np.ndarray:
  """A zero array whose memory is allocated row by row as it is first written.

  Anonymous memory with transparent huge pages turned off: numpy asks for huge pages
  on large arrays, and then writing one 60 KB row of a table commits (and zeroes) a
  2 MB page, so a table touched at random fills RAM after a few rounds. With 4 KB
  pages the resident size follows the clients that have taken part.
  """
  dtype = np.dtype(dtype)
  nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
  buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
  if hasattr(mmap, "MADV_NOHUGEPAGE"):
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
  return np.frombuffer(buffer, dtype, count=int(np.prod(shape))).reshape(shape)


def init_host_table(algorithm: FederatedAlgorithm, params: Params, num_clients: int,
                    directory: Optional[str] = None) -> PyTree:
  """The initial client-state table ``[num_clients, ...]`` as numpy arrays on the host.

  Rows equal ``algorithm.init_client_state(params)``, as ``algorithm.init`` makes them
  on device. All-zero rows use ``lazy_zeros`` (memory is committed only as rows are
  written, so it follows the clients that took part). With ``directory``, every leaf
  is an ``np.memmap`` file there (sparse on disk while zero), for tables larger than
  host memory.

  Returns:
    A pytree of ``[num_clients, ...]`` arrays, or ``()`` for a stateless method.
  """
  if num_clients <= 0:
    raise ValueError(f"num_clients must be positive, got {num_clients}.")
  if algorithm.init_client_state is None:
    return ()
  one = jax.device_get(algorithm.init_client_state(params))
  leaves, treedef = jax.tree.flatten(one)
  if directory is not None:
    os.makedirs(directory, exist_ok=True)
  table = []
  for index, leaf in enumerate(leaves):
    leaf = np.asarray(leaf)
    shape = (num_clients,) + leaf.shape
    if directory is None:
      array = lazy_zeros(shape, leaf.dtype)
    else:
      array = np.lib.format.open_memmap(os.path.join(directory, f"leaf_{index}.npy"),
                                        mode="w+", dtype=leaf.dtype, shape=shape)
      if hasattr(mmap, "MADV_RANDOM"):
        # Rows are read at random: read-ahead around each one costs ~30x the row itself.
        array._mmap.madvise(mmap.MADV_RANDOM)
    if np.any(leaf):
      array[...] = leaf
    table.append(array)
  return jax.tree.unflatten(treedef, table)


def init_host_state(algorithm: FederatedAlgorithm, params: Params, rng, num_clients: int,
                    directory: Optional[str] = None) -> tuple[ServerState, PyTree]:
  """``(state without its table, table on the host)``, equal to ``split_state(
  algorithm.init(params, rng, num_clients))`` without the ``[N, ...]`` table on device.

  A method that keeps ``FederatedAlgorithm.init`` gets its table from
  ``init_host_table`` (rows ``init_client_state(params)``) and its state from a
  one-client ``init``. A method that overrides ``init`` (per-client tags, a
  reputation vector, ...) runs it on the CPU backend, so the table is built in host
  memory once and then moved to numpy (or to ``directory``'s memmap files).
  """
  if type(algorithm).init is FederatedAlgorithm.init:
    state = algorithm.init(params, rng, 1)._replace(client_states=())
    return state, init_host_table(algorithm, params, num_clients, directory)
  with jax.default_device(jax.devices("cpu")[0]):
    full = algorithm.init(params, rng, num_clients)
  state, table = split_state(full)
  del full
  # Uncommitted arrays on the default device, as a direct init would give.
  state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
  if directory is not None and jax.tree.leaves(table):
    os.makedirs(directory, exist_ok=True)
    leaves, treedef = jax.tree.flatten(table)
    files = []
    for index, leaf in enumerate(leaves):
      array = np.lib.format.open_memmap(os.path.join(directory, f"leaf_{index}.npy"),
                                        mode="w+", dtype=leaf.dtype, shape=leaf.shape)
      array[...] = leaf
      files.append(array)
    table = jax.tree.unflatten(treedef, files)
  return state, table


def split_state(state: ServerState) -> tuple[ServerState, PyTree]:
  """``(state without its table, the table as numpy)``: moves a device table to the host."""
  table = jax.tree.map(lambda x: np.array(x), state.client_states)
  return state._replace(client_states=()), table


def join_state(state: ServerState, table: PyTree) -> ServerState:
  """The state with ``table`` back in ``client_states`` on device (e.g. to compare or save)."""
  return state._replace(client_states=jax.tree.map(jnp.asarray, table))


def gather_rows(table: PyTree, ids: np.ndarray) -> PyTree:
  """Rows ``table[ids]`` (numpy ``[P, ...]``); ids outside ``[0, N)`` (padding) read zeros."""
  ids = np.asarray(ids)

  def leaf(x):
    valid = (ids >= 0) & (ids < x.shape[0])
    rows = x[np.where(valid, ids, 0)]
    rows[~valid] = 0
    return rows

  return jax.tree.map(leaf, table)


def scatter_rows(table: PyTree, ids: np.ndarray, rows: PyTree) -> None:
  """``table[ids] = rows`` in place; rows of ids outside ``[0, N)`` (padding) are dropped."""
  ids = np.asarray(ids)

  def leaf(x, r):
    valid = (ids >= 0) & (ids < x.shape[0])
    x[ids[valid]] = np.asarray(r)[valid]

  jax.tree.map(leaf, table, rows)


def _check(state: ServerState, table: PyTree, num_clients: int, algorithm: FederatedAlgorithm):
  if jax.tree.leaves(state.client_states):
    raise ValueError("The host-state round takes the state without its client table "
                     "(client_states=()); use host_states.split_state(state) to move it.")
  for x in jax.tree.leaves(table):
    if not isinstance(x, np.ndarray):
      raise ValueError(f"The client table must hold numpy arrays, got {type(x).__name__}; "
                       "use host_states.init_host_table or split_state.")
    if x.shape[:1] != (num_clients,):
      raise ValueError(f"The client table needs a leading axis of {num_clients} clients, "
                       f"got a leaf of shape {x.shape}.")
  if algorithm.init_client_state is not None and not jax.tree.leaves(table):
    raise ValueError(f"{algorithm.name} keeps per-client state: pass its table "
                     "(host_states.init_host_table).")


def _make_sampler(num_clients: int, clients_per_round: int, padded: int) -> Callable:
  """``ids(rng, round, num_rounds) -> int32 [num_rounds, P]``: the device round's cohorts."""
  def ids_of(rng, first_round, num_rounds):
    def one(offset):
      key = _RoundKey(rng, first_round + offset)
      ids, _ = algorithm_lib.sample_cohort(key, num_clients, clients_per_round)
      return algorithm_lib.pad_cohort(ids, padded, num_clients)
    return jax.vmap(one)(jnp.arange(num_rounds, dtype=jnp.int32))
  return jax.jit(ids_of, static_argnums=2)


def make_host_state_round(algorithm: FederatedAlgorithm, data: FederatedData,
                          clients_per_round: int, backend: parallel.BackendLike = "vmap",
                          mesh=None, chunk_size: Optional[int] = None) -> Callable:
  """Builds ``round_fn(state, table, arrays, offsets) -> (state, metrics)``.

  Args (of ``round_fn``):
    state: the server state with ``client_states=()`` (see ``split_state``).
    table: the client-state table on the host, numpy leaves ``[N, ...]``; the
      cohort's rows are updated in place.
    arrays, offsets: ``data.device_arrays()``.

  The cohort, the client keys and every number equal ``algorithm.make_round``'s on
  the same state (with the table on device). One call of ``backend.jit(core)`` per
  round (jitted, except on the ``loop`` backend, as its device round).
  """
  backend = parallel.get_backend(backend, mesh)
  num_clients = data.num_clients
  padded = backend.padded_cohort_size(clients_per_round)
  core = backend.jit(algorithm_lib.make_round_core(algorithm, data, clients_per_round, backend,
                                                   chunk_size=chunk_size))
  sample = _make_sampler(num_clients, clients_per_round, padded)

  def round_fn(state: ServerState, table: PyTree, arrays, offsets):
    _check(state, table, num_clients, algorithm)
    ids = np.asarray(sample(state.rng, state.round, 1)[0])
    rows = gather_rows(table, ids)
    state, new_rows, metrics = core(state, ids, rows, arrays, offsets)
    scatter_rows(table, ids, jax.device_get(new_rows))
    return state, metrics

  round_fn.core = core
  return round_fn


def _local_index(ids: np.ndarray, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
  """``(members [K * P], local [K, P])``: distinct real ids (padded with ``num_clients``) and
  each id's position among them (``K * P`` for padding ids)."""
  capacity = ids.size
  real = ids < num_clients
  members = np.unique(ids[real])
  local = np.full(ids.shape, capacity, np.int32)
  local[real] = np.searchsorted(members, ids[real])
  padded = np.full((capacity,), num_clients, np.int32)
  padded[:members.size] = members
  return padded, local


class RowUpdate(NamedTuple):
  """Rows to write into a host table: ``table[ids] = rows`` (ids ``>= N`` are padding).

  Attributes:
    ids: int32 ``[M]``, client ids (padding ids equal ``num_clients``).
    rows: numpy leaves ``[M, ...]``, the rows' new values.
  """
  ids: np.ndarray
  rows: PyTree

  def write(self, table: PyTree) -> None:
    """Applies the update to ``table`` in place."""
    scatter_rows(table, self.ids, self.rows)


def make_host_state_multi_round(algorithm: FederatedAlgorithm, data: FederatedData,
                                clients_per_round: int, backend: parallel.BackendLike = "vmap",
                                mesh=None, chunk_size: Optional[int] = None
                                ) -> Callable:
  """``run(state, table, arrays, offsets, num_rounds) -> (state, metrics [num_rounds])``.

  ``num_rounds`` rounds in one device call (one compilation per distinct
  ``num_rounds``): the union of their cohorts is gathered into a ``[K * P, ...]``
  table, the rounds scan over it on device, and it is written back to ``table``.
  Same numbers as ``make_multi_round(make_round(...))`` with the table on device.
  The rounds are ``backend.scan`` inside ``backend.jit``: on the ``loop`` backend they
  run from Python, unjitted, on the same small table.

  ``run.deferred(state, table, arrays, offsets, num_rounds) -> (state, metrics,
  update)`` leaves ``table`` untouched and returns the rows as a ``RowUpdate``
  (``update.write(table)`` stores them): a caller can look at the metrics first and
  drop the update, keeping the table of the last good round.
  """
  backend = parallel.get_backend(backend, mesh)
  num_clients = data.num_clients
  padded = backend.padded_cohort_size(clients_per_round)
  core = algorithm_lib.make_round_core(algorithm, data, clients_per_round, backend,
                                        chunk_size=chunk_size)
  sample = _make_sampler(num_clients, clients_per_round, padded)

  def scan_rounds(state, ids, local_ids, local_table, arrays, offsets):
    def step(carry, round_ids):
      state, local_table = carry
      ids, local = round_ids
      rows = algorithm_lib._gather_rows(local_table, local)
      state, new_rows, metrics = core(state, ids, rows, arrays, offsets)
      return (state, algorithm_lib._scatter_rows(local_table, local, new_rows)), metrics
    (state, local_table), metrics = backend.scan(step, (state, local_table), (ids, local_ids))
    return state, local_table, metrics

  scan_rounds = backend.jit(scan_rounds)

  def deferred(state: ServerState, table: PyTree, arrays, offsets, num_rounds: int):
    _check(state, table, num_clients, algorithm)
    ids = np.asarray(sample(state.rng, state.round, num_rounds))
    members, local_ids = _local_index(ids, num_clients)
    state, local_table, metrics = scan_rounds(
        state, ids, local_ids, gather_rows(table, members), arrays, offsets)
    return state, metrics, RowUpdate(members, jax.device_get(local_table))

  def run(state: ServerState, table: PyTree, arrays, offsets, num_rounds: int):
    state, metrics, update = deferred(state, table, arrays, offsets, num_rounds)
    update.write(table)
    return state, metrics

  run.deferred = deferred
  run.scan_rounds = scan_rounds
  return run
