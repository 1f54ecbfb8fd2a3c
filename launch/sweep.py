"""A study of any ``launch.train`` config in one compiled program: runs vmapped over a grid.

    python -m launch.sweep --config=launch/configs/fedavg_digits.py \
        --sweep=client_lr:0.01,0.03,0.1,0.3 --sweep=seed:0,1,2,3 --workdir=/tmp/study
    python -m launch.sweep --sweep=client_lr:0.03,0.1 --sweep=seed:0,1 --sequential

The runs are the cartesian product of the ``--sweep=KEY:V1,V2,...`` values; KEY is any
continuous (float) key of the config, or ``seed`` (model init, cohort draws, client
shuffles; the data follow ``data_seed`` and are shared). Each run's numbers are those of
``launch.train`` with the same values. ``--sequential`` runs the same runs one after
another in this process (``launch.common.run`` each), for comparison; it also takes keys
that change shapes or the data (``local_epochs``, ``data_seed``, ...).

Writes into --workdir: runs.jsonl (one line per run: the swept keys, test_accuracy,
test_loss, diverged, diverged_round; a diverged run's test metrics are null), study.png
(the final accuracy against the swept values, mean and std over seeds, and the accuracy
curves) and checkpoints/ (the vmapped study resumes from them). The last line printed is
one JSON object: runs (the lines of runs.jsonl), wall_s, compiles (XLA compilations of
the rounds programs), num_runs, mode.

``launch.sweep_lr`` is the sequential comparison of methods (FedAvg, FedHyper) against
the initial learning rate; this script sweeps one method's numbers.
"""
import copy
import itertools
import json
import math
import os
import re
import sys
import time
from typing import Optional, Sequence

import numpy as np

# Keys a study shares across runs by construction (the data) or that are not numbers.
NOT_SWEEPABLE = ("data_seed", "rounds", "clients_per_round", "num_clients", "eval_every")


# ------------------------------------------------------------------ the grid

def parse_sweeps(specs: Sequence[str]) -> dict:
  """``['client_lr:0.1,0.3', 'seed:0,1']`` -> ``{'client_lr': [0.1, 0.3], 'seed': [0, 1]}``."""
  sweeps = {}
  for spec in specs:
    key, sep, values = spec.partition(":")
    key = key.strip()
    if not sep or not key or not values.strip():
      raise ValueError(f"--sweep takes KEY:V1,V2,... (e.g. client_lr:0.1,0.3), got {spec!r}.")
    if key in sweeps:
      raise ValueError(f"--sweep names {key!r} twice.")
    try:
      parsed = [float(v) for v in values.split(",")]
    except ValueError:
      raise ValueError(f"--sweep={spec}: the values must be numbers.") from None
    if key == "seed":
      if any(v != int(v) or v < 0 for v in parsed):
        raise ValueError(f"--sweep={spec}: seeds must be non-negative integers.")
      parsed = [int(v) for v in parsed]
    sweeps[key] = parsed
  if not sweeps:
    raise ValueError("Give at least one --sweep=KEY:V1,V2,...")
  return sweeps


def grid(sweeps: dict) -> list[dict]:
  """The cartesian product of the swept values, one dict per run (first key slowest)."""
  keys = list(sweeps)
  return [dict(zip(keys, values)) for values in itertools.product(*sweeps.values())]


def run_config(config, values: dict):
  """``config`` with one run's values."""
  out = copy.deepcopy(config)
  for key, value in values.items():
    out[key] = value
  return out


def check_vmappable(config, keys: Sequence[str]) -> None:
  """Raises ValueError naming a key the vmapped study cannot vary."""
  for key in keys:
    if key == "seed":
      continue
    if key not in config:
      raise ValueError(f"--sweep key {key!r} is not in the config.")
    if key in NOT_SWEEPABLE or isinstance(config[key], (bool, int)) or not isinstance(
        config[key], float):
      raise ValueError(
          f"--sweep key {key!r} ({type(config[key]).__name__} {config[key]!r}) is not a "
          f"continuous hyper-parameter: it fixes shapes, the data or a choice, so the runs "
          f"cannot share one program. Sweep it with --sequential.")
  if config.get("client_states", "device") != "device":
    raise ValueError("A vmapped study keeps the client states on the device "
                     "(client_states='device'); use --sequential for host tables.")


