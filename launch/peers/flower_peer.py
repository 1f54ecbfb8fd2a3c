"""Flower (flwr 1.42, Ray simulation engine) on the peers' digits workload.

    python flower_peer.py --data=peers_digits.npz --repeats=5

Runs inside its own environment (flwr[simulation], jax, optax); never imports fedjax_lab.
The .npz (written by ``launch.peers.run_peers``) holds the clients ``x [K, n, 64]``,
``y [K, n]``, evaluation digits ``eval_x``/``eval_y`` and the starting MLP ``w1 [64, 128]``,
``b1 [128]``, ``w2 [128, 10]``, ``b2 [10]``. Each client is a ``NumPyClient`` whose ``fit``
runs one epoch of mini-batch SGD with one jitted JAX step per batch; the server is
Flower's ``FedAvg`` strategy (weighted by example counts, i.e. server lr 1). One simulation
runs ``warmup + repeats`` rounds at each cohort size in turn (one Ray start, counted in
the first cohort's warm-up), and prints one JSON line with the median seconds per round
per cohort and the median time spent inside ``fit`` (the rest of a round is the engine:
message routing, Ray calls, and its 0.1 s polling of the message store).

The training arithmetic (``local_sgd``, ``weighted_average``, ``fedavg_round``) is plain
JAX/numpy and importable without flwr, so it can be checked against fedjax_lab.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
  import flwr
  from flwr.client import ClientApp, NumPyClient
  from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
  from flwr.server import ServerApp, ServerAppComponents, ServerConfig
  from flwr.server.strategy import FedAvg
  from flwr.simulation import run_simulation
except ImportError:   # the arithmetic below is importable without flwr
  flwr = None


def apply(params, x):
  """MLP 64-128-10. params: [w1 [64, 128], b1 [128], w2 [128, 10], b2 [10]]; x [B, 64]."""
  w1, b1, w2, b2 = params
  return jax.nn.relu(x @ w1 + b1) @ w2 + b2


def _mean_loss(params, x, y):
  logp = jax.nn.log_softmax(apply(params, x))
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@jax.jit
def sgd_step(params, x, y, lr):
  """One SGD step on the batch's mean cross-entropy."""
  grads = jax.grad(_mean_loss)(params, x, y)
  return [p - lr * g for p, g in zip(params, grads)]


def local_sgd(params, x, y, lr, batch_size, order=None):
  """One epoch of mini-batch SGD over a client's rows, in ``order`` (default: as stored).

  Args:
    params: list of numpy arrays (see ``apply``).
    x: float32 [n, 64]; y: int [n].
    order: optional permutation of range(n).
  Returns:
    list of numpy arrays, the client's params after its last batch (last batch may be partial).
  """
  if order is not None:
    x, y = x[order], y[order]
  p = [jnp.asarray(a) for a in params]
  for lo in range(0, len(y), batch_size):
    p = sgd_step(p, x[lo:lo + batch_size], y[lo:lo + batch_size], lr)
  return [np.asarray(a) for a in p]


def weighted_average(results):
  """Flower FedAvg's aggregate: ``sum_k n_k w_k / sum_k n_k`` over ``[(params, n_k)]``."""
  total = sum(n for _, n in results)
  return [sum(n * np.asarray(p[i], np.float64) for p, n in results) / total
          for i in range(len(results[0][0]))]


def fedavg_round(params, clients, lr, batch_size, orders=None):
  """One FedAvg round (server lr 1) as the Flower clients and strategy compute it.

  clients: list of (x [n, 64], y [n]); orders: optional per-client permutations.
  """
  orders = orders or [None] * len(clients)
  return weighted_average([(local_sgd(params, x, y, lr, batch_size, o), len(y))
                           for (x, y), o in zip(clients, orders)])


def accuracy(params, x, y):
  return float(np.mean(np.argmax(np.asarray(apply(params, x)), 1) == y))


_DATA = {}


def _load(path):
  if path not in _DATA:
    _DATA[path] = dict(np.load(path))
  return _DATA[path]


