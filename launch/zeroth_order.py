"""Federated zeroth-order optimisation of a black-box problem (FZooS, FedZO and variants).

    python -m launch.zeroth_order                                  # FZooS, synthetic quadratic
    python -m launch.zeroth_order --config.algorithm=fedzo         # FedZO, the same problem
    python -m launch.zeroth_order --config=launch/configs/fzoos_attack_digits.py
    python -m launch.zeroth_order --config.problem=ackley --config.rounds=20

Each round logs F(x_r) and the total number of function queries (all clients, all
rounds). The last line printed is one JSON object: algorithm, problem, rounds,
objective (final F), queries, wall_s, ... With --workdir, per-round records go to
metrics.jsonl and the run state to checkpoints/ (running again resumes).

``run(config)`` is importable (notebooks) without defining any flag.
"""
import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

# Methods that only query function values (the registry also holds first-order ones).
ALGORITHMS = ("fzoos", "fedzo", "fedzo_prox", "fedzo_scaf", "fedzo_diff")

PROBLEM_KEYS = {
    "quadratic": ("dim", "num_clients", "div"),
    "ackley": ("dim", "num_clients", "div"),
    "levy": ("dim", "num_clients", "div"),
    "attack": ("num_clients", "portion", "eps", "hidden", "trial"),
    "metric": ("score", "portion"),
}


def make_problem(config):
  """The ``fedjax_lab.objectives.Problem`` named by ``config.problem``."""
  from fedjax_lab import objectives
  if config.problem not in PROBLEM_KEYS:
    raise ValueError(f"Unknown problem {config.problem!r}; choose one of "
                     f"{', '.join(PROBLEM_KEYS)}.")
  kwargs = {k: config[k] for k in PROBLEM_KEYS[config.problem] if k in config}
  return objectives.make(config.problem, seed=config.get("problem_seed", 0), **kwargs)


def make_runner(algorithm, problem, clients_per_round: int, backend="vmap",
                safeguard: bool = False):
  """``run(state, arrays, offsets, num_rounds) -> (state, metrics [num_rounds])``.

  Every round's metrics hold the round engine's plus ``objective`` (F at the new
  global point), the problem's extra metrics and ``queries`` (the total over all
  clients so far, from their ``'queries'`` counters). ``safeguard`` keeps x_r when F
  does not decrease (FZooS's code; it evaluates the global objective). ``backend``
  is a ``parallel.Backend`` or its name.
  """
  from fedjax_lab import parallel
  from fedjax_lab.algorithm import make_round
  backend = parallel.get_backend(backend)
  round_fn = make_round(algorithm, problem.data, clients_per_round, backend)

  def round_and_evaluate(state, arrays, offsets):
    new_state, metrics = round_fn(state, arrays, offsets)
    # One row per client: the packed arrays are every client's objective.
    result = problem.evaluate(new_state.params, arrays)
    if safeguard:
      before = problem.global_value(state.params, arrays)
      keep = result["objective"] > before
      new_state = new_state._replace(params=jnp.where(keep, state.params, new_state.params))
      result = jax.tree.map(lambda old, new: jnp.where(keep, old, new),
                            problem.evaluate(state.params, arrays), result)
    metrics = dict(metrics, **result)
    metrics["queries"] = jnp.sum(new_state.client_states["queries"])
    return new_state, metrics

  return backend.scan_rounds(round_and_evaluate)


def run(config, workdir: Optional[str] = None, progress: bool = True):
  """Runs ``config.rounds`` rounds; returns ``(state, history, summary)``.

  ``history`` is one dict per round (``round``, ``objective``, ``queries``, ...).
  """
  import algorithms
  from fedjax_lab import checkpoint as checkpoint_lib
  from fedjax_lab import metrics as metrics_lib
  start = time.perf_counter()
  if config.rounds < 0:
    raise ValueError(f"rounds must be >= 0, got {config.rounds}.")
  if config.algorithm not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm {config.algorithm!r} for black-box problems; choose "
                     f"one of {', '.join(ALGORITHMS)}.")
  problem = make_problem(config)
  if config.clients_per_round > problem.num_clients or config.clients_per_round < 1:
    raise ValueError(f"clients_per_round={config.clients_per_round} must be in [1, "
                     f"{problem.num_clients}] (the problem has {problem.num_clients} clients).")
  algorithm = algorithms.build(config.algorithm, config, problem)
  runner = make_runner(algorithm, problem, config.clients_per_round, config.backend,
                       config.get("safeguard", False))
  arrays, offsets = problem.data.device_arrays()
  state = algorithm.init(jnp.asarray(problem.x0), jax.random.PRNGKey(config.seed),
                         problem.num_clients)
  initial = metrics_lib.to_python(jax.jit(problem.evaluate)(state.params, arrays))

  checkpointer, writer = None, None
  if workdir:
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    resumed = checkpointer.latest_round()
    if resumed is not None:
      state = checkpointer.restore(state)
    writer = metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resumed)
  history = []
  current = int(state.round)
  per_call = max(int(config.get("rounds_per_call", 1)), 1)
  bar = tqdm.tqdm(total=config.rounds, initial=min(current, config.rounds),
                  disable=not progress, desc=config.algorithm, unit="round",
                  dynamic_ncols=True)
  try:
    while current < config.rounds:
      count = min(per_call, config.rounds - current)
      state, chunk = runner(state, arrays, offsets, count)
      chunk = {k: np.asarray(v) for k, v in chunk.items()}
      records = [{"round": current + i + 1, **{k: v[i].item() for k, v in chunk.items()}}
                 for i in range(count)]
      current += count
      history.extend(records)
      if writer:
        for record in records:
          writer.write(record)
      bar.set_postfix(F=f"{records[-1]['objective']:.4g}", queries=records[-1]["queries"])
      bar.update(count)
      if checkpointer and (current == config.rounds or (
          config.get("checkpoint_every", 0) and current % config.checkpoint_every == 0)):
        checkpointer.save(current, state)
  finally:
    bar.close()
    if checkpointer:
      checkpointer.close()

  final = metrics_lib.to_python(jax.jit(problem.evaluate)(state.params, arrays))
  queries = int(np.sum(np.asarray(state.client_states["queries"])))
  summary = {"algorithm": config.algorithm, "problem": problem.name, "rounds": int(state.round),
             "objective": final["objective"], "initial_objective": initial["objective"],
             "queries": queries, "queries_per_client": queries / problem.num_clients,
             "dim": problem.dim, "num_clients": problem.num_clients,
             "clients_per_round": config.clients_per_round, "backend": config.backend,
             "wall_s": round(time.perf_counter() - start, 3)}
  summary.update({k: v for k, v in final.items() if k != "objective"})
  if problem.minimum is not None:
    summary["minimum"] = problem.minimum
  return state, history, summary


def main(argv, config_flag, workdir_flag, progress_flag):
  from absl import app
  from fedjax_lab import checkpoint
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = config_flag.value
  if workdir_flag.value:
    os.makedirs(workdir_flag.value, exist_ok=True)
    with open(os.path.join(workdir_flag.value, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  try:
    _, _, summary = run(config, workdir_flag.value, progress_flag.value)
  except (ValueError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(__file__), "configs", "fzoos_synthetic.py"),
      "Path to an ml_collections config file; override fields with --config.KEY=VALUE.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
  _PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
  app.run(lambda argv: main(argv, _CONFIG, _WORKDIR, _PROGRESS))
