"""The client map's substrate: chunk sizes, and DrJAX against our own mappers.

    python -m launch.substrate_benchmark --quick     # cohorts 100 and 1,000 (34 s on an idle 2-core CPU)
    python -m launch.substrate_benchmark             # adds a cohort of 10,000
    python -m launch.substrate_benchmark --cohorts=1000,10000 --systems=vmap \
        --chunks=16,64 --stacked --check_devices=0    # streamed vs stacked messages

On the cohort-sweep workload of ``launch.benchmark`` (MLP 64-128-10 on 8x8 inputs,
clients of 10 examples, batch 10, one local epoch, every client in every round), one
process times FedAvg rounds, each compiled once, built by ``make_round`` with:

* ``vmap``: our vmapped mapper, unchunked and with ``chunk_size`` 16 / 64 / 256
  (chunked, FedAvg's weighted mean is accumulated chunk by chunk); with
  ``--stacked`` also ``vmap_stacked``: the same chunks with the aggregator's stream
  removed, so the ``[C, ...]`` messages are stacked before the mean;
* ``sharded``: our ``shard_map`` mapper on a 1-device mesh;
* ``drjax``: the same round with the client map written with DrJAX
  (``drjax.broadcast`` the server message, ``drjax.map_fn`` the clients,
  ``drjax.reduce_sum`` the weighted messages) on the same 1-device mesh;
* ``drjax_map``: only the map is DrJAX's (``drjax.map_fn`` over the clients, closed
  over the server message); the aggregate is our ``weighted_mean`` (a ``tensordot``
  of the weights with the stacked messages), to show which part costs what.

Each measurement is one JSON line: ms per round (median of ``--repeats`` rounds after
the first; the systems of one cohort take turns, so load drifts hit them alike),
compile seconds and the compiled program's temporary bytes
(``memory_analysis().temp_size_in_bytes``). A child process with 8 forced CPU devices
then checks that the DrJAX round gives the same parameters as ours (vmap, and sharded
over 8 devices). The last line is a JSON summary with the ratios.
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from algorithms.fedavg import fedavg
from fedjax_lab import models, parallel
from fedjax_lab.algorithm import make_round
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data import FederatedData

_QUICK = flags.DEFINE_bool("quick", False, "Cohorts 100 and 1,000 only (34 s on an idle 2-core CPU).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per system (median reported).")
_CHUNKS = flags.DEFINE_list("chunks", ["16", "64", "256"], "Chunk sizes for the vmap mapper.")
_CHECK_DEVICES = flags.DEFINE_integer(
    "check_devices", 8, "Forced CPU devices for the DrJAX equality check (0: skip).")
_CHECK_COHORT = flags.DEFINE_integer("check_cohort", 100, "Cohort of the equality check.")
_CHILD = flags.DEFINE_bool("equality_child", False, "Internal: run only the equality check.")
_COHORTS = flags.DEFINE_list("cohorts", [], "Cohort sizes (default: by --quick).")
_SYSTEMS = flags.DEFINE_list("systems", ["vmap", "sharded", "drjax", "drjax_map"],
                             "Systems to time.")
_STACKED = flags.DEFINE_bool("stacked", False,
                             "Also time each chunk size with the messages stacked, not streamed.")

EXAMPLES_PER_CLIENT = 10


def drjax_status():
  """``(drjax module or None, version or the exact import error)``."""
  try:
    import drjax
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}"
  return drjax, drjax.__version__


class DrJaxBackend(parallel.VmapBackend):
  """A backend whose client map is written with DrJAX (``make_round`` is otherwise ours).

  Only weighted-mean aggregation (FedAvg's). With ``primitives_only`` everything is
  DrJAX's: the server message is placed per client with ``drjax.broadcast``, and the
  aggregate is ``reduce_sum(w_i m_i) / reduce_sum(w_i)``, what
  ``drjax.reduce_weighted_mean`` computes, written out so every map gets the explicit
  mesh. Otherwise ``drjax.map_fn`` closes over the server message and the aggregator
  given (ours) reduces the messages.
  """
  name = "drjax"

  def __init__(self, drjax, cohort_size, mesh, primitives_only=True):
    self.drjax, self.cohort_size, self.mesh = drjax, cohort_size, mesh
    self.primitives_only = primitives_only

  def _key(self):
    return (self.cohort_size, self.mesh, self.primitives_only)

  def make_mapper(self, client_fn, aggregator, chunk_size=None):
    del chunk_size
    drjax, mesh = self.drjax, self.mesh

    @drjax.program(placements={parallel.CLIENTS_AXIS: self.cohort_size})
    def program(shared, per_client, agg_state):
      if not self.primitives_only:
        messages, weights, outputs = drjax.map_fn(
            lambda *one: client_fn(shared, one), per_client, mesh=mesh)
        aggregate, agg_state = aggregator.update(messages, weights, agg_state,
                                                 self.collectives)
        return aggregate, outputs, agg_state
      placed = drjax.broadcast(shared, mesh=mesh)
      messages, weights, outputs = drjax.map_fn(client_fn, (placed, per_client), mesh=mesh)
      weighted = drjax.map_fn(
          lambda m, w: jax.tree.map(lambda x: w.astype(x.dtype) * x, m),
          (messages, weights), mesh=mesh)
      total, weight = drjax.reduce_sum(weighted), drjax.reduce_sum(weights)
      aggregate = jax.tree.map(lambda t: t / jnp.maximum(weight, 1e-12).astype(t.dtype), total)
      return aggregate, outputs, agg_state

    def mapper(shared, per_client, agg_state, client_ids=None):
      del client_ids
      return program(shared, per_client, agg_state)
    return mapper


# system -> the backend it runs on (drjax / drjax_map: DrJaxBackend, built with the module).
BACKEND_OF_SYSTEM = {"vmap": "vmap", "vmap_stacked": "vmap", "sharded": "sharded"}


def build_round(method, data, cohort, system, chunk_size=None, mesh=None, drjax=None):
  if system in ("drjax", "drjax_map"):
    backend = DrJaxBackend(drjax, cohort, mesh, primitives_only=system == "drjax")
    return make_round(method, data, cohort, backend)
  if system == "vmap_stacked":
    method = dataclasses.replace(method, aggregator=method.aggregator._replace(stream=None))
  return make_round(method, data, cohort, BACKEND_OF_SYSTEM[system], mesh, chunk_size=chunk_size)


def workload(cohort):
  """``launch.benchmark``'s sweep workload: ``cohort`` clients of 10 random 8x8 images."""
  rng = np.random.default_rng(cohort)
  n = cohort * EXAMPLES_PER_CLIENT
  arrays = {"x": rng.uniform(size=(n, 8, 8, 1)).astype(np.float32),
            "y": rng.integers(0, 10, size=n).astype(np.int32)}
  data = FederatedData.from_client_ids(
      arrays, np.repeat(np.arange(cohort), EXAMPLES_PER_CLIENT), cohort)
  model = models.mlp((128,))
  params = model.init(jax.random.PRNGKey(0), data.arrays["x"][:1])
  method = fedavg(models.classification_loss(model), 0.1, 1.0,
                  LocalSchedule(batch_size=10, epochs=1))
  return data, params, method


def compile_round(method, data, params, cohort, system, chunk_size=None, mesh=None,
                  drjax=None):
  """Compiles one system's round; returns ``(row, step)`` with ``step()`` one timed round."""
  round_fn = build_round(method, data, cohort, system, chunk_size, mesh, drjax)
  arrays, offsets = data.device_arrays()
  state = [method.init(params, jax.random.PRNGKey(1), data.num_clients)]
  start = time.perf_counter()
  compiled = jax.jit(round_fn).lower(state[0], arrays, offsets).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  row = {"cohort": cohort, "system": system, "chunk_size": chunk_size, "compile_s": compile_s,
         "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes)}

  def step():
    start = time.perf_counter()
    state[0], metrics = compiled(state[0], arrays, offsets)
    jax.block_until_ready((state[0], metrics))
    row["train_loss"] = float(metrics["train_loss"])
    return time.perf_counter() - start
  step()   # first call: allocations and caches
  return row, step


def time_interleaved(steps, repeats):
  """Median seconds per round of each step, calling them in turn so drifts in the
  machine's load hit every system alike."""
  times = [[] for _ in steps]
  for _ in range(repeats):
    for i, step in enumerate(steps):
      times[i].append(step())
  return [statistics.median(t) for t in times]


def equality_check(cohort, drjax):
  """Max |params difference| after one round: DrJAX vs ours, on all local devices."""
  data, params, method = workload(cohort)
  mesh = parallel.client_mesh()
  arrays, offsets = data.device_arrays()
  results = {}
  for system in ("vmap", "sharded", "drjax", "drjax_map"):
    round_fn = build_round(method, data, cohort, system, mesh=mesh, drjax=drjax)
    state = method.init(params, jax.random.PRNGKey(1), data.num_clients)
    state, _ = jax.jit(round_fn)(state, arrays, offsets)
    results[system] = state.params

  def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  moved = max_diff(results["vmap"], params)
  return {"check": "drjax_equals_ours", "devices": jax.device_count(), "cohort": cohort,
          "max_abs_diff_drjax_vs_vmap": max_diff(results["drjax"], results["vmap"]),
          "max_abs_diff_drjax_map_vs_vmap": max_diff(results["drjax_map"], results["vmap"]),
          "max_abs_diff_sharded_vs_vmap": max_diff(results["sharded"], results["vmap"]),
          "max_abs_update": moved}


def run_child_check(devices, cohort):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.substrate_benchmark", "--equality_child",
       f"--check_devices={devices}", f"--check_cohort={cohort}"],
      env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return {"check": "drjax_equals_ours", "devices": devices, "error": proc.stderr[-2000:]}
  return json.loads(lines[-1])


def main(argv):
  del argv
  drjax, version = drjax_status()
  if _CHILD.value:
    print(json.dumps(equality_check(_CHECK_COHORT.value, drjax)), flush=True)
    return
  quick = _QUICK.value
  repeats = _REPEATS.value
  chunks = [int(c) for c in _CHUNKS.value]
  for c in chunks:
    parallel.validate_chunk_size(c)
  cohorts = [100, 1000] if quick else [100, 1000, 10000]
  if _COHORTS.value:
    cohorts = [int(c) for c in _COHORTS.value]
  wanted = set(_SYSTEMS.value)
  one_device = parallel.client_mesh(jax.devices()[:1])
  print(json.dumps({"drjax": version, "jax": jax.__version__,
                    "devices": [str(d) for d in jax.devices()]}), flush=True)
  rows = []

  def record(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  for cohort in cohorts:
    data, params, method = workload(cohort)
    args = (method, data, params, cohort)
    systems = [dict(system="vmap")]
    systems += [dict(system="vmap", chunk_size=c) for c in chunks if c < cohort]
    if _STACKED.value:
      systems += [dict(system="vmap_stacked", chunk_size=c) for c in chunks if c < cohort]
    systems += [dict(system="sharded", mesh=one_device)]
    if drjax is not None:
      systems += [dict(system=name, mesh=one_device, drjax=drjax)
                  for name in ("drjax", "drjax_map")]
    systems = [spec for spec in systems
               if spec["system"].replace("_stacked", "") in wanted]
    compiled = []
    for spec in systems:
      try:
        compiled.append(compile_round(*args, **spec))
      except Exception as e:  # pylint: disable=broad-except
        record({"cohort": cohort, "system": spec["system"],
                "error": f"{type(e).__name__}: {e}"})
    seconds = time_interleaved([step for _, step in compiled], repeats)
    for (row, _), s in zip(compiled, seconds):
      row["ms_per_round"] = 1e3 * s
      record(row)

  check = None
  if drjax is not None and _CHECK_DEVICES.value:
    check = run_child_check(_CHECK_DEVICES.value, _CHECK_COHORT.value)
    print(json.dumps(check), flush=True)

  summary = {"quick": quick, "drjax": version, "jax": jax.__version__}
  for cohort in cohorts:
    by = {(r["system"], r.get("chunk_size")): r for r in rows
          if r["cohort"] == cohort and "error" not in r}
    base = by.get(("vmap", None))
    if base is None:
      continue
    summary[f"c{cohort}.vmap_ms"] = round(base["ms_per_round"], 3)
    if base["temp_bytes"]:
      summary[f"c{cohort}.vmap_temp_mb"] = round(base["temp_bytes"] / 2**20, 2)
    for (system, chunk), r in by.items():
      if (system, chunk) == ("vmap", None):
        continue
      name = system if chunk is None else f"chunk{chunk}" + system.replace("vmap", "")
      summary[f"c{cohort}.{name}_over_vmap"] = round(r["ms_per_round"] / base["ms_per_round"], 3)
      if r["temp_bytes"] and base["temp_bytes"]:
        summary[f"c{cohort}.{name}_temp_over_vmap"] = round(
            r["temp_bytes"] / base["temp_bytes"], 3)
    for chunk in chunks:
      streamed, stacked = by.get(("vmap", chunk)), by.get(("vmap_stacked", chunk))
      if streamed and stacked:
        summary[f"c{cohort}.chunk{chunk}_streamed_over_stacked_ms"] = round(
            streamed["ms_per_round"] / stacked["ms_per_round"], 3)
        if streamed["temp_bytes"] and stacked["temp_bytes"]:
          summary[f"c{cohort}.chunk{chunk}_streamed_over_stacked_temp"] = round(
              streamed["temp_bytes"] / stacked["temp_bytes"], 3)
    for name in ("drjax", "drjax_map"):
      if (name, None) in by and ("sharded", None) in by:
        summary[f"c{cohort}.{name}_over_sharded"] = round(
            by[(name, None)]["ms_per_round"] / by[("sharded", None)]["ms_per_round"], 3)
  if check is not None:
    summary["drjax_max_abs_diff_8dev"] = check.get("max_abs_diff_drjax_vs_vmap", check.get("error"))
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
