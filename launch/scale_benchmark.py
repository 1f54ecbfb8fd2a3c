"""Memory at scale: SCAFFOLD's per-client table on the host against the table on device.

    python -m launch.scale_benchmark                      # N = 10k, 100k, 1M (42 s on an idle 2-core CPU)
    python -m launch.scale_benchmark --populations=10000  # only the side-by-side one

Workload: the digits MLP 64-200-10 trained with SCAFFOLD, 100 clients per round, each
client 2 synthetic examples, one local step. Its table holds one params-sized control
variate per client (``bytes_per_client``). Measured in one process:

* ``device`` / ``device_donated``: ``make_round`` jitted, the table ``[N, ...]`` on device
  (the second donates the state, so the scatter writes in place);
* ``host``: ``host_states.make_host_state_round``, the table in numpy, the cohort's rows
  gathered and scattered around one jitted call;
* ``host_rpc10`` / ``device_rpc10``: 10 rounds per call (host: the union of the 10
  cohorts goes to the device once; device: ``make_multi_round``'s ``lax.scan``).

Populations whose table exceeds ``--device_limit_gb`` time the host path alone.

The device table is only built where it fits (``--device_limit_gb``); larger host tables
that do not fit in memory either go to ``np.memmap`` files (``--memmap_dir``), written
only where rows are. The last line printed is one JSON object.
"""
import json
import os
import shutil
import statistics
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from algorithms.scaffold import scaffold
from fedjax_lab import host_states, models
from fedjax_lab.algorithm import make_multi_round, make_round
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import FederatedData

_POPULATIONS = flags.DEFINE_list("populations", ["10000", "100000", "1000000"],
                                 "Population sizes N.")
_COHORT = flags.DEFINE_integer("cohort", 100, "Clients per round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per system (median reported).")
_DEVICE_LIMIT_GB = flags.DEFINE_float("device_limit_gb", 1.0,
                                      "Largest table built on device (GB).")
_HOST_LIMIT_GB = flags.DEFINE_float("host_limit_gb", 8.0,
                                    "Largest table allocated in host memory; larger "
                                    "ones use np.memmap files.")
_PREFAULT_GB = flags.DEFINE_float("prefault_gb", 2.0,
                                   "Host tables up to this size are written once before "
                                   "timing (steady state: every row's pages exist); larger "
                                   "ones are timed while pages are first touched.")
_MEMMAP_DIR = flags.DEFINE_string("memmap_dir", None,
                                  "Directory for memmap tables (default: a temporary one).")

EXAMPLES_PER_CLIENT = 2


def population(num_clients: int, seed: int = 0) -> FederatedData:
  rng = np.random.default_rng(seed)
  n = num_clients * EXAMPLES_PER_CLIENT
  x = rng.uniform(0, 16, size=(n, 64)).astype(np.float32)
  y = rng.integers(0, 10, size=n).astype(np.int32)
  return FederatedData({"x": x, "y": y}, np.arange(0, n + 1, EXAMPLES_PER_CLIENT))


def _block(tree):
  return jax.block_until_ready(tree)


def _median_seconds(step, repeats: int) -> tuple[float, float]:
  """(first call seconds, median seconds of ``repeats`` further calls)."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def _rss_gb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def measure(num_clients: int, cohort: int, repeats: int, device_limit_gb: float,
            host_limit_gb: float, memmap_dir: str, prefault_gb: float = 2.0) -> dict:
  """Seconds per round of each path at population ``num_clients`` (see module docstring)."""
  model = models.mlp((200,))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))
  method = scaffold(models.classification_loss(model), 0.05, 1.0,
                    LocalSchedule(batch_size=EXAMPLES_PER_CLIENT, epochs=1))
  data = population(num_clients)
  arrays, offsets = data.device_arrays()
  table = host_states.init_host_table(method, params, 1)
  per_client = host_states.table_bytes_per_client(table)
  table_gb = per_client * num_clients / 1e9
  result = {"num_clients": num_clients, "bytes_per_client": per_client,
            "table_gb": round(table_gb, 3)}

  # Host path.
  directory = None
  if table_gb > host_limit_gb:
    directory = os.path.join(memmap_dir, f"table_{num_clients}")
  state = method.init(params, jax.random.PRNGKey(1), 1)._replace(client_states=())
  table = host_states.init_host_table(method, params, num_clients, directory)
  result["host_table"] = "memmap" if directory else "ram"
  # np.zeros pages (transparent huge pages: 2 MB each) are zeroed on their first write;
  # after some rounds every row has been written once and that cost is gone.
  result["prefaulted"] = directory is None and table_gb <= prefault_gb
  if result["prefaulted"]:
    for leaf in jax.tree.leaves(table):
      leaf[...] = 0
  round_fn = host_states.make_host_state_round(method, data, cohort)
  holder = {"state": state}

  def host_step():
    holder["state"], metrics = round_fn(holder["state"], table, arrays, offsets)
    _block(metrics)

  result["host_compile_s"], result["host_s"] = _median_seconds(host_step, repeats)
  side_by_side = table_gb <= device_limit_gb
  if side_by_side:
    multi = host_states.make_host_state_multi_round(method, data, cohort)

    def host_multi_step():
      holder["state"], metrics = multi(holder["state"], table, arrays, offsets, 10)
      _block(metrics)

    _, seconds = _median_seconds(host_multi_step, max(repeats // 2, 1))
    result["host_rpc10_s"] = seconds / 10
  result["process_rss_gb"] = round(_rss_gb(), 3)
  del table
  if directory:
    shutil.rmtree(directory, ignore_errors=True)

  # Device path, where the table fits.
  if side_by_side:
    state = method.init(params, jax.random.PRNGKey(1), num_clients)
    device_round = make_round(method, data, cohort)
    for name, jitted in (("device", jax.jit(device_round)),
                         ("device_donated", jax.jit(device_round, donate_argnums=0))):
      holder = {"state": jax.tree.map(jnp.copy, state)}

      def device_step(jitted=jitted):
        holder["state"], metrics = jitted(holder["state"], arrays, offsets)
        _block(metrics)

      result[f"{name}_compile_s"], result[f"{name}_s"] = _median_seconds(device_step, repeats)
    run = make_multi_round(device_round, "vmap")

    def device_multi_step():
      holder["state"], metrics = run(holder["state"], arrays, offsets, 10)
      _block(metrics)

    _, seconds = _median_seconds(device_multi_step, max(repeats // 2, 1))
    result["device_rpc10_s"] = seconds / 10
    result["host_over_device"] = round(result["host_s"] / result["device_s"], 3)
    result["host_over_device_donated"] = round(result["host_s"] / result["device_donated_s"], 3)
    result["host_rpc10_over_device_rpc10"] = round(
        result["host_rpc10_s"] / result["device_rpc10_s"], 3)
  for key, value in list(result.items()):
    if key.endswith("_s"):
      result[key] = round(value, 5)
  return result


def main(argv):
  del argv
  memmap_dir = _MEMMAP_DIR.value or tempfile.mkdtemp(prefix="scale_benchmark_")
  results = []
  try:
    for n in _POPULATIONS.value:
      result = measure(int(n), _COHORT.value, _REPEATS.value, _DEVICE_LIMIT_GB.value,
                       _HOST_LIMIT_GB.value, memmap_dir, _PREFAULT_GB.value)
      print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
      results.append(result)
  finally:
    if _MEMMAP_DIR.value is None:
      shutil.rmtree(memmap_dir, ignore_errors=True)
  print(json.dumps({"scale": results}))


if __name__ == "__main__":
  app.run(main)
