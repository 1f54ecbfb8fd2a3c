"""Trains any registered method on a federated dataset.

    python -m launch.train                                  # FedAvg on digits (default config)
    python -m launch.train --config.algorithm=scaffold --config.rounds=100
    python -m launch.train --config=launch/configs/fedavg_digits.py --workdir=/tmp/run

The last line printed is one JSON object (algorithm, rounds, test_accuracy, ...).
With --workdir, metrics go to metrics.jsonl and checkpoints to checkpoints/; running
again with the same --workdir resumes. --tensorboard also writes the per-round
metrics as TensorBoard scalars to WORKDIR/tensorboard (`tensorboard --logdir=WORKDIR`).
"""
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import workdir as workdir_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "fedavg_digits.py")
if __name__ == "__main__":
  workdir_lib.exit_on_unknown_override(sys.argv, _DEFAULT_CONFIG)
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG,
    "Path to an ml_collections config file; override fields with --config.KEY=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints (resumes).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_TENSORBOARD = flags.DEFINE_bool(
    "tensorboard", False, "Also write per-round metrics to WORKDIR/tensorboard (needs --workdir).")
_DIVERGENCE_FACTOR = flags.DEFINE_float(
    "divergence_factor", 10.0,
    "A round whose train_loss exceeds this factor times the first round's, or a final "
    "test_loss above it times the initial model's, marks the run diverged (summary: "
    "diverged, diverged_round; exit status 1); 0: only non-finite losses.")
_ALLOW_DIVERGENCE = flags.DEFINE_bool(
    "allow_divergence", False, "Exit 0 even when the run diverged.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  workdir_lib.quiet_logs()
  workdir_lib.use_compilation_cache()
  from fedjax_lab import checkpoint, training
  from launch import common   # after flag parsing, so --help is fast
  config = _CONFIG.value
  if _TENSORBOARD.value and not _WORKDIR.value:
    raise app.UsageError("--tensorboard writes to WORKDIR/tensorboard: also pass --workdir.")
  writers = []
  try:
    common.check_names(config)       # before any data loads
    with workdir_lib.open_run(_WORKDIR.value, config):
      if _TENSORBOARD.value:
        from fedjax_lab import plotting
        writers.append(plotting.TensorBoardWriter(os.path.join(_WORKDIR.value, "tensorboard")))
      _, history, summary = common.run(config, _WORKDIR.value, _PROGRESS.value, writers)
  except training.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    print(json.dumps({"algorithm": config.algorithm, "diverged": True,
                      "diverged_round": e.round}))
    sys.exit(1)
  except (ValueError, ImportError, OSError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  finally:
    for writer in writers:
      writer.close()
  summary.update(common.divergence(history, _DIVERGENCE_FACTOR.value, summary))
  if int(summary["rounds"]) > config.rounds:
    print(f"warning: {_WORKDIR.value} is already at round {summary['rounds']} > "
          f"rounds={config.rounds}; nothing was trained (train_loss is null).", file=sys.stderr)
  failed = summary["diverged"] and not _ALLOW_DIVERGENCE.value
  if failed:
    print(f"error: the run diverged (round {summary['diverged_round']}: its loss is above "
          f"{_DIVERGENCE_FACTOR.value} x the first round's or the initial model's); lower the "
          f"learning rates, or pass --allow_divergence to exit 0.", file=sys.stderr)
  print(json.dumps(summary))
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
