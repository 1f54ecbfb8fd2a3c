"""Trains an asynchronous method under the simulated clock (fedjax_lab.asynchronous).

    python -m launch.async_train --config=launch/configs/async_digits.py
    python -m launch.async_train --config=launch/configs/async_digits.py \
        --config.algorithm=fedavg_sync --workdir=/tmp/sync --progress=false

One server update is one step of training.run_loop (workdir, resume, metrics.jsonl and
checkpoints as launch.train). The last line printed is one JSON object with
test_accuracy, simulated_time_s, time_to_target_s (simulated seconds at the first
evaluation reaching config.target_accuracy; null if none did), updates_applied,
mean_staleness, the staleness histogram and the utilisation.
"""
import dataclasses
import json
import os
import time

from launch import workdir as workdir_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "async_digits.py")

METHODS = ("fedavg_sync", "fedasync", "fedbuff", "fedfix", "fedcompass", "fedau", "fedau_sync",
           "fedamd", "afa_cd")


def build_system(config, train_data, key):
  import jax
  import numpy as np
  from fedjax_lab.asynchronous import system as system_lib
  n = train_data.num_clients
  k_sys, k_avail = jax.random.split(key)
  table = None
  if config.availability == "diurnal":
    table = system_lib.diurnal(k_avail, n, config.availability_bins, config.diurnal_duty)
  elif config.availability == "markov":
    table = system_lib.markov(k_avail, n, config.availability_bins, config.markov_p_off,
                              config.markov_p_on)
  elif config.availability == "windows":
    table = system_lib.windows(config.windows_trace, n, config.availability_bin_s)
  elif config.availability != "always":
    raise ValueError(f"Unknown availability {config.availability!r}; choose always, diurnal, "
                     "markov or windows.")
  if config.trace:
    system = system_lib.system_from_trace(config.trace, n, table, config.availability_bin_s,
                                          config.jitter)
  else:
    system = system_lib.make_system(
        k_sys, n, config.compute, config.compute_scale, config.compute_sigma,
        config.compute_shape, config.comm, config.comm_scale, config.comm_sigma,
        available=table, bin_s=config.availability_bin_s, jitter=config.jitter)
  if config.slow_label_factor != 1.0:
    labels = train_data.arrays["y"]
    major = np.array([np.bincount(labels[lo:hi], minlength=10).argmax() if hi > lo else 0
                      for lo, hi in zip(train_data.client_offsets[:-1], train_data.client_offsets[1:])])
    factor = np.where(major < 5, config.slow_label_factor, 1.0).astype(np.float32)
    system = system._replace(compute_s_per_step=system.compute_s_per_step * factor,
                             comm_s=system.comm_s * factor)
  return system