# ------------------------------------------------------------------ the vmapped study

def study_setup(config, keys: Sequence[str]):
  """``(build, exp, sampler, cohort_slots)`` for ``studies.train_many`` from a train config.

  ``build(hparams, seed)`` rebuilds ``launch.common.build``'s method and initial params
  with the swept keys (and the seed) as traced scalars; the data, model and evaluator
  are built once, from ``config``, and shared.
  """
  import jax
  import algorithms
  from fedjax_lab import sampling
  from launch import common, robust
  check_vmappable(config, keys)
  exp = common.build(config)
  base = copy.deepcopy(config)
  base.unlock()
  x0 = exp.train_data.arrays["x"][:1]

  def build(hparams, seed):
    import ml_collections
    cfg = ml_collections.ConfigDict(base.to_dict(), type_safe=False)
    for key, value in hparams.items():
      cfg[key] = value
    cfg.seed = seed
    try:
      method = algorithms.build(cfg.algorithm, cfg, exp.example_loss, model=exp.model)
      method = robust.apply_robustness(method, cfg)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
            jax.errors.TracerIntegerConversionError) as e:
      raise ValueError(f"The method reads one of {sorted(hparams) + ['seed']} as a Python "
                       f"number while building, so it cannot be swept in one program; use "
                       f"--sequential. ({type(e).__name__})") from e
    params = exp.model.init(jax.random.PRNGKey(seed + 1), x0)   # as launch.common.build
    return method, params

  sampler, slots = None, config.clients_per_round
  if robust.dp_sampling(config) == "poisson":   # as launch.common.run
    sampler, slots = sampling.poisson_sampler(
        exp.train_data.num_clients, config.clients_per_round / exp.train_data.num_clients)
  return build, exp, sampler, slots


def run_study(config, sweeps: dict, workdir: Optional[str] = None,
              runs_per_chunk: Optional[int] = None, shard_runs: Optional[bool] = None):
  """The vmapped study: ``(rows, studies.StudyResult)``; rows as in runs.jsonl.

  ``shard_runs`` splits the runs over all devices (default: when the config's backend
  spans devices, i.e. ``sharded``: the study's form of that backend).
  """
  from fedjax_lab import metrics as metrics_lib
  from fedjax_lab import studies
  shard_runs = _shards(config, shard_runs)
  runs = grid(sweeps)
  keys = [k for k in sweeps if k != "seed"]
  build, exp, sampler, slots = study_setup(config, keys)
  hparams = {k: [r[k] for r in runs] for k in keys}
  seeds = [r.get("seed", config.seed) for r in runs]
  evaluate = exp.evaluate or metrics_lib.make_evaluator(exp.model)
  result = studies.train_many(
      build, hparams, seeds, exp.train_data, evaluate, exp.test_arrays,
      rounds=config.rounds, clients_per_round=slots, eval_every=config.eval_every,
      runs_per_chunk=runs_per_chunk, sampler=sampler, chunk_size=config.get("chunk_size"),
      workdir=os.path.join(workdir, "study") if workdir else None,
      checkpoint_every=_study_checkpoint_every(config),
      mesh=studies.runs_mesh() if shard_runs else None)
  rows = []
  for i, run in enumerate(runs):
    diverged = bool(result.diverged[i])
    final = {k: float(v[i, -1]) for k, v in result.test.items()}
    rows.append({**run, "test_accuracy": None if diverged else final["accuracy"],
                 "test_loss": None if diverged else final["loss"], "diverged": diverged,
                 "diverged_round": int(result.diverged_round[i]) or None,
                 "curve": [[r, float(result.test["accuracy"][i, j])]
                           for j, r in enumerate(result.eval_rounds)]})
  return rows, result


