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

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "fedavg_digits.py"),
    "Path to an ml_collections config file; override fields with --config.KEY=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints (resumes).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_TENSORBOARD = flags.DEFINE_bool(
    "tensorboard", False, "Also write per-round metrics to WORKDIR/tensorboard (needs --workdir).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from fedjax_lab import checkpoint, training
  from launch import common   # after flag parsing, so --help is fast
  config = _CONFIG.value
  if _TENSORBOARD.value and not _WORKDIR.value:
    raise app.UsageError("--tensorboard writes to WORKDIR/tensorboard: also pass --workdir.")
  if _WORKDIR.value:
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writers = []
  if _TENSORBOARD.value:
    from fedjax_lab import plotting
    try:
      writers.append(plotting.TensorBoardWriter(os.path.join(_WORKDIR.value, "tensorboard")))
    except ImportError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
  try:
    _, _, summary = common.run(config, _WORKDIR.value, _PROGRESS.value, writers)
  except (ValueError, training.NonFiniteLossError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  finally:
    for writer in writers:
      writer.close()
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
