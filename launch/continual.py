"""Continual federated learning on a task stream: FOT, its baselines, and their ACC/BWT.

    python -m launch.continual                                   # FOT, 10 permuted-digits tasks
    python -m launch.continual --config.algorithm=fedavg         # the same stream, FedAvg
    python -m launch.continual --config=launch/configs/fot_permuted_digits.py:fedavg_ewc
    python -m launch.continual --config=launch/configs/fot_split_digits.py --workdir=/tmp/split

Methods: any registered one (``fedavg`` fine-tuning, ``fedprox``, ...). A method's
task-end step belongs to it: ``fot`` (FedProject), ``fedavg_ewc`` (aggregated Fisher),
``gpm`` (centralized: all of a task's data on one client), and methods built on them
(``--config.algorithm=fedhyper_g --config.fedhyper_base=fot`` runs FedHyper's global
rate on FOT, FedProject included). With --workdir, metrics go to
metrics.jsonl, a checkpoint is written after every task, and rerunning resumes. The
last line printed is one JSON object (algorithm, tasks, acc, bwt, forgetting, the
accuracy matrix, wall_s).
"""
import json
import os
import sys
import time
from typing import Optional

import jax
import numpy as np

import algorithms
from fedjax_lab import continual
from fedjax_lab import models as models_lib
from fedjax_lab.data import continual as streams
from fedjax_lab.data import sources
from fedjax_lab.data.federated import train_test_split

DATA = ("digits", "mnist5k", "synthetic")
MODELS = ("mlp", "cnn")


def _source(config) -> tuple[dict, dict]:
  if config.data not in DATA:
    raise ValueError(f"Unknown data {config.data!r}; choose one of {', '.join(DATA)}.")
  if config.data == "digits":
    arrays = sources.digits()
  elif config.data == "mnist5k":
    arrays = sources.mnist5k()
  else:
    arrays, _ = sources.synthetic(1.0, 1.0, num_clients=30, seed=config.get("data_seed", 0))
  # The data (split, tasks, partition) follow data_seed; seed is the model's and rounds'.
  split_seed = int(np.random.SeedSequence([config.get("data_seed", 0), 1]).generate_state(1)[0])
  return train_test_split(arrays, config.get("test_fraction", 0.2), split_seed)


def build_stream(config) -> streams.TaskStream:
  """The task stream of ``config`` (GPM, the centralized reference, gets one client)."""
  train, test = _source(config)
  num_clients = 1 if config.algorithm == "gpm" else config.num_clients
  return streams.make_stream(train, test, config.stream, config.num_tasks, num_clients,
                             config.get("partition", "iid"), config.get("alpha", 0.5),
                             config.get("data_seed", 0), config.get("min_partition_size", 2))


def build_model(config, stream: streams.TaskStream) -> models_lib.Model:
  if config.model not in MODELS:
    raise ValueError(f"Unknown model {config.model!r}; choose one of {', '.join(MODELS)}.")
  if config.model == "mlp" and config.get("dropout", ()):
    return models_lib.dropout_mlp(tuple(config.hidden), stream.num_classes,
                                  tuple(config.dropout))
  if config.model == "mlp":
    return models_lib.continual_mlp(tuple(config.hidden), stream.num_classes,
                                    config.get("use_bias", False))
  return models_lib.cnn(num_classes=stream.num_classes)


def build(config):
  """``(stream, model, method, init_params)`` of a continual config."""
  stream = build_stream(config)
  model = build_model(config, stream)
  masks = stream.class_masks if stream.scenario == "task" else None
  example_loss = continual.classification_loss(model, masks)
  method = algorithms.build(config.algorithm, config, example_loss, model=model)
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed + 1),
                               stream[0].train.arrays["x"][:1])
  return stream, model, method, params


def run(config, workdir: Optional[str] = None, progress: bool = True):
  """Runs the stream of ``config``; returns (StreamResult, summary dict)."""
  start = time.perf_counter()
  stream, model, method, params = build(config)
  clients_per_round = 1 if config.algorithm == "gpm" else config.clients_per_round
  opts = continual.StreamOptions(
      rounds_per_task=config.rounds_per_task, clients_per_round=clients_per_round,
      backend=config.backend, seed=config.seed, eval_every=config.get("eval_every", 0),
      rounds_per_call=config.get("rounds_per_call", 10), workdir=workdir, progress=progress)
  result = continual.run_stream(method, stream, params, continual.make_evaluator(model), opts)
  m = result.metrics
  summary = {"algorithm": config.algorithm, "stream": stream.scenario, "tasks": len(stream),
             "acc": round(m["acc"], 4), "bwt": round(m["bwt"], 4),
             "forgetting": round(m["forgetting"], 4),
             "max_forgetting": round(m["max_forgetting"], 4),
             "acc_matrix": np.round(result.acc, 4).tolist(),
             "rounds_per_task": config.rounds_per_task, "num_clients": stream.num_clients,
             "clients_per_round": clients_per_round, "backend": config.backend,
             "wall_s": round(time.perf_counter() - start, 3)}
  if result.task_info and any(k.startswith("basis/") for k in result.task_info[-1]):
    summary["basis"] = {k[len("basis/"):]: v for k, v in result.task_info[-1].items()
                        if k.startswith("basis/")}
  return result, summary


def main(argv):
  from absl import app, flags
  from fedjax_lab import checkpoint
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from launch import workdir as workdir_lib
  workdir_lib.quiet_logs()
  workdir_lib.use_compilation_cache()
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  try:
    with workdir_lib.open_run(workdir, config):
      _, summary = run(config, workdir, flags.FLAGS.progress)
  except (ValueError, FloatingPointError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary))


def _define_flags():
  # Defined here, not at import, so notebooks and tests can import run() next to
  # other launch scripts without clashing flag names.
  from absl import flags
  from ml_collections import config_flags
  default = os.path.join(os.path.dirname(__file__), "configs", "fot_permuted_digits.py")
  from launch import workdir as workdir_lib
  workdir_lib.exit_on_unknown_override(sys.argv, default)
  config_flags.DEFINE_config_file(
      "config", default,
      "Path to an ml_collections config file (optionally path:algorithm); override fields "
      "with --config.KEY=VALUE.")
  flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints (resumes).")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  from launch import workdir as workdir_lib   # --resume, --verbose_logs
  del workdir_lib


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