def _shards(config, shard_runs: Optional[bool]) -> bool:
  if shard_runs is not None:
    return shard_runs
  from fedjax_lab import parallel
  return parallel.get_backend(config.get("backend", "vmap")).spans_devices


def _study_checkpoint_every(config) -> int:
  every, evals = config.get("checkpoint_every", 0) or 0, config.eval_every or 0
  if every and evals and every % evals:
    return 0   # checkpoints must fall on evaluations: only the final one then
  return every


# ------------------------------------------------------------------ one after another

def run_sequential(config, sweeps: dict, progress: bool = False) -> list[dict]:
  """The same runs one after another in this process (``launch.common.run`` each)."""
  from fedjax_lab import training
  from launch import common
  rows = []
  for run in grid(sweeps):
    try:
      _, history, summary = common.run(run_config(config, run), None, progress)
      rows.append({**run, "test_accuracy": summary["test_accuracy"],
                   "test_loss": summary["test_loss"], "diverged": False,
                   "diverged_round": None,
                   "curve": [[h["round"], h["test_accuracy"]] for h in history
                             if "test_accuracy" in h]})
    except training.NonFiniteLossError as e:
      bad = re.search(r"non-finite at round (\d+)", str(e))
      rows.append({**run, "test_accuracy": None, "test_loss": None, "diverged": True,
                   "diverged_round": int(bad.group(1)) if bad else None, "curve": []})
  return rows


# ------------------------------------------------------------------ compile counting

_COMPILES: dict = {}
_LISTENING = [False]
ROUNDS_PROGRAMS = ("jit(study_program)", "jit(run)")   # studies' and parallel.scan_rounds'


def _listen():
  if _LISTENING[0]:
    return
  from jax._src import monitoring   # jax's own compile events (no public listener API)

  def on_event(event, duration, **kwargs):
    del duration
    if event.endswith("backend_compile_duration"):
      name = kwargs.get("fun_name", "")
      _COMPILES[name] = _COMPILES.get(name, 0) + 1

  monitoring.register_event_duration_secs_listener(on_event)
  _LISTENING[0] = True


def compile_counts() -> dict:
  """XLA compilations so far in this process, by function name (from the first call on)."""
  _listen()
  return dict(_COMPILES)


def rounds_compiles(before: dict, after: dict) -> int:
  """Compilations of the rounds programs between two ``compile_counts()``."""
  return sum(after.get(k, 0) - before.get(k, 0) for k in ROUNDS_PROGRAMS)


# ------------------------------------------------------------------ outputs

def write_runs(rows: Sequence[dict], path: str) -> str:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps({k: v for k, v in row.items() if k != "curve"}) + "\n")
  return path


