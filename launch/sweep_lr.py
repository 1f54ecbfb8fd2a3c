"""Initial-learning-rate sweep: FedAvg against FedHyper-G and FedHyper-G+CL.

    python -m launch.sweep_lr --workdir=/tmp/lr_sweep --which=server --lrs=0.1,0.3,1,3
    python -m launch.sweep_lr --workdir=/tmp/lr_sweep --which=client --lrs=0.005,0.05 \
        --config.rounds=100 --target=0.9

Every (method, initial rate) pair trains on the same data and model (the config file,
default launch/configs/fedhyper_digits.py) with ``--which`` choosing whether the
global (``server_lr``) or the local (``client_lr``) initial rate varies. Writes into
--workdir: sweep.csv and sweep.md (test accuracy and loss at round R, and the first
evaluated round reaching --target), sweep.json (the same rows with the accuracy at
every evaluation), and sweep.png (accuracy at round R against the
initial rate, one line per method). A run whose loss becomes non-finite is reported
as diverged (accuracy NaN).
"""
import copy
import csv
import json
import math
import os
import sys
from typing import Optional, Sequence

COLUMNS = ("method", "which", "initial_lr", "test_accuracy", "test_loss", "rounds",
           "rounds_to_target", "wall_s")


def rounds_to_target(history: Sequence[dict], target: Optional[float]) -> Optional[int]:
  """First round whose evaluation reached ``target`` accuracy (None if never or no target)."""
  if target is None:
    return None
  for record in history:
    if record.get("test_accuracy", -1.0) >= target:
      return int(record["round"])
  return None


def sweep(config, lrs: Sequence[float], which: str = "server",
          methods: Sequence[str] = ("fedavg", "fedhyper_g", "fedhyper_g_cl"),
          target: Optional[float] = None, progress: bool = False) -> list[dict]:
  """Runs every (method, initial rate) pair in-process; one row per run."""
  from fedjax_lab import training
  from launch import common
  if which not in ("server", "client"):
    raise ValueError(f"which must be 'server' or 'client', got {which!r}.")
  if not lrs or any(not lr > 0 for lr in lrs):
    raise ValueError(f"Initial learning rates must be positive, got {list(lrs)}.")
  import algorithms
  unknown = [m for m in methods if m not in algorithms.REGISTRY]
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; known: {', '.join(sorted(algorithms.REGISTRY))}.")
  rows = []
  for method in methods:
    for lr in lrs:
      run_config = copy.deepcopy(config)
      run_config.algorithm = method
      run_config[f"{which}_lr"] = float(lr)
      row = {"method": method, "which": which, "initial_lr": float(lr)}
      try:
        _, history, summary = common.run(run_config, None, progress)
        row.update(test_accuracy=summary["test_accuracy"], test_loss=summary["test_loss"],
                   rounds=summary["rounds"], wall_s=summary["wall_s"],
                   rounds_to_target=rounds_to_target(history, target),
                   curve=[(r["round"], r["test_accuracy"]) for r in history
                          if "test_accuracy" in r])
      except training.NonFiniteLossError:
        row.update(test_accuracy=math.nan, test_loss=math.nan, rounds=run_config.rounds,
                   wall_s=None, rounds_to_target=None, curve=[])
      rows.append(row)
  return rows


def write_table(rows: Sequence[dict], workdir: str) -> tuple[str, str]:
  """sweep.csv and sweep.md in ``workdir``; returns their paths."""
  csv_path = os.path.join(workdir, "sweep.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  md_path = os.path.join(workdir, "sweep.md")
  lrs = sorted({r["initial_lr"] for r in rows})
  methods = list(dict.fromkeys(r["method"] for r in rows))
  which = rows[0]["which"] if rows else "server"
  lines = [f"Test accuracy at round {rows[0]['rounds'] if rows else '?'} against the initial "
           f"{which} learning rate (nan: diverged).", "",
           "| method | " + " | ".join(f"{which}_lr={lr:g}" for lr in lrs) + " |",
           "|---" * (len(lrs) + 1) + "|"]
  for method in methods:
    by_lr = {r["initial_lr"]: r for r in rows if r["method"] == method}
    cells = []
    for lr in lrs:
      r = by_lr.get(lr)
      cell = "" if r is None else f"{r['test_accuracy']:.4f}"
      if r is not None and r.get("rounds_to_target") is not None:
        cell += f" (target @ {r['rounds_to_target']})"
      cells.append(cell)
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return csv_path, md_path


def plot(rows: Sequence[dict], path: str) -> str:
  """Accuracy at round R against the initial rate (log x axis), one line per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
    points = sorted((r["initial_lr"], r["test_accuracy"]) for r in rows if r["method"] == method)
    # Distinct markers and dashes keep coinciding curves visible.
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^Dv"[i % 5],
            ls=("-", "--", ":", "-.")[i % 4], ms=7 - i, label=method)
  which = rows[0]["which"] if rows else "server"
  ax.set_xscale("log")
  ax.set_xlabel(f"initial {which} learning rate")
  ax.set_ylabel(f"test accuracy at round {rows[0]['rounds'] if rows else '?'}")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required (the table and plot go there).")
  try:
    lrs = [float(x) for x in f.lrs]
  except ValueError:
    raise app.UsageError(f"--lrs must be numbers, got {f.lrs}.")
  from launch import workdir as workdir_lib
  try:
    with workdir_lib.locked(f.workdir):   # one writer of the table and plot
      rows = sweep(f.config, lrs, f.which, f.methods, f.target, f.progress)
      csv_path, md_path = write_table(rows, f.workdir)
      with open(os.path.join(f.workdir, "sweep.json"), "w") as out:
        json.dump(rows, out, indent=1)     # with the accuracy curves
      png_path = plot(rows, os.path.join(f.workdir, "sweep.png"))
  except ValueError as e:   # WorkdirError (a held workdir) included
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  with open(md_path) as table:
    print(table.read())
  print(json.dumps({"csv": csv_path, "table": md_path, "plot": png_path, "runs": len(rows)}))


def _define_flags():
  # Defined here, not at import, so tests and notebooks can import sweep() next to
  # other launch scripts without clashing flag names.
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(__file__), "configs", "fedhyper_digits.py"),
      "Config file shared by all runs; override fields with --config.KEY=VALUE.")
  flags.DEFINE_string("workdir", None, "Directory for the table and the plot.")
  flags.DEFINE_list("lrs", ["0.1", "1.0"], "Initial learning rates to try.")
  flags.DEFINE_enum("which", "server", ["server", "client"],
                    "Which initial rate the grid varies (server_lr or client_lr).")
  flags.DEFINE_list("methods", ["fedavg", "fedhyper_g", "fedhyper_g_cl"],
                    "Registered methods to compare.")
  flags.DEFINE_float("target", None, "Report the first evaluated round reaching this test accuracy.")
  flags.DEFINE_bool("progress", False, "Show a progress bar per run.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
