"""Running the sharded backend over several processes (multi-host TPU/GPU, CPU processes).

Every process runs the same program (SPMD, one controller per host): it builds the same
data, the same initial state from the same seed, and calls the same jitted rounds. After
:func:`initialize`, ``jax.devices()`` lists the devices of *all* processes, so
``make_round(..., backend='sharded')`` with its default mesh splits the cohort over every
device of every host; the aggregator's ``psum`` crosses hosts (ICI/DCN on TPU, NCCL on
GPU, gloo over TCP on CPU). The round's outputs (state and metrics) come back replicated,
so every process holds the same new state.

    from fedjax_lab import distributed
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=rank)
    ...                                   # build data, method, state as usual
    state, arrays = distributed.replicate((state, arrays))
    distributed.check_same_on_all_processes(state, "initial state")
    ...                                   # run rounds; write files only where
    if distributed.is_lead_process(): ... # this is true

Nothing here is needed with one process: every function is then a cheap no-op or
identity, so a launch script can call them unconditionally.
"""
import hashlib
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lab import parallel
from fedjax_lab.types import PyTree

CPU_COLLECTIVES = ("gloo", "mpi")


def _backends_started() -> bool:
  # Private, but the only way to tell before jax.distributed raises its own error.
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_count: Optional[int] = None,
               cpu_collectives: str = "gloo", timeout_s: int = 300) -> None:
  """Joins this process to a multi-process JAX run; call before any other JAX call.

  Args:
    coordinator_address: ``host:port`` of process 0 (it starts the coordination
      service there; the others connect to it). None: detected from the cluster
      (Cloud TPU, SLURM, Open MPI, ...) by ``jax.distributed.initialize``, as are the
      two next arguments.
    num_processes: how many processes take part.
    process_id: this process's rank in ``[0, num_processes)``.
    local_device_count: CPU only: how many CPU devices this process exposes
      (``jax_num_cpu_devices``; overrides ``--xla_force_host_platform_device_count``).
    cpu_collectives: cross-process collectives on CPU, one of ``CPU_COLLECTIVES``
      (``'gloo'`` ships with jaxlib; ``'mpi'`` needs an MPI library). Ignored by
      TPU/GPU, which use their own interconnect.
    timeout_s: how long to wait for every process to join.

  Raises:
    ValueError: bad arguments.
    RuntimeError: JAX already ran something in this process (too late to join).
  """
  if cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(f"Unknown cpu_collectives {cpu_collectives!r}; choose one of "
                     f"{', '.join(CPU_COLLECTIVES)}.")
  if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
    raise ValueError(f"num_processes must be a positive int, got {num_processes!r}.")
  if process_id is not None and num_processes is not None and not (
      isinstance(process_id, int) and 0 <= process_id < num_processes):
    raise ValueError(f"process_id must be an int in [0, {num_processes}), got {process_id!r}.")
  if local_device_count is not None and (not isinstance(local_device_count, int)
                                         or local_device_count < 1):
    raise ValueError(f"local_device_count must be a positive int, got {local_device_count!r}.")
  if _backends_started():
    raise RuntimeError("distributed.initialize must run before any JAX computation or "
                       "jax.devices() call in this process; call it right after imports.")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", local_device_count)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout_s)


def shutdown() -> None:
  """Leaves the run (optional: JAX also does it at exit)."""
  jax.distributed.shutdown()


def is_lead_process() -> bool:
  """True on the one process (index 0) that should write metrics, checkpoints and logs."""
  return jax.process_index() == 0


def replicate(tree: PyTree, mesh: Optional[Mesh] = None) -> PyTree:
  """Every leaf as one global ``jax.Array`` replicated on every device of ``mesh``.

  Each process passes its own copy of the same values (numpy or local arrays); no data
  moves between processes. Leaves already global with that sharding are kept. Plain,
  uncommitted arrays are also accepted by the jitted round, but arrays committed to one
  local device (e.g. a restored checkpoint) are not: replicate them first.

  Args:
    tree: pytree of arrays, identical on every process.
    mesh: default ``parallel.client_mesh()`` (all devices of all processes).
  """
  sharding = NamedSharding(mesh or parallel.client_mesh(), P())

  def one(x):
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
      if not x.is_fully_addressable:   # global with another layout: reshard on device
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    local = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, local, local.shape)

  return jax.tree.map(one, tree)


def to_host(tree: PyTree) -> PyTree:
  """The global value of every leaf as numpy, on every process (a collective for
  leaves split across processes: call it on all of them)."""
  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def fingerprint(tree: PyTree) -> np.ndarray:
  """uint32 ``[num_leaves]``: a hash of each leaf's dtype, shape and bytes."""
  def one(x):
    x = np.ascontiguousarray(x)
    digest = hashlib.sha256(f"{x.dtype}{x.shape}".encode() + x.tobytes()).digest()
    return np.frombuffer(digest[:4], np.uint32)[0]
  return np.array([one(x) for x in jax.tree.leaves(to_host(tree))], np.uint32)


def check_same_on_all_processes(tree: PyTree, what: str = "tree") -> None:
  """Raises AssertionError unless every process holds bit-identical ``tree``.

  Processes that built data or state from different seeds would otherwise mix
  unrelated values in the cross-host aggregation without any error. Only hashes
  travel between processes (leaves already split over processes are gathered first).
  """
  if jax.process_count() == 1:
    return
  multihost_utils.assert_equal(
      fingerprint(tree),
      f"The {what} differs between processes: every process must build it the same way "
      f"(same seed, same data, same config).")