def plot(rows: Sequence[dict], sweeps: dict, path: str) -> str:
  """The final accuracy against the swept values (mean +- std over seeds: a curve for one
  key, a heat map for two) and the accuracy curves (mean over seeds per setting)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = [k for k in sweeps if k != "seed"]
  settings = list(dict.fromkeys(tuple(r[k] for k in keys) for r in rows))

  def accs(setting):
    return [r["test_accuracy"] if r["test_accuracy"] is not None else math.nan
            for r in rows if tuple(r[k] for k in keys) == setting]

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  if len(keys) == 2:
    a, b = sweeps[keys[0]], sweeps[keys[1]]
    grid_ = np.array([[np.nanmean(accs((u, v))) if not np.all(np.isnan(accs((u, v))))
                       else np.nan for v in b] for u in a])
    image = left.imshow(grid_, cmap="viridis", aspect="auto", origin="lower")
    left.set_xticks(range(len(b)), [f"{v:g}" for v in b])
    left.set_yticks(range(len(a)), [f"{v:g}" for v in a])
    left.set_xlabel(keys[1])
    left.set_ylabel(keys[0])
    for i in range(len(a)):
      for j in range(len(b)):
        left.text(j, i, "x" if np.isnan(grid_[i, j]) else f"{grid_[i, j]:.2f}",
                  ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=left, label="test accuracy (mean over seeds)")
  else:
    labels = [", ".join(f"{k}={v:g}" for k, v in zip(keys, s)) or "all" for s in settings]
    xs = [s[0] for s in settings] if len(keys) == 1 else list(range(len(settings)))
    mean = [np.nanmean(accs(s)) if not np.all(np.isnan(accs(s))) else np.nan for s in settings]
    std = [np.nanstd(accs(s)) if not np.all(np.isnan(accs(s))) else np.nan for s in settings]
    left.errorbar(xs, mean, yerr=std, marker="o", capsize=3)
    if len(keys) == 1:
      left.set_xlabel(keys[0])
      if all(x > 0 for x in xs):
        left.set_xscale("log")
    else:
      left.set_xticks(xs, labels, rotation=30, fontsize=7)
    left.set_ylabel("final test accuracy (mean +- std over seeds)")
    left.grid(True, alpha=0.3)
  for setting in settings:
    curves = [r["curve"] for r in rows if tuple(r[k] for k in keys) == setting and r["curve"]]
    if not curves:
      continue
    rounds_ = [p[0] for p in curves[0]]
    mean = np.nanmean([[p[1] for p in c] for c in curves if len(c) == len(rounds_)], axis=0)
    right.plot(rounds_, mean, label=", ".join(f"{k}={v:g}" for k, v in zip(keys, setting)))
  right.set_xlabel("round")
  right.set_ylabel("test accuracy (mean over seeds)")
  right.grid(True, alpha=0.3)
  if len(settings) <= 8 and keys:
    right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  try:
    sweeps = parse_sweeps(f.sweep)
  except ValueError as e:
    raise app.UsageError(str(e))
  from fedjax_lab import checkpoint, training
  from launch import workdir as workdir_lib
  try:
    with workdir_lib.locked(f.workdir):   # one study per workdir at a time
      summary = _study(f, sweeps)
  except (ValueError, training.NonFiniteLossError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)   # WorkdirError (a held workdir) included
    sys.exit(1)
  print(json.dumps(summary))


def _study(f, sweeps) -> dict:
  if f.workdir:
    with open(os.path.join(f.workdir, "config.json"), "w") as out:
      out.write(f.config.to_json_best_effort(indent=2))
  before = compile_counts()
  start = time.perf_counter()
  if f.sequential:
    rows = run_sequential(f.config, sweeps, f.progress)
  else:
    rows, _ = run_study(f.config, sweeps, f.workdir, f.runs_per_chunk, f.shard_runs)
  wall = time.perf_counter() - start
  summary = {"runs": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
             "wall_s": round(wall, 3), "compiles": rounds_compiles(before, compile_counts()),
             "num_runs": len(rows), "mode": "sequential" if f.sequential else
             "sharded" if _shards(f.config, f.shard_runs) else "vmap"}
  if f.workdir:
    summary["runs_jsonl"] = write_runs(rows, os.path.join(f.workdir, "runs.jsonl"))
    summary["plot"] = plot(rows, sweeps, os.path.join(f.workdir, "study.png"))
  return summary


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(__file__), "configs", "fedavg_digits.py"),
      "The launch.train config of every run; override fields with --config.KEY=VALUE.")
  flags.DEFINE_multi_string("sweep", [], "KEY:V1,V2,... (repeat; the runs are the "
                            "cartesian product). KEY: a float config key or seed.")
  flags.DEFINE_string("workdir", None, "Directory for runs.jsonl, study.png and checkpoints.")
  flags.DEFINE_bool("sequential", False, "Run the runs one after another (launch.common.run).")
  flags.DEFINE_integer("runs_per_chunk", None, "Vectorise this many runs at once (memory); "
                       "default: all.")
  flags.DEFINE_bool("progress", False, "Progress bars (--sequential).")
  flags.DEFINE_bool("shard_runs", None, "Split the runs over all devices (default: when "
                    "--config.backend=sharded).")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
