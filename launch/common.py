"""Builds a run from a config: data, model, method; shared by launch scripts and notebooks."""
import dataclasses
import time
from typing import Any, Optional

import jax

import algorithms
from fedjax_lab import data as data_lib
from fedjax_lab import metrics as metrics_lib
from fedjax_lab import models as models_lib
from fedjax_lab import training


@dataclasses.dataclass
class Experiment:
  algorithm: Any
  model: models_lib.Model
  train_data: data_lib.FederatedData
  test_arrays: dict
  init_params: Any


def build(config) -> Experiment:
  """Data, model, initial params and method from a config (raises ValueError on bad keys)."""
  train_data, test_arrays = data_lib.load_federated(
      data=config.data, partition=config.partition, num_clients=config.num_clients,
      alpha=config.get("alpha", 0.5), seed=config.seed,
      test_fraction=config.get("test_fraction", 0.2))
  num_classes = int(max(train_data.arrays["y"].max(), test_arrays["y"].max())) + 1
  if config.model == "mlp":
    model = models_lib.mlp(config.get("hidden", (200,)), num_classes)
  else:
    model = models_lib.get(config.model, num_classes=num_classes)
  init_params = model.init(jax.random.PRNGKey(config.seed + 1), train_data.arrays["x"][:1])
  method = algorithms.build(config.algorithm, config, models_lib.classification_loss(model))
  return Experiment(method, model, train_data, test_arrays, init_params)


def run(config, workdir: Optional[str] = None, progress: bool = True):
  """Trains per ``config``; returns (state, history, summary dict)."""
  start = time.perf_counter()
  exp = build(config)
  opts = training.TrainOptions(
      rounds=config.rounds, clients_per_round=config.clients_per_round, backend=config.backend,
      seed=config.seed, eval_every=config.eval_every,
      checkpoint_every=config.get("checkpoint_every", 0),
      rounds_per_call=config.get("rounds_per_call", 1), workdir=workdir, progress=progress)
  state, history = training.train(exp.algorithm, exp.init_params, exp.train_data,
                                  metrics_lib.make_evaluator(exp.model), exp.test_arrays, opts)
  final = metrics_lib.to_python(metrics_lib.make_evaluator(exp.model)(state.params, exp.test_arrays))
  summary = {"algorithm": config.algorithm, "rounds": int(state.round),
             "test_accuracy": final["accuracy"], "test_loss": final["loss"],
             "train_loss": history[-1]["train_loss"] if history else None,
             "backend": config.backend, "num_clients": exp.train_data.num_clients,
             "clients_per_round": config.clients_per_round,
             "wall_s": round(time.perf_counter() - start, 3)}
  return state, history, summary