if flwr is not None:

  class DigitsClient(NumPyClient):
    """One client: the jitted step above over its rows, reshuffled each round."""

    def __init__(self, cid):
      self.cid = cid

    def fit(self, parameters, config):
      start = time.perf_counter()   # time inside fit, to tell training from engine overhead
      data = _load(str(config["data"]))
      x, y = data["x"][self.cid], data["y"][self.cid]
      order = np.random.default_rng([int(config["round"]), self.cid]).permutation(len(y))
      params = local_sgd(parameters, x, y, float(config["lr"]), int(config["batch_size"]), order)
      return [a.astype(np.float32) for a in params], len(y), {
          "fit_s": time.perf_counter() - start, "pid": os.getpid()}

  def _client_fn(context):
    return DigitsClient(int(context.node_config["partition-id"])).to_client()


  class TimedFedAvg(FedAvg):
    """FedAvg whose cohort size follows a per-round plan; records when each round ends."""

    def __init__(self, plan, **kwargs):
      super().__init__(**kwargs)
      self.plan = plan
      self.starts, self.ends, self.final, self.fit_s = {}, {}, None, {}

    def configure_fit(self, server_round, parameters, client_manager):
      cohort = self.plan[server_round - 1]
      self.fraction_fit = cohort / self.min_available_clients
      self.min_fit_clients = cohort
      self.starts.setdefault(server_round, time.perf_counter())
      return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
      if failures:
        raise RuntimeError(f"round {server_round}: {len(failures)} clients failed: {failures[:1]}")
      parameters, metrics = super().aggregate_fit(server_round, results, failures)
      self.ends[server_round] = time.perf_counter()
      self.fit_s[server_round] = [(r.metrics["fit_s"], r.metrics["pid"]) for _, r in results]
      self.final = parameters
      return parameters, metrics


def run(data_path, cohorts, warmup, repeats, lr, batch_size, num_cpus_per_client):
  data = _load(data_path)
  num_clients = len(data["x"])
  per = warmup + repeats
  plan = [c for c in cohorts for _ in range(per)]
  init = [data["w1"], data["b1"], data["w2"], data["b2"]]
  strategy = TimedFedAvg(
      plan, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_evaluate_clients=0,
      min_available_clients=num_clients, initial_parameters=ndarrays_to_parameters(init),
      on_fit_config_fn=lambda r: {"data": os.path.abspath(data_path), "round": r, "lr": lr,
                                  "batch_size": batch_size})

  def server_fn(context):
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=len(plan)))

  start = time.perf_counter()
  run_simulation(server_app=ServerApp(server_fn=server_fn),
                 client_app=ClientApp(client_fn=_client_fn), num_supernodes=num_clients,
                 backend_config={"client_resources": {"num_cpus": num_cpus_per_client,
                                                      "num_gpus": 0.0}})
  total = time.perf_counter() - start
  if len(strategy.ends) != len(plan):
    raise RuntimeError(f"simulation finished {len(strategy.ends)} of {len(plan)} rounds")
  # A round lasts from the end of the previous round (or its own start) to its aggregate.
  durations = [strategy.ends[r] - strategy.ends.get(r - 1, strategy.starts[r])
               for r in range(1, len(plan) + 1)]
  final = parameters_to_ndarrays(strategy.final)
  row = {"system": "flower", "framework": "flwr", "flwr": flwr.__version__,
         "jax": jax.__version__,
         "simulation_total_s": total,
         "accuracy": accuracy(final, data["eval_x"], data["eval_y"]),
         "checksum": float(sum(np.abs(a).sum() for a in final))}
  for i, cohort in enumerate(cohorts):
    mine = durations[i * per:(i + 1) * per]
    row[f"c{cohort}_s_per_round"] = statistics.median(mine[warmup:])
    row[f"c{cohort}_s_per_round_min"] = min(mine[warmup:])
    row[f"c{cohort}_s_per_round_max"] = max(mine[warmup:])
    row[f"c{cohort}_warmup_s"] = sum(mine[:warmup])
    timed = range(i * per + warmup + 1, (i + 1) * per + 1)
    fits = [f for r in timed for f, _ in strategy.fit_s[r]]
    row[f"c{cohort}_client_fit_s_median"] = statistics.median(fits)
  row["actor_processes"] = len({p for fits in strategy.fit_s.values() for _, p in fits})
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True)
  parser.add_argument("--cohorts", default="10,50")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--batch_size", type=int, default=10)
  parser.add_argument("--num_cpus_per_client", type=float, default=1.0)
  args = parser.parse_args()
  if flwr is None:
    raise SystemExit("flwr is not installed in this environment (pip install 'flwr[simulation]').")
  cohorts = [int(c) for c in args.cohorts.split(",")]
  # Ray ships the ClientApp to its actors by pickling; from ``__main__`` it would travel by
  # value, and every message would rebuild (and recompile) the jitted step. Importing this
  # file as a module (also on the actors' path) makes it travel by reference, so each actor
  # compiles once, as a packaged Flower app would.
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, here)
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
  import flower_peer
  row = flower_peer.run(args.data, cohorts, args.warmup, max(args.repeats, 3), args.lr,
                        args.batch_size, args.num_cpus_per_client)
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
