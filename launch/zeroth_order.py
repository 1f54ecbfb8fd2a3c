"""Federated zeroth-order optimisation of a black-box problem (FZooS, FedZO and variants).

    python -m launch.zeroth_order                                  # FZooS, synthetic quadratic
                                                                   # (80 s on an idle 2-core CPU)
    python -m launch.zeroth_order --config.algorithm=fedzo         # FedZO, the same problem
    python -m launch.zeroth_order --config=launch/configs/fzoos_attack_digits.py
    python -m launch.zeroth_order --config=launch/configs/fzoos_attack_mnist.py
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

# Methods that only query function values (the registry also holds first-order ones).
ALGORITHMS = ("fzoos", "fedzo", "fedzo_prox", "fedzo_scaf", "fedzo_diff")
# Methods whose round applies the safeguard itself (FZooS: before its round-end fit).
OWN_SAFEGUARD = ("fzoos",)

PROBLEM_KEYS = {
    "quadratic": ("dim", "num_clients", "div"),
    "ackley": ("dim", "num_clients", "div"),
    "levy": ("dim", "num_clients", "div"),
    "attack": ("num_clients", "portion", "eps", "hidden", "trial", "data"),
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


def round_with_objective(problem, safeguard: bool = False):
  """Wraps a round (``training.train``'s ``round_wrapper``) to log the objective.

  Every round's metrics hold the round engine's plus ``objective`` (F at the new
  global point), the problem's extra metrics and ``queries`` (the total over all
  clients so far, from their ``'queries'`` counters). ``safeguard`` keeps x_r when F
  does not decrease (FZooS's code; it evaluates the global objective).
  """
  def wrap(round_fn):
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
    return round_and_evaluate
  return wrap


def run(config, workdir: Optional[str] = None, progress: bool = True):
  """Runs ``config.rounds`` rounds; returns ``(state, history, summary)``.

  ``history`` is one dict per round (``round``, ``objective``, ``queries``, ...). The
  rounds loop is ``training.train``'s: checkpoints at every multiple of
  ``checkpoint_every``, resume from ``workdir``, and a stop naming the round where the
  loss became non-finite.
  """
  import algorithms
  from fedjax_lab import metrics as metrics_lib
  from fedjax_lab import training
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
  arrays, _ = problem.data.device_arrays()
  x0 = jnp.asarray(problem.x0)
  initial = metrics_lib.to_python(jax.jit(problem.evaluate)(x0, arrays))
  opts = training.TrainOptions(
      rounds=config.rounds, clients_per_round=config.clients_per_round, backend=config.backend,
      seed=config.seed, eval_every=0, checkpoint_every=config.get("checkpoint_every", 0),
      rounds_per_call=max(int(config.get("rounds_per_call", 1)), 1), workdir=workdir,
      progress=progress)
  state, history = training.train(
      algorithm, x0, problem.data, opts=opts,
      round_wrapper=round_with_objective(
          problem, config.get("safeguard", True) and config.algorithm not in OWN_SAFEGUARD))

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
  from launch import workdir as workdir_lib
  workdir_lib.quiet_logs()
  workdir_lib.use_compilation_cache()
  config = config_flag.value
  try:
    with workdir_lib.open_run(workdir_flag.value, config):
      _, _, summary = run(config, workdir_flag.value, progress_flag.value)
  except (ValueError, FloatingPointError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  from launch import workdir as workdir_lib
  _DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "fzoos_synthetic.py")
  workdir_lib.exit_on_unknown_override(sys.argv, _DEFAULT)
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT,
      "Path to an ml_collections config file; override fields with --config.KEY=VALUE.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
  _PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
  app.run(lambda argv: main(argv, _CONFIG, _WORKDIR, _PROGRESS))
