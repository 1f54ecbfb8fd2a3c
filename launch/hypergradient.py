"""Exact hypergradients of a run's final test loss through all of its rounds.

    python -m launch.hypergradient --config.rounds=10 --wrt=client_lr,server_lr
    python -m launch.hypergradient --config.rounds=10 --wrt=client_lr --truncate=3 \
        --tune_steps=5 --tune_lr=0.3 --workdir=/tmp/hyper

``jax.grad`` of the final test loss (the number ``launch.train`` prints for the same
config) with respect to the named continuous config keys, through every round's local
training and aggregation (``studies.final_loss``; each round rematerialised, so memory
holds one state per round). ``--truncate=K`` differentiates through the last K rounds
only. ``--tune_steps=S`` then takes S Adam steps (``--tune_lr``) on the logarithms of
the named rates, one full run and its gradient per step. The last line printed is one
JSON object: test_loss, grad ({key: d test_loss / d key}), and with tuning the path of
(values, test_loss) and the tuned values; --workdir also gets it as hypergradient.json.
"""
import json
import os
import sys
import time


def hypergradient(config, wrt, truncate=None, remat=True):
  """``(test_loss, {key: gradient})`` of ``config``'s run at its values of ``wrt``."""
  import jax
  import jax.numpy as jnp
  from fedjax_lab import metrics as metrics_lib
  from fedjax_lab import studies
  from launch import sweep
  keys = list(wrt)
  build, exp, sampler, slots = sweep.study_setup(config, keys)
  evaluate = exp.evaluate or metrics_lib.make_evaluator(exp.model)
  loss = studies.final_loss(build, exp.train_data, evaluate, rounds=config.rounds,
                            clients_per_round=slots, truncate=truncate, remat=remat,
                            sampler=sampler, chunk_size=config.get("chunk_size"))
  arrays, offsets = exp.train_data.device_arrays()
  value_and_grad = jax.jit(jax.value_and_grad(loss))

  def at(values):
    hp = {k: jnp.asarray(values[k], jnp.float32) for k in keys}
    value, grad = value_and_grad(hp, jnp.int32(config.seed), arrays, offsets, exp.test_arrays)
    return float(value), {k: float(v) for k, v in grad.items()}

  return at


def tune(at, start: dict, steps: int, lr: float):
  """Adam on log(values) from ``start``: the path ``[(values, test_loss, grad)]``."""
  import math
  import jax.numpy as jnp
  import optax
  opt = optax.adam(lr)
  logs = {k: jnp.log(v) for k, v in start.items()}
  state = opt.init(logs)
  path = []
  for _ in range(steps + 1):
    values = {k: float(math.exp(float(v))) for k, v in logs.items()}
    value, grad = at(values)
    path.append({"values": values, "test_loss": value, "grad": grad})
    # d loss / d log v = v * d loss / d v
    updates, state = opt.update({k: jnp.asarray(values[k] * grad[k]) for k in logs}, state)
    logs = optax.apply_updates(logs, updates)
  return path


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  config = f.config
  wrt = [k.strip() for k in f.wrt if k.strip()]
  if not wrt:
    raise app.UsageError("--wrt names at least one config key (e.g. client_lr,server_lr).")
  start = time.perf_counter()
  from launch import workdir as workdir_lib
  try:
    with workdir_lib.locked(f.workdir):   # one writer of WORKDIR/hypergradient.json
      out = _run(config, wrt, f)
      out["wall_s"] = round(time.perf_counter() - start, 3)
      if f.workdir:
        with open(os.path.join(f.workdir, "hypergradient.json"), "w") as fh:
          json.dump(out, fh, indent=1)
  except ValueError as e:   # WorkdirError included: a second run on a held workdir
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(out))


def _run(config, wrt, f) -> dict:
  at = hypergradient(config, wrt, f.truncate, f.remat)
  values = {k: float(config[k]) for k in wrt}
  test_loss, grad = at(values)
  out = {"test_loss": test_loss, "grad": grad, "values": values, "rounds": config.rounds,
         "truncate": f.truncate}
  if f.tune_steps:
    path = tune(at, values, f.tune_steps, f.tune_lr)
    best = min(path, key=lambda p: p["test_loss"])
    out.update(tune_path=path, tuned=best["values"], tuned_test_loss=best["test_loss"])
  return out


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(__file__), "configs", "fedavg_digits.py"),
      "The launch.train config; override fields with --config.KEY=VALUE.")
  flags.DEFINE_list("wrt", ["client_lr", "server_lr"], "Continuous config keys to differentiate.")
  flags.DEFINE_integer("truncate", None, "Differentiate through the last K rounds only.")
  flags.DEFINE_bool("remat", True, "Rematerialise each round in the backward pass.")
  flags.DEFINE_integer("tune_steps", 0, "Adam steps on log(values) after the gradient.")
  flags.DEFINE_float("tune_lr", 0.2, "The tuning's Adam step size (on log values).")
  flags.DEFINE_string("workdir", None, "Writes hypergradient.json here.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