def build_method(config, base, train_data):
  """``(algorithm, AsyncSpec, arrivals per update)`` of ``config.algorithm``."""
  import optax
  from fedjax_lab.asynchronous import clock, methods, staleness
  from fedjax_lab.transforms import proximal
  name, m = config.algorithm, config.concurrency
  if name == "fedavg_sync":
    alg, spec = methods.fedavg_sync(base, m, config.deadline_s or None)
    return alg, spec, m
  if name == "fedasync":
    alg = dataclasses.replace(
        base, server_tx=optax.sgd(config.fedasync_alpha),
        client_tx=optax.chain(proximal(config.fedasync_rho), base.client_tx))
    s = staleness.get(config.staleness, config.staleness_a, config.staleness_b)
    alg, spec = methods.fedasync(alg, m, s)
    return alg, spec, 1
  if name == "fedbuff":
    alg, spec = methods.fedbuff(base, m, config.buffer_size)
    return alg, spec, config.buffer_size
  if name == "fedfix":
    alg, spec = methods.fedfix(base, m, config.window_s)
    return alg, spec, max(1, m // 4)
  if name == "fedcompass":
    steps = clock.client_steps(base, train_data.client_sizes, int(train_data.max_client_size))
    top = config.compass_max_steps or int(steps.max())
    alg, spec = methods.fedcompass(base, m, config.buffer_size,
                                   min(config.compass_min_steps, top), top)
    return alg, spec, config.buffer_size
  if name == "fedau":
    alg, spec = methods.fedau(base, m, config.buffer_size, config.fedau_cutoff)
    return alg, spec, config.buffer_size
  if name == "fedau_sync":
    alg, spec = methods.fedau(base, m, cutoff=config.fedau_cutoff, sync=True)
    return alg, spec, m
  if name == "fedamd":
    alg, spec = methods.fedamd(base, m, config.fedamd_anchor_prob, config.deadline_s or None)
    return alg, spec, m
  if name == "afa_cd":
    steps = clock.client_steps(base, train_data.client_sizes, int(train_data.max_client_size))
    top = config.afa_max_steps or int(steps.max())
    alg = dataclasses.replace(base, server_tx=optax.sgd(config.afa_server_lr))
    alg, spec = methods.afa_cd(alg, m, config.buffer_size, min(config.afa_min_steps, top), top)
    return alg, spec, config.buffer_size
  raise ValueError(f"Unknown asynchronous algorithm {name!r}; choose one of {', '.join(METHODS)}.")


def time_to_target(records, target):
  for r in records:
    if "test_accuracy" in r and r["test_accuracy"] >= target:
      return r["sim_time"]
  return None


class _ClockRecords:
  """Adds the cumulative staleness histogram to each evaluation record."""

  def next_stop(self, current):
    return None

  def start(self, loop):
    pass

  def __call__(self, loop):
    import numpy as np
    if "test_accuracy" in loop.records[-1]:
      loop.records[-1]["staleness_hist"] = np.asarray(
          loop.state.extra["clock"].staleness_hist).tolist()


def run(config, workdir=None, progress=True):
  """Trains per ``config``; returns (state, history, summary dict)."""
  import jax
  import numpy as np
  from fedjax_lab import metrics as metrics_lib
  from fedjax_lab import training
  from fedjax_lab.asynchronous import clock
  from launch import common
  start = time.perf_counter()
  base_config = config.copy_and_resolve_references()
  base_config.algorithm = config.base_algorithm
  exp = common.build(base_config)
  system = build_system(config, exp.train_data, jax.random.PRNGKey(config.seed + 2))
  alg, spec, per_update = build_method(config, exp.algorithm, exp.train_data)
  sim = clock.make_async(alg, exp.train_data, system, spec, backend=config.get("backend", "vmap"))
  updates = config.updates or max(1, config.sync_rounds * config.concurrency // per_update)
  eval_every = config.eval_every or max(1, round(config.concurrency / per_update))
  arrays, offsets = exp.train_data.device_arrays()
  init_state = jax.jit(sim.init)(exp.init_params, jax.random.PRNGKey(config.seed), arrays, offsets)
  opts = training.TrainOptions(
      rounds=updates, clients_per_round=config.concurrency,
      backend=config.get("backend", "vmap"), seed=config.seed,
      eval_every=eval_every, checkpoint_every=config.checkpoint_every,
      rounds_per_call=config.rounds_per_call, workdir=workdir, progress=progress)
  evaluate = exp.evaluate or metrics_lib.make_evaluator(exp.model)
  loop = training.run_loop(alg, exp.init_params, exp.train_data, evaluate, exp.test_arrays, opts,
                           round_wrapper=lambda _: sim.step, actions=[_ClockRecords()],
                           init_state=init_state)
  state, history = loop.state, loop.history
  records = history
  if workdir and os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f if line.strip()]
  final = metrics_lib.to_python(evaluate(state.params, exp.test_arrays))
  c = state.extra["clock"]
  hist = np.asarray(c.staleness_hist)
  arrivals = int(hist.sum())
  summary = {
      "algorithm": config.algorithm, "base_algorithm": config.base_algorithm,
      "test_accuracy": final["accuracy"], "test_loss": final["loss"],
      "simulated_time_s": float(c.time),
      "time_to_target_s": time_to_target(records, config.target_accuracy),
      "target_accuracy": config.target_accuracy,
      "updates_applied": int(c.version), "server_steps": int(state.round),
      "arrivals": arrivals,
      "mean_staleness": float((hist * np.arange(hist.size)).sum() / max(arrivals, 1)),
      "staleness_hist": hist.tolist(),
      "utilisation": float(c.busy_s / max(config.concurrency * float(c.time), 1e-12)),
      "dropped": int(c.dropped), "concurrency": config.concurrency,
      "num_clients": exp.train_data.num_clients,
      "wall_s": round(time.perf_counter() - start, 3)}
  return state, history, summary


if __name__ == "__main__":
  workdir_lib.run_as_script(run, _DEFAULT_CONFIG)
