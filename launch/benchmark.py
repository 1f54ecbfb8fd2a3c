"""Side-by-side speed of fedjax_lab rounds, the hardware limit and naive simulators.

    python -m launch.benchmark --quick            # 2-2.5 min on an idle 2-core CPU
    python -m launch.benchmark --out=docs/        # full run; writes docs/benchmarks.{json,png}

Everything is timed in one process on the same workload, and reported as ratios:
* ``ours_vmap`` / ``ours_vmap_rpc10`` / ``ours_sharded`` / ``ours_loop``: fedjax_lab rounds
  (sampling, gather, masking, metrics included) with ``rounds_per_call`` 1 or 10;
* ``limit``: jitted centralized SGD doing the same gradient steps on batches of
  cohort_size x batch_size examples (batch_size at most the largest client; the same
  arithmetic without federated bookkeeping),
  the faster of a ``lax.scan`` of the steps and the steps unrolled (no loop); every
  client's share of it is the padded round's steps, where size buckets
  (``padded_vmap_rpc10``: the round without them) skip most of a small client's;
* ``naive_per_batch``: Python loops over clients and batches, one jitted SGD step per
  batch (how per-batch simulators work);
* ``ours_loop`` is the other naive form: a Python loop over clients calling one jitted
  whole-client training function.
The last line printed is one JSON object with the ratios.
"""
import json
import math
import os
import resource
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from algorithms.fedavg import fedavg
from fedjax_lab import loops, models, parallel, size_buckets
from fedjax_lab.algorithm import make_multi_round, make_round, plan_size_buckets
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import gather_cohort
from launch.workloads import (PfLCnn, digits_population, equal_digits_population,
                              synthetic_population)

# Defined by _define_flags() when run as a script, so tests and notebooks can import the
# benchmark's functions next to other launch scripts without clashing flag names.
_QUICK = None
_REPEATS = None
_OUT = None
_WORKLOADS = None
_STUDY = None
_STUDY_ROUNDS = None
_STUDY_REPEATS = None
_STUDY_SYSTEMS = None
_PEERS = None
_ASYNC = None
_PEERS_DIR = None


def _define_flags():
  global _QUICK, _REPEATS, _OUT, _WORKLOADS, _STUDY, _STUDY_ROUNDS, _STUDY_REPEATS, _STUDY_SYSTEMS, _PEERS, _ASYNC, _PEERS_DIR
  _QUICK = flags.DEFINE_bool("quick", False, "Small settings (2-2.5 minutes on an idle 2-core CPU, measured).")
  _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per system (median reported).")
  _OUT = flags.DEFINE_string("out", None, "Directory for benchmarks.json and the sweep plot.")
  _WORKLOADS = flags.DEFINE_list("workloads", None, "Subset of workloads to run (default: all).")
  _STUDY = flags.DEFINE_list(
      "study", [], "Run counts of the study rows (e.g. 16,64): a FedAvg digits study vmapped "
      "in one program vs the same runs sequential in this process vs separate launch.train "
      "processes (launch.sweep; off by default).")
  _STUDY_ROUNDS = flags.DEFINE_integer("study_rounds", 20, "Rounds of each study run.")
  _STUDY_REPEATS = flags.DEFINE_list(
      "study_repeats", ["3"], "Timed repetitions of each study cell (median, min, max); "
      "one number for every count, or COUNT:REPEATS items (e.g. 16:3,64:1).")
  _STUDY_SYSTEMS = flags.DEFINE_multi_enum(
      "study_systems", list(("vmapped", "sequential", "processes")),
      ["vmapped", "sequential", "processes"], "The study cells to time.")
  _PEERS = flags.DEFINE_bool("peers", False, "Also time FedJAX and Flower on the peers' digits "
                             "workload, each in its own venv (see launch/peers).")
  _ASYNC = flags.DEFINE_bool("async_clock", False, "Also time a step of the asynchronous clock "
                             "against a synchronous round that trains as many clients.")
  _PEERS_DIR = flags.DEFINE_string("peers_dir", None, "Folder of the peer venvs (default "
                                   "$FEDJAX_LAB_PEERS_DIR or ~/.cache/fedjax_lab/peers).")


