"""One process of the multi-process sharded run started by tests/test_multihost.py.

    python tests/multihost_worker.py HOST:PORT NUM_PROCESSES PROCESS_ID OUT.npz

Joins the run, trains each method of ``METHODS`` with the sharded backend on the
problem of ``build_problem`` (the same one the test runs on one process with vmap)
and saves every leaf of each final state to ``OUT.npz`` (keys ``method/leaf_path``),
with the results of ``helper_checks``. Not collected by pytest (no ``test_`` prefix).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

# Module-level constants shared with the test (importing this module runs no JAX).
SIZES = (5, 3, 7, 2, 9, 4, 6, 1, 8, 3, 5, 2)
COHORT = 5
ROUNDS = 3
METHODS = ("fedavg", "scaffold")
LOCAL_DEVICES = 4


def build_problem(name):
  """(method, data, initial state) of ``name``: identical on every process by seed."""
  import jax
  import jax.numpy as jnp
  from algorithms.fedavg import fedavg
  from algorithms.scaffold import scaffold
  from fedjax_lab.client import LocalSchedule
  from reference import linear_example_loss, linear_problem
  data, _ = linear_problem(SIZES, seed=2)
  schedule = LocalSchedule(batch_size=2, epochs=2)
  make = {"fedavg": fedavg, "scaffold": scaffold}[name]
  method = make(linear_example_loss, 0.05, 1.0, schedule)
  state = method.init({"w": jnp.ones(3), "b": jnp.zeros(())}, jax.random.PRNGKey(7),
                      data.num_clients)
  return method, data, state


def run(name, backend):
  """The final state of ``ROUNDS`` rounds, one jitted call per round."""
  from fedjax_lab import parallel
  from fedjax_lab.algorithm import make_multi_round, make_round
  backend = parallel.get_backend(backend)
  method, data, state = build_problem(name)
  run_rounds = make_multi_round(make_round(method, data, COHORT, backend), backend)
  arrays, offsets = data.device_arrays()
  # Sharded over several processes: global replicated arrays, checked equal everywhere.
  state, arrays, offsets = backend.replicate_for_processes((state, arrays, offsets),
                                                           "initial state and data")
  for _ in range(ROUNDS):
    state, metrics = run_rounds(state, arrays, offsets, 1)
  return state, metrics


def flatten(name, tree):
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {f"{name}/{jax.tree_util.keystr(path)}": leaf for path, leaf in leaves}


def helper_checks(process_id):
  """What the helpers do across processes: rows gathered, a mismatch detected."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from fedjax_lab import distributed, parallel
  # A global array split over processes: this process holds rows of its own id.
  sharding = NamedSharding(parallel.client_mesh(), P(parallel.CLIENTS_AXIS))
  local = np.full((LOCAL_DEVICES, 2), process_id, np.float32)
  split = jax.make_array_from_process_local_data(sharding, local)
  try:
    distributed.check_same_on_all_processes({"rank": np.int32(process_id)}, "rank")
    mismatch_detected = False
  except AssertionError as e:
    mismatch_detected = "The rank differs between processes" in str(e)
  return {"gathered_rows": distributed.to_host(split),
          "mismatch_detected": np.bool_(mismatch_detected)}


def main(argv):
  address, num_processes, process_id, out = argv[1], int(argv[2]), int(argv[3]), argv[4]
  from fedjax_lab import distributed
  distributed.initialize(address, num_processes, process_id,
                         local_device_count=LOCAL_DEVICES, timeout_s=60)
  import jax
  import numpy as np
  assert jax.process_count() == num_processes and jax.process_index() == process_id
  assert jax.local_device_count() == LOCAL_DEVICES
  assert jax.device_count() == LOCAL_DEVICES * num_processes
  results = {"process_index": np.int32(jax.process_index()),
             "device_count": np.int32(jax.device_count())}
  for name in METHODS:
    state, metrics = run(name, "sharded")
    results.update(flatten(name, distributed.to_host(state)))
    results[f"{name}/train_loss"] = distributed.to_host(metrics["train_loss"])
  results.update(helper_checks(process_id))
  np.savez(out, **results)
  distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
