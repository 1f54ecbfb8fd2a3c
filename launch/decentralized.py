"""Decentralized (gossip) learning: every node trains and averages with its neighbours.

    python -m launch.decentralized --config=launch/configs/gossip_digits.py
    python -m launch.decentralized --config.topology=torus --config.algorithm=dfedsam
    python -m launch.decentralized --config.topology=exponential --workdir=/tmp/gossip

The last line printed is one JSON object: test_accuracy (of the nodes' average model),
node_test_accuracy (the mean over the nodes' own models), consensus_distance
((1/N) sum_i ||x_i - xbar||^2 at the end), spectral_gap (of the last round's matrix).
With --workdir, metrics go to metrics.jsonl and checkpoints to checkpoints/; running
again with the same --workdir resumes.
"""
import os
import time

from launch import workdir as workdir_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "gossip_digits.py")


def run(config, workdir=None, progress=True):
  """Trains per ``config``; returns ``(state, history, summary)``."""
  import jax
  from algorithms import decentralized as methods
  from fedjax_lab import data as data_lib
  from fedjax_lab import decentralized as dec
  from fedjax_lab import metrics as metrics_lib
  from fedjax_lab import models as models_lib
  from fedjax_lab import training

  start = time.perf_counter()
  train_data, test_arrays, info = data_lib.load_federated_with_info(
      data=config.data, partition=config.partition, num_clients=config.num_clients,
      alpha=config.get("alpha", 0.5), seed=config.seed,
      test_fraction=config.get("test_fraction", 0.2))
  if info.task != "classification":
    raise ValueError(f"launch.decentralized trains classifiers; {config.data} is {info.task}.")
  if config.model == "mlp":
    model = models_lib.mlp(config.get("hidden", (200,)), info.num_classes)
  else:
    model = models_lib.get(config.model, num_classes=info.num_classes)
  params = model.init(jax.random.PRNGKey(config.seed + 1), train_data.arrays["x"][:1])
  method = methods.from_config(config, models_lib.classification_loss(model),
                               train_data.num_clients)
  opts = training.TrainOptions(
      rounds=config.rounds, clients_per_round=train_data.num_clients, backend=config.backend,
      seed=config.seed, eval_every=config.eval_every,
      checkpoint_every=config.get("checkpoint_every", 0),
      rounds_per_call=config.get("rounds_per_call", 1), workdir=workdir, progress=progress)
  node_params = None
  if config.get("independent_init", False):   # node i: the model's init with seed + 1 + i
    inits = [model.init(jax.random.PRNGKey(config.seed + 1 + i), train_data.arrays["x"][:1])
             for i in range(train_data.num_clients)]
    node_params = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *inits)
  evaluate = metrics_lib.make_evaluator(model)
  state, history = dec.train(method, params, train_data, evaluate, test_arrays, opts,
                             node_params)
  final = metrics_lib.to_python(dec.node_evaluator(evaluate)(state.params, test_arrays))
  summary = {"algorithm": config.algorithm, "topology": config.topology,
             "rounds": int(state.round), "num_nodes": train_data.num_clients,
             "test_accuracy": final["accuracy"], "test_loss": final["loss"],
             "node_test_accuracy": final["node_accuracy"],
             "node_test_loss": final["node_loss"],
             "consensus_distance": final["consensus_distance"],
             "spectral_gap": history[-1]["spectral_gap"] if history else None,
             "train_loss": history[-1]["train_loss"] if history else None,
             "variance_correction": bool(config.get("variance_correction", False)),
             "independent_init": bool(config.get("independent_init", False)),
             "backend": config.backend, "wall_s": round(time.perf_counter() - start, 3)}
  return state, history, summary


if __name__ == "__main__":
  workdir_lib.run_as_script(run, _DEFAULT_CONFIG)