def _block(tree):
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
  return tree


def _time(fn, repeats, per=1):
  """(first-call seconds, median seconds of ``repeats`` later calls, all of them);
  the later calls' times are divided by ``per`` (rounds per call)."""
  start = time.perf_counter()
  _block(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    _block(fn())
    times.append((time.perf_counter() - start) / per)
  return first, statistics.median(times), times


def workloads(quick):
  """name -> (population builder, model, clients_per_round, batch_size, client_lr, systems).

  CNN rounds on a CPU are convolution arithmetic (about 0.1 GFLOP per example for the
  28x28 CNN, ours and the limit alike; seconds per round), so they are timed against
  the limit only, and small with ``--quick``; they belong on an accelerator.
  """
  mlp = models.mlp((128,))
  every = ("vmap", "vmap_rpc10", "sharded", "loop", "naive", "bare", "limit")
  cnn_systems = ("vmap", "limit")
  return {
      "digits_mlp": (lambda: digits_population(100), mlp, 100, 32, 0.1, every),
      # The reference setups of the targets: 100 clients of 32-160 examples, and 1,000
      # clients of 16, on the same MLP with 8x8 inputs.
      "mlp_100x32_160": (lambda: synthetic_population(100, (32, 160), (8, 8, 1)), mlp, 100, 32,
                         0.1, every),
      "mlp_1000x16": (lambda: synthetic_population(1000, 16, (8, 8, 1)), mlp, 1000, 16, 0.1,
                      ("vmap", "vmap_rpc10", "vmap_rpc10_chunk64", "naive", "limit")),
      "peers_digits_c10": (lambda: equal_digits_population(50, 30), mlp, 10, 10, 0.1, every),
      "peers_digits_c50": (lambda: equal_digits_population(50, 30), mlp, 50, 10, 0.1, every),
      # EMNIST-sized population (3,400 clients); 100 per round as in the targets.
      "cnn28": (lambda: synthetic_population(100 if quick else 3400, 20, (28, 28, 1)),
                models.cnn((32, 64), 128, 62), 10 if quick else 100, 20, 0.05, cnn_systems),
      "cifar_pfl": (lambda: synthetic_population(50 if quick else 500, 5 if quick else 100,
                                                 (32, 32, 3)),
                    models.from_linen(PfLCnn()), 10 if quick else 50, 10, 0.1, cnn_systems),
  }


def measure(name, population, model, clients_per_round, batch_size, client_lr, repeats,
            systems=("vmap", "vmap_rpc10", "sharded", "loop", "naive", "limit")):
  data = population()
  example_loss = models.classification_loss(model)
  params = model.init(jax.random.PRNGKey(0), data.arrays["x"][:1])
  schedule = LocalSchedule(batch_size=batch_size, epochs=1)
  method = fedavg(example_loss, client_lr, 1.0, schedule)
  arrays, offsets = data.device_arrays()
  steps = schedule.num_steps(data.max_client_size)
  row = {"workload": name, "clients_per_round": clients_per_round,
         "num_clients": data.num_clients, "max_client_size": int(data.max_client_size),
         "local_steps": steps, "examples_per_round": None}
  results = {}

  # Client-steps a round computes, masked ones included: size buckets skip most of a
  # small client's padding (fedjax_lab.size_buckets); the limit runs the padded ones.
  buckets = plan_size_buckets(method, data, clients_per_round)
  row["padded_client_steps"] = clients_per_round * steps
  row["client_steps"] = (size_buckets.client_steps(buckets, schedule) if buckets
                         else clients_per_round * steps)

  def ours(backend_name, rounds_per_call, chunk_size=None, memory_reference=False,
           buckets=True):
    """Times one of our systems. ``memory_reference``: its compiled temporaries are the
    row's ``temp_mb`` (the plain vmap round); otherwise the first system measured
    gives it where that one is not timed."""
    backend = parallel.get_backend(backend_name)
    run = make_multi_round(make_round(method, data, clients_per_round, backend,
                                      chunk_size=chunk_size, size_buckets=buckets), backend)
    state = [method.init(params, jax.random.PRNGKey(1), data.num_clients)]

    def call():
      state[0], metrics = run(state[0], arrays, offsets, rounds_per_call)
      return state[0].params, metrics
    first, steady, times = _time(call, repeats, rounds_per_call)
    examples = float(np.mean(np.asarray(call()[1]["cohort_examples"])))
    row["examples_per_round"] = examples
    if backend.compiled:   # compiled peak temporaries (XLA's own accounting)
      memory = run.lower(state[0], arrays, offsets, rounds_per_call).compile().memory_analysis()
      if memory is not None and (memory_reference or "temp_mb" not in row):
        row["temp_mb"] = memory.temp_size_in_bytes / 2**20
    return first - steady * rounds_per_call, steady, times

  if "vmap" in systems:
    results["ours_vmap"] = ours("vmap", 1, memory_reference=True)
  if "vmap_rpc10" in systems:
    results["ours_vmap_rpc10"] = ours("vmap", 10)
    if buckets:   # the same round with every client padded to the largest
      results["padded_vmap_rpc10"] = ours("vmap", 10, buckets=False)
  if "vmap_rpc10_chunk64" in systems and clients_per_round > 64:
    results["ours_vmap_rpc10_chunk64"] = ours("vmap", 10, 64)
  if "sharded" in systems:
    results["ours_sharded"] = ours("sharded", 1)
  if "loop" in systems:
    results["ours_loop"] = ours("loop", 1)

  if "bare" in systems:
    # A bare jit(vmap(scan)) FedAvg, 10 rounds per call: clients pre-padded on device,
    # uniform cohort, unshuffled batches; no masking of empty steps, metrics or hooks.
    cohort_data, sizes = gather_cohort(arrays, offsets, jnp.arange(data.num_clients),
                                       data.max_client_size)

    def masked_loss(p, x, y, mask):
      losses = optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y)
      return jnp.sum(mask * losses) / jnp.maximum(jnp.sum(mask), 1)

    def client(p, x, y, size):
      def step(q, k):
        idx = k * batch_size + jnp.arange(batch_size)
        g = jax.grad(masked_loss)(q, jnp.take(x, idx, axis=0, mode="clip"),
                                  jnp.take(y, idx, axis=0, mode="clip"), idx < size)
        return jax.tree.map(lambda a, b: a - client_lr * b, q, g), None
      return jax.lax.scan(step, p, jnp.arange(steps))[0]

    @jax.jit
    def bare(p, key):
      def one_round(p, round_key):
        ids = jax.random.choice(round_key, data.num_clients, (clients_per_round,), replace=False)
        new = jax.vmap(client, in_axes=(None, 0, 0, 0))(
            p, cohort_data["x"][ids], cohort_data["y"][ids], sizes[ids])
        w = sizes[ids] / jnp.sum(sizes[ids])
        return jax.tree.map(lambda n: jnp.tensordot(w, n, 1), new), None
      return jax.lax.scan(one_round, p, jax.random.split(key, 10))[0]
    keys = iter(jax.random.split(jax.random.PRNGKey(3), repeats + 2))
    first, steady, times = _time(lambda: bare(params, next(keys)), repeats, 10)
    results["bare_jit_vmap"] = (first - 10 * steady, steady, times)

  if "limit" in systems:
    # A client's batch holds at most its population's largest client.
    big_batch = clients_per_round * min(batch_size, int(data.max_client_size))
    grad = jax.grad(lambda p, x, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, x), y)))

    def step(p, i):
      g = grad(p, jnp.take(arrays["x"], i, axis=0), jnp.take(arrays["y"], i, axis=0))
      return jax.tree.map(lambda a, b: a - client_lr * b, p, g), None

    def limit(unroll):
      @jax.jit
      def run(p, key):
        idx = jax.random.randint(key, (steps, big_batch), 0, data.num_examples)
        return loops.scan(step, p, idx, unroll=unroll)[0]
      return run

    # The true limit: the faster of the steps as a loop and unrolled (XLA:CPU keeps a
    # slow convolution layout inside loops). Each is timed once, the faster repeatedly.
    variants = {"scan": limit(False)}
    if steps <= 32:
      variants["unrolled"] = limit(True)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), repeats + 2 * len(variants) + 2))
    probes = {v: _time(lambda: run(params, next(keys)), 1) for v, run in variants.items()}
    best = min(probes, key=lambda v: probes[v][1])
    first, steady, times = _time(lambda: variants[best](params, next(keys)), repeats)
    results["limit"] = (probes[best][0] - probes[best][1], steady, times)
    row["limit_variant"] = best
    row.update({f"limit_{v}_probe_s": probe[1] for v, probe in probes.items()})

  if "naive" in systems:
    @jax.jit
    def sgd_step(p, x, y):
      g = jax.grad(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          model.apply(p, x), y)))(p)
      return jax.tree.map(lambda a, b: a - client_lr * b, p, g)
    host_clients = [data.client(i) for i in range(data.num_clients)]
    rng = np.random.default_rng(0)

    def naive_round():
      cohort = rng.choice(data.num_clients, clients_per_round, replace=False)
      total, deltas = 0.0, None
      for i in cohort:
        c = host_clients[i]
        order = rng.permutation(len(c["y"]))   # one shuffled epoch, as ours does
        x, y = c["x"][order], c["y"][order]
        p = params
        for lo in range(0, len(y), batch_size):
          p = sgd_step(p, x[lo:lo + batch_size], y[lo:lo + batch_size])
        n = len(c["y"])
        d = jax.tree.map(lambda a, b: n * (a - b), p, params)
        deltas = d if deltas is None else jax.tree.map(jnp.add, deltas, d)
        total += n
      return jax.tree.map(lambda a, d: a + d / total, params, deltas)
    naive_round()   # compile every batch shape once
    first, steady, times = _time(naive_round, max(3, repeats // 2))
    results["naive_per_batch"] = (first - steady, steady, times)

  for system, (compile_s, seconds, times) in results.items():
    row[f"{system}_s_per_round"] = seconds   # the median
    row[f"{system}_s_per_round_min"] = min(times)
    row[f"{system}_s_per_round_max"] = max(times)
    row[f"{system}_repeats"] = len(times)
    row[f"{system}_compile_s"] = max(compile_s, 0.0)   # one first call, not repeated
  ours_best = min(v[1] for k, v in results.items() if k.startswith("ours_vmap"))
  row["ours_best_s_per_round"] = ours_best
  if row["examples_per_round"]:
    row["examples_per_s"] = row["examples_per_round"] / ours_best
  if "limit" in results:
    row["round_over_limit"] = ours_best / results["limit"][1]
  if "naive_per_batch" in results:
    row["naive_over_ours"] = results["naive_per_batch"][1] / ours_best
  if "ours_loop" in results:
    row["loop_over_vmap"] = results["ours_loop"][1] / ours_best
  if "bare_jit_vmap" in results:
    row["ours_over_bare"] = ours_best / results["bare_jit_vmap"][1]
  row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return row


def cohort_sweep(quick, repeats):
  """Seconds/round against cohort size: clients of 10 examples, and a fixed 10,000
  examples per round split over more and more clients."""
  model = models.mlp((128,))
  rows = []
  sizes = [10, 100, 1000] if quick else [10, 100, 1000, 10000]
  for cohort in sizes:
    population = lambda c=cohort: synthetic_population(c, 10, (8, 8, 1), seed=c)
    rows.append(measure(f"sweep_{cohort}", population, model, cohort, 10, 0.1, repeats,
                        systems=("vmap_rpc10", "vmap_rpc10_chunk64", "limit")))
  total = 10_000
  for cohort in ([10, 100, 1000] if quick else [10, 100, 1000, 10000]):
    per_client = total // cohort
    population = lambda c=cohort, n=per_client: synthetic_population(c, n, (8, 8, 1), seed=c)
    rows.append(measure(f"equal_{cohort}x{per_client}", population, model, cohort, 10, 0.1,
                        repeats, systems=("vmap_rpc10", "vmap_rpc10_chunk64")))
  return rows


def spread(times):
  """``{median, min, max, all}`` of repeated timings (seconds)."""
  return {"median": statistics.median(times), "min": min(times), "max": max(times),
          "all": list(times)}


STUDY_SYSTEMS = ("vmapped", "sequential", "processes")


def study_rows(counts, rounds, repeats=3, counts_repeats=None, systems=STUDY_SYSTEMS):
  """Wall time of N runs (4 client rates x N/4 seeds): vmapped, sequential, processes.

  Each repetition times the three systems one after another (interleaved, so a change
  of the machine's load hits all three); a cell is the median of its repetitions, with
  min and max, and a ratio's spread is that of the per-repetition ratios.
  ``counts_repeats`` ({count: repeats}) overrides ``repeats`` for one count; ``systems``
  (a subset of ``STUDY_SYSTEMS``) chooses the cells timed.
  """
  import subprocess
  import sys
  from launch import sweep
  from launch.configs import fedavg_digits
  config = fedavg_digits.get_config()
  config.rounds, config.eval_every, config.checkpoint_every = rounds, rounds, 0
  rows = []
  for count in counts:
    sweeps = {"client_lr": [0.03, 0.05, 0.1, 0.2], "seed": list(range(max(count // 4, 1)))}
    runs = sweep.grid(sweeps)
    times = {system: [] for system in systems}
    compiles = []
    for repeat in range((counts_repeats or {}).get(count, repeats)):
      if "vmapped" in systems:
        before = sweep.compile_counts()
        start = time.perf_counter()
        sweep.run_study(config, sweeps)
        times["vmapped"].append(time.perf_counter() - start)
        compiles.append(sweep.rounds_compiles(before, sweep.compile_counts()))
      if "sequential" in systems:
        start = time.perf_counter()
        sweep.run_sequential(config, sweeps)
        times["sequential"].append(time.perf_counter() - start)
      if "processes" in systems:
        start = time.perf_counter()
        for run in runs:
          subprocess.run([sys.executable, "-m", "launch.train", "--noprogress",
                          f"--config.rounds={rounds}", f"--config.eval_every={rounds}",
                          f"--config.client_lr={run['client_lr']}",
                          f"--config.seed={run['seed']}"],
                         check=True, capture_output=True)
        times["processes"].append(time.perf_counter() - start)
      print(json.dumps({"study": len(runs), "repeat": repeat,
                        **{k: v[-1] for k, v in times.items()}}), flush=True)
    row = {"workload": f"study{len(runs)}", "runs": len(runs), "rounds": rounds,
           "repeats": max(len(v) for v in times.values()), "vmapped_compiles": compiles}
    for system, values in times.items():
      cell = spread(values)
      row[f"{system}_s"] = cell["median"]
      row.update({f"{system}_s_{k}": v for k, v in cell.items() if k != "median"})
    for system in ("sequential", "processes"):
      if system not in times or "vmapped" not in times:
        continue
      ratios = [a / b for a, b in zip(times[system], times["vmapped"])]
      row[f"{system}_over_vmapped"] = row[f"{system}_s"] / row["vmapped_s"]
      row[f"{system}_over_vmapped_min"] = min(ratios)
      row[f"{system}_over_vmapped_max"] = max(ratios)
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def _best_ours(row):
  times = [v for k, v in row.items() if k.startswith("ours_vmap") and k.endswith("_s_per_round")]
  return min(times)


def plot_sweep(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
  sweep = [r for r in rows if r["workload"].startswith("sweep_")]
  cohorts = [r["clients_per_round"] for r in sweep]
  left.loglog(cohorts, [_best_ours(r) for r in sweep], marker="o",
              label="fedjax_lab (vmap or chunks of 64, 10 rounds/call)")
  left.loglog(cohorts, [r["limit_s_per_round"] for r in sweep], marker="s",
              label="centralized limit")
  left.set(xlabel="clients per round (10 examples each)", ylabel="seconds per round")
  left.legend(fontsize=8)
  equal = [r for r in rows if r["workload"].startswith("equal_")]
  right.loglog([r["clients_per_round"] for r in equal], [_best_ours(r) for r in equal],
               marker="o", label="fedjax_lab")
  right.set(xlabel="clients per round (10,000 examples per round in all)",
            ylabel="seconds per round")
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


MARK_START = "<!-- benchmark tables: generated by launch.benchmark --out; do not edit -->"
MARK_END = "<!-- end of generated tables -->"
SYSTEMS = (("ours_vmap", "vmap"), ("ours_vmap_rpc10", "vmap, 10 rounds/call"),
           ("ours_vmap_rpc10_chunk64", "chunks of 64, 10 rounds/call"),
           ("padded_vmap_rpc10", "no size buckets, 10 rounds/call"), ("ours_sharded", "sharded"),
           ("ours_loop", "loop (b)"), ("naive_per_batch", "naive per-batch (a)"),
           ("bare_jit_vmap", "bare jit(vmap)"), ("limit", "limit"),
           ("fedjax_default", "FedJAX"), ("flower", "Flower"))
RATIOS = (("round_over_limit", "round / limit"), ("naive_over_ours", "(a) / ours"),
          ("loop_over_vmap", "(b) / ours"), ("ours_over_bare", "ours / bare"),
          ("fedjax_default_over_ours", "FedJAX / ours"), ("flower_over_ours", "Flower / ours"))


def _ms(seconds):
  ms = seconds * 1e3
  return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _cell(row, key, fmt=_ms):
  """``median [min–max]`` of a timed cell (``key`` is the median's key)."""
  if key not in row:
    return "–"
  low, high = row.get(f"{key}_min"), row.get(f"{key}_max")
  if low is None or high is None:
    return fmt(row[key])
  return f"{fmt(row[key])} [{fmt(low)}–{fmt(high)}]"


def markdown_tables(rows, devices, quick):
  """The benchmark's rows as markdown: ms per round, ratios, compile time and memory."""
  lines = [f"Measured by `python -m launch.benchmark{' --quick' if quick else ''}` on {devices}; "
           "ms per round: median [min–max] of the timed calls (at least 3 each), ratios of "
           "the medians from the same run.", ""]
  main = [r for r in rows if not r["workload"].startswith(("sweep_", "equal_", "study"))]
  systems = [(k, name) for k, name in SYSTEMS if any(f"{k}_s_per_round" in r for r in main)]
  ratios = [(k, name) for k, name in RATIOS if any(k in r for r in main)]
  lines.append("| workload | cohort | " + " | ".join(n for _, n in systems + ratios) + " |")
  lines.append("|---|---|" + "---|" * (len(systems) + len(ratios)))
  for r in main:
    cells = [_cell(r, f"{k}_s_per_round") for k, _ in systems]
    cells += [f"{r[k]:.2f}" if k in r else "–" for k, _ in ratios]
    lines.append(f"| {r['workload']} | {r['clients_per_round']} | " + " | ".join(cells) + " |")
  lines += ["", "| workload | examples / round | local steps | client-steps / round (padded) | "
            "examples / s (ours) | compile s (vmap, first call) | compiled temp MB | "
            "peak RSS MB |",
            "|---|---|---|---|---|---|---|---|"]
  for r in main:
    steps = r.get("client_steps", "–")
    padded = r.get("padded_client_steps")
    steps = f"{steps} ({padded})" if padded is not None and padded != steps else f"{steps}"
    lines.append(f"| {r['workload']} | {r['examples_per_round']:.0f} | {r['local_steps']} | "
                 f"{steps} | "
                 f"{r.get('examples_per_s', float('nan')):.3g} | "
                 f"{r.get('ours_vmap_compile_s', r.get('ours_vmap_rpc10_compile_s', 0.0)):.2f} | "
                 f"{r.get('temp_mb', float('nan')):.1f} | {r['peak_rss_mb']:.0f} |")
  sweep = [r for r in rows if r["workload"].startswith("sweep_")]
  if sweep:
    lines += ["", "Cohort sweep, clients of 10 examples (ms per round):", "",
              "| clients per round | ours (10 rounds/call) | chunks of 64 | limit | best / limit |",
              "|---|---|---|---|---|"]
    for r in sweep:
      lines.append(f"| {r['clients_per_round']:,} | {_cell(r, 'ours_vmap_rpc10_s_per_round')} | "
                   f"{_cell(r, 'ours_vmap_rpc10_chunk64_s_per_round')} | "
                   f"{_cell(r, 'limit_s_per_round')} | {r['round_over_limit']:.2f} |")
  equal = [r for r in rows if r["workload"].startswith("equal_")]
  if equal:
    lines += ["", "10,000 examples per round, split over more and more clients (ms per round):", "",
              "| clients × examples | ours (10 rounds/call) | chunks of 64 |", "|---|---|---|"]
    for r in equal:
      per = r["max_client_size"]
      lines.append(f"| {r['clients_per_round']:,} × {per:,} | "
                   f"{_cell(r, 'ours_vmap_rpc10_s_per_round')} | "
                   f"{_cell(r, 'ours_vmap_rpc10_chunk64_s_per_round')} |")
  studies = [r for r in rows if r["workload"].startswith("study")]
  if studies:
    lines += ["", study_table(studies)]
  return "\n".join(lines) + "\n"


def study_table(rows):
  """The study rows: wall seconds, median [min–max] over the repetitions, and ratios."""
  if not rows:
    return ""
  seconds = lambda v: f"{v:.1f}"
  ratio = lambda v: f"{v:.2f}"
  lines = ["FedAvg digits studies (4 client rates x seeds), wall seconds: median [min–max] of "
           "the repetitions; ratios of the medians [min–max of the per-repetition ratios]:", "",
           "| runs | rounds | repetitions | vmapped | sequential, one process | "
           "separate launch.train processes | sequential / vmapped | processes / vmapped | "
           "compiles (vmapped) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cells = [_cell(r, f"{k}_s", seconds) for k in ("vmapped", "sequential", "processes")]
    cells += [_cell(r, f"{k}_over_vmapped", ratio) for k in ("sequential", "processes")]
    lines.append(f"| {r['runs']} | {r['rounds']} | {r['repeats']} | " + " | ".join(cells) +
                 f" | {', '.join(map(str, r['vmapped_compiles']))} |")
  return "\n".join(lines)


def write_markdown(path, tables):
  """Replaces the generated part of ``path`` (between the markers), or writes it alone."""
  block = f"{MARK_START}\n\n{tables}\n{MARK_END}"
  text = open(path).read() if os.path.exists(path) else ""
  if MARK_START in text and MARK_END in text:
    head, rest = text.split(MARK_START, 1)
    text = head + block + rest.split(MARK_END, 1)[1]
  else:
    text = (text + "\n" if text else "# Benchmarks\n\n") + block + "\n"
  with open(path, "w") as f:
    f.write(text)


def async_clock_rows(repeats, steps=10):
  """Clock steps (``fedjax_lab.asynchronous``) against ``make_round`` rounds training the
  same number of clients: sync FedAvg under the clock (M = 20) vs a round of 20, FedBuff
  (K = 10 of 20 in flight) vs a round of 10; ``steps`` steps per jitted scan."""
  from fedjax_lab.asynchronous import clock, methods, system
  data = digits_population(100)
  model = models.mlp((200,), 10)
  params = model.init(jax.random.PRNGKey(0), data.arrays["x"][:1])
  base = fedavg(models.classification_loss(model), 0.05, schedule=LocalSchedule(10, epochs=2),
                weighting="uniform")
  arrays, offsets = data.device_arrays()
  sysm = system.make_system(jax.random.PRNGKey(1), data.num_clients)
  rows = []
  for name, (alg, spec), cohort in (("fedavg_sync_clock", methods.fedavg_sync(base, 20), 20),
                                    ("fedbuff_clock", methods.fedbuff(base, 20, 10), 10)):
    sim = clock.make_async(alg, data, sysm, spec)
    state = jax.jit(sim.init)(params, jax.random.PRNGKey(0), arrays, offsets)
    run_steps = jax.jit(lambda st, a, o: jax.lax.scan(lambda c, _: sim.step(c, a, o), st, None,
                                                      length=steps))
    _, step_s, _ = _time(lambda: run_steps(state, arrays, offsets), repeats)
    rounds = make_multi_round(make_round(base, data, cohort), "vmap")
    state_r = base.init(params, jax.random.PRNGKey(0), data.num_clients)
    _, round_s, _ = _time(lambda: rounds(state_r, arrays, offsets, steps), repeats)
    rows.append({"workload": name, "clients_trained_per_step": cohort,
                 "clock_step_ms": 1e3 * step_s / steps, "round_ms": 1e3 * round_s / steps,
                 "clock_step_over_round": step_s / round_s})
  return rows


def main(argv):
  del argv
  quick = _QUICK.value
  repeats = 3 if quick else _REPEATS.value
  if repeats < 3:
    raise app.UsageError(f"--repeats must be at least 3 (a median and a spread), got {repeats}.")
  chosen = workloads(quick)
  if _WORKLOADS.value:
    unknown = set(_WORKLOADS.value) - set(chosen) - {"sweep", "study"}
    if unknown:
      raise app.UsageError(f"Unknown workloads {sorted(unknown)}; choose from {sorted(chosen)} or sweep.")
  rows = []
  for name, spec in chosen.items():
    if _WORKLOADS.value and name not in _WORKLOADS.value:
      continue
    row = measure(name, *spec[:-1], repeats, systems=spec[-1])
    rows.append(row)
    print(json.dumps(row), flush=True)
  sweep = []
  if not _WORKLOADS.value or "sweep" in _WORKLOADS.value:
    sweep = cohort_sweep(quick, repeats)
    for row in sweep:
      print(json.dumps(row), flush=True)
  clock_rows = []
  if _ASYNC.value:
    clock_rows = async_clock_rows(repeats)
    for row in clock_rows:
      print(json.dumps(row), flush=True)
  studies = []
  if _STUDY.value:
    repeats_of = dict(item.split(":") for item in _STUDY_REPEATS.value if ":" in item)
    plain = [item for item in _STUDY_REPEATS.value if ":" not in item]
    studies = study_rows([int(c) for c in _STUDY.value], _STUDY_ROUNDS.value,
                         int(plain[0]) if plain else 3,
                         {int(k): int(v) for k, v in repeats_of.items()},
                         tuple(_STUDY_SYSTEMS.value))
  peer_rows = []
  if _PEERS.value:
    import tempfile
    from launch.peers import add_peer_ratios, run_peers
    with tempfile.TemporaryDirectory() as workdir:
      peer_rows = run_peers(workdir, repeats, data=equal_digits_population(50, 30),
                            root=_PEERS_DIR.value)
    add_peer_ratios(rows, peer_rows)
    for row in peer_rows:
      print(json.dumps(row), flush=True)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "benchmarks.json"), "w") as f:
      json.dump({"devices": [str(d) for d in jax.devices()], "rows": rows + sweep + studies + peer_rows + clock_rows},
                f, indent=1)
    if sweep:
      plot_sweep(sweep, os.path.join(_OUT.value, "benchmark_cohort_sweep.png"))
    devices = f"{jax.device_count()} × {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores"
    write_markdown(os.path.join(_OUT.value, "benchmarks.md"),
                   markdown_tables(rows + sweep + studies, devices, quick))
  summary = {"devices": jax.device_count(), "quick": quick}
  for row in rows + sweep + studies + clock_rows:
    for key in ("clock_step_over_round", "sequential_over_vmapped", "processes_over_vmapped",
                "round_over_limit", "loop_over_vmap", "naive_over_ours", "ours_over_bare",
                "fedjax_default_over_ours", "flower_over_ours"):
      if key in row:
        summary[f"{row['workload']}.{key}"] = round(row[key], 3)
  print(json.dumps(summary))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
