"""FedJAX 0.0.17 on the peers' digits workload; runs inside its own environment.

    python fedjax_peer.py --data=peers_digits.npz --repeats=5

Standalone: imports only fedjax (with jax 0.4.30, haiku, numpy), never fedjax_lab. The
.npz (written by ``launch.peers.run_peers``) holds the clients ``x [K, n, 64]``, ``y [K, n]``,
evaluation digits ``eval_x``/``eval_y`` and the starting MLP ``w1 [64, 128]``, ``b1``,
``w2 [128, 10]``, ``b2``. FedAvg is ``fedjax.algorithms.fed_avg`` with FedJAX's
default ``for_each_client`` backend (Python loops over clients and batches around one
jitted step). Prints one JSON
line: seconds per round per cohort (median of ``repeats`` rounds after ``warmup`` rounds,
client sampling included; the cohorts run one after the other on one model), the
warm-up time, and the final model's accuracy on the evaluation digits and its checksum
(sum of absolute parameter values).
"""
import argparse
import json
import statistics
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import fedjax
from fedjax.algorithms import fed_avg


def _forward(x):
  h = jax.nn.relu(hk.Linear(128, name="hidden")(x))
  return hk.Linear(10, name="logits")(h)


def _model(sample_x):
  transformed = hk.transform(lambda batch: _forward(batch["x"]))

  def train_loss(batch, logits):
    # Per-example softmax cross-entropy; FedJAX averages it over the (masked) batch.
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]

  return fedjax.create_model_from_haiku(
      transformed_forward_pass=transformed,
      sample_batch={"x": sample_x, "y": np.zeros(1, np.int32)},
      train_loss=train_loss)


def _params(data):
  return {"hidden": {"w": jnp.asarray(data["w1"]), "b": jnp.asarray(data["b1"])},
          "logits": {"w": jnp.asarray(data["w2"]), "b": jnp.asarray(data["b2"])}}


def _accuracy(params, data):
  hidden, out = params["hidden"], params["logits"]
  h = np.maximum(data["eval_x"] @ np.asarray(hidden["w"]) + np.asarray(hidden["b"]), 0)
  logits = h @ np.asarray(out["w"]) + np.asarray(out["b"])
  return float(np.mean(np.argmax(logits, 1) == data["eval_y"]))


def build(data, lr, batch_size):
  """(federated data, FedJAX FedAvg with client SGD(lr), server SGD(1), one epoch of batches)."""
  fd = fedjax.InMemoryFederatedData({
      str(i).encode(): {"x": data["x"][i], "y": data["y"][i]} for i in range(len(data["x"]))})
  model = _model(data["x"][0, :1])
  algorithm = fed_avg.federated_averaging(
      grad_fn=fedjax.model_grad(model),
      client_optimizer=fedjax.optimizers.sgd(lr),
      server_optimizer=fedjax.optimizers.sgd(1.0),
      client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(batch_size=batch_size, num_epochs=1))
  return fd, algorithm


def run_cohort(fd, algorithm, state, cohort, warmup, repeats, seed=0):
  """(state, row) after ``warmup + repeats`` rounds of ``cohort`` clients each."""
  sampler = fedjax.client_samplers.UniformGetClientSampler(fd, cohort, seed)

  def one_round(state):
    state, _ = algorithm.apply(state, sampler.sample())
    jax.tree_util.tree_map(lambda a: a.block_until_ready(), state.params)
    return state

  start = time.perf_counter()
  for _ in range(warmup):
    state = one_round(state)
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = one_round(state)
    times.append(time.perf_counter() - start)
  return state, {f"c{cohort}_s_per_round": statistics.median(times),
                 f"c{cohort}_s_per_round_min": min(times),
                 f"c{cohort}_s_per_round_max": max(times),
                 f"c{cohort}_warmup_s": warmup_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True)
  parser.add_argument("--cohorts", default="10,50")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--batch_size", type=int, default=10)
  args = parser.parse_args()
  data = dict(np.load(args.data))
  row = {"system": "fedjax_default", "framework": "fedjax", "jax": jax.__version__,
         "backend": type(fedjax.get_for_each_client_backend()).__name__}
  fd, algorithm = build(data, args.lr, args.batch_size)
  state = algorithm.init(_params(data))
  for cohort in (int(c) for c in args.cohorts.split(",")):
    state, times = run_cohort(fd, algorithm, state, cohort, args.warmup, max(args.repeats, 3))
    row.update(times)
  row["accuracy"] = _accuracy(state.params, data)
  row["checksum"] = float(sum(np.abs(np.asarray(a)).sum()
                              for a in jax.tree_util.tree_leaves(state.params)))
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
