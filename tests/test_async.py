"""The jitted clock against a plain-Python heapq event simulation, and its pieces."""
import heapq

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import aggregate, oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.asynchronous import clock, methods, staleness, system as system_lib
from fedjax_lab.client import LocalSchedule
from tests.reference import linear_example_loss, linear_problem, local_sgd, to_numpy

SIZES = [3, 4, 5, 2, 6, 3, 4]
# Seconds per local step and per job's link: many equal finish times, so ties by id matter.
STEP_S = np.array([1.0, 2.0, 1.0, 2.0, 1.0, 3.0, 0.5], np.float32)
COMM_S = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0], np.float32)
EPOCHS, LR = 2, 0.1


def _problem():
  data, params = linear_problem(SIZES, dim=3)
  alg = FederatedAlgorithm(
      "fedavg", oracles.first_order(linear_example_loss), optax.sgd(LR), optax.sgd(1.0),
      LocalSchedule(batch_size=None, epochs=EPOCHS, shuffle=False), weighting="uniform")
  system = system_lib.SystemModel(jnp.asarray(STEP_S), jnp.asarray(COMM_S))
  return data, params, alg, system


def heapq_reference(data, params, rng, concurrency, buffer_size, updates, server):
  """Event simulation with a heap of (finish, client id): who arrives, when, how stale.

  ``server(model, buffer) -> model`` applies one update; ``buffer`` holds
  ``(trained, downloaded model, staleness)`` of each arrival.
  """
  n = data.num_clients
  model = to_numpy(params)
  version, dispatched, in_flight, heap, log = 0, 0, set(), [], []

  def dispatch(t):
    nonlocal dispatched
    u = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng, 1), dispatched), (n,)))
    client = max((i for i in range(n) if i not in in_flight), key=lambda i: u[i])
    local = data.client(client)
    trained, steps = local_sgd(model, local["x"], local["y"], LR, len(local["y"]), EPOCHS)
    finish = np.float32(t) + (COMM_S[client] + np.float32(steps) * STEP_S[client])
    heapq.heappush(heap, (finish, client, version, dict(model), trained))
    in_flight.add(client)
    dispatched += 1

  for _ in range(concurrency):
    dispatch(0.0)
  for _ in range(updates):
    buffer = []
    while len(buffer) < buffer_size:
      finish, client, downloaded, start_model, trained = heapq.heappop(heap)
      in_flight.discard(client)
      log.append((client, version - downloaded, float(finish)))
      buffer.append((trained, start_model, version - downloaded))
      dispatch(finish)
    model = server(model, buffer)
    version += 1
  return log, model


def sgd_server(lr, s, mix):
  def server(model, buffer):
    step = {k: np.zeros_like(v) for k, v in model.items()}
    for trained, start_model, tau in buffer:
      base = model if mix == "current" else start_model
      for k in model:
        step[k] += s(tau) * (trained[k] - base[k]) / len(buffer)
    return {k: model[k] + lr * step[k] for k in model}
  return server


def run_clock(alg, data, system, spec, params, rng, updates):
  run = clock.make_async(alg, data, system, spec)
  arrays, offsets = data.device_arrays()
  state = jax.jit(run.init)(params, rng, arrays, offsets)
  step = jax.jit(run.step_with_arrivals)
  log = []
  for _ in range(updates):
    state, metrics, arrivals = step(state, arrays, offsets)
    for ok, c, tau, t in zip(*(np.asarray(a) for a in (arrivals.valid, arrivals.client,
                                                         arrivals.staleness, arrivals.finish))):
      if ok:
        log.append((int(c), int(tau), float(t)))
  return log, state, metrics


@pytest.mark.parametrize("name", ["fedbuff", "fedasync"])
def test_clock_matches_heapq_simulation(name):
  data, params, alg, system = _problem()
  rng = jax.random.PRNGKey(3)
  if name == "fedbuff":
    alg, spec = methods.fedbuff(alg, concurrency=3, buffer_size=2)
    ref_log, ref_model = heapq_reference(data, params, rng, 3, 2, 12, sgd_server(
        1.0, lambda t: 1 / np.sqrt(1 + t), "delta"))
  else:
    alg = FederatedAlgorithm(alg.name, alg.oracle, alg.client_tx, optax.sgd(0.6),
                             alg.schedule, weighting="uniform")
    alg, spec = methods.fedasync(alg, concurrency=3, staleness=staleness.hinge(2.0, 1))
    ref_log, ref_model = heapq_reference(data, params, rng, 3, 1, 20, sgd_server(
        0.6, lambda t: 1.0 if t <= 1 else 1 / (2.0 * (t - 1) + 1), "current"))
  log, state, _ = run_clock(alg, data, system, spec, params, rng, len(ref_log) // spec.buffer_size)
  assert [c for c, _, _ in log] == [c for c, _, _ in ref_log]
  assert [tau for _, tau, _ in log] == [tau for _, tau, _ in ref_log]
  np.testing.assert_allclose([t for *_, t in log], [t for *_, t in ref_log], rtol=0, atol=0)
  assert max(tau for _, tau, _ in log) >= 2      # the problem does produce stale updates
  assert len({t for *_, t in log}) < len(log)    # and simultaneous arrivals
  for k in ref_model:
    np.testing.assert_allclose(np.asarray(state.params[k]), ref_model[k], rtol=1e-5, atol=1e-5)


def test_sync_waits_for_the_slowest_and_deadline_drops():
  data, params, alg, system = _problem()
  rng = jax.random.PRNGKey(0)
  alg_sync, spec = methods.fedavg_sync(alg, concurrency=4)
  log, state, metrics = run_clock(alg_sync, data, system, spec, params, rng, 1)
  durations = [COMM_S[c] + 2 * STEP_S[c] for c, _, _ in log]
  assert len(log) == 4 and float(metrics["sim_time"]) == pytest.approx(max(durations))
  # FedAvg's round: the uniform mean of the four clients' deltas.
  expected = {k: np.zeros_like(v) for k, v in to_numpy(params).items()}
  for c, _, _ in log:
    local = data.client(c)
    trained, _ = local_sgd(params, local["x"], local["y"], LR, len(local["y"]), EPOCHS)
    for k in expected:
      expected[k] += (trained[k] - to_numpy(params)[k]) / 4
  for k in expected:
    np.testing.assert_allclose(np.asarray(state.params[k]), params[k] + expected[k], atol=1e-5)
  deadline = sorted(durations)[1] + 0.25
  _, spec = methods.fedavg_sync(alg, concurrency=4, deadline_s=deadline)
  log_d, _, metrics_d = run_clock(alg_sync, data, system, spec, params, rng, 1)
  assert [c for c, _, _ in log_d] == [c for c, _, _ in log][:len(log_d)]
  assert int(metrics_d["arrivals"]) == sum(d <= deadline for d in durations)
  assert int(metrics_d["dropped"]) == 4 - int(metrics_d["arrivals"])
  assert float(metrics_d["sim_time"]) == pytest.approx(deadline)


def test_fedbuff_composes_with_fedadam_and_a_robust_aggregator():
  data, params, alg, system = _problem()
  rng = jax.random.PRNGKey(1)
  robust = FederatedAlgorithm(alg.name, alg.oracle, alg.client_tx, optax.adam(0.05),
                              alg.schedule, aggregator=aggregate.coordinate_median(),
                              weighting="uniform")
  robust, spec = methods.fedbuff(robust, concurrency=3, buffer_size=3)
  log, state, _ = run_clock(robust, data, system, spec, params, rng, 3)
  # Reference: per update, the coordinate-wise median of s(tau) * delta, then one Adam step.
  opt = optax.adam(0.05)
  opt_state = [opt.init({k: jnp.asarray(v) for k, v in params.items()})]

  def server(model, buffer):
    med = {k: np.median(np.stack([(t[k] - m[k]) / np.sqrt(1 + tau) for t, m, tau in buffer]),
                        axis=0) for k in model}
    x = {k: jnp.asarray(v, jnp.float32) for k, v in model.items()}
    upd, opt_state[0] = opt.update({k: -jnp.asarray(v, jnp.float32) for k, v in med.items()},
                                   opt_state[0], x)
    return to_numpy(optax.apply_updates(x, upd))

  ref_log, ref_model = heapq_reference(data, params, rng, 3, 3, 3, server)
  assert [c for c, _, _ in log] == [c for c, _, _ in ref_log]
  for k in ref_model:
    np.testing.assert_allclose(np.asarray(state.params[k]), ref_model[k], atol=1e-5)


def test_staleness_functions():
  tau = np.arange(8)
  np.testing.assert_allclose(staleness.polynomial(0.5)(tau), (tau + 1.0) ** -0.5, rtol=1e-6)
  np.testing.assert_allclose(staleness.fedbuff()(tau), 1 / np.sqrt(1 + tau), rtol=1e-6)
  np.testing.assert_allclose(staleness.hinge(10.0, 4)(tau),
                             [1 if t <= 4 else 1 / (10 * (t - 4) + 1) for t in tau], rtol=1e-6)
  np.testing.assert_array_equal(staleness.constant()(tau), np.ones(8))
  with pytest.raises(ValueError, match="Unknown staleness"):
    staleness.get("linear")


@pytest.mark.slow
def test_async_train_runs_resumes_and_reports(tmp_path):
  from launch import async_train
  from launch.configs import async_digits
  config = async_digits.get_config()
  config.num_clients, config.concurrency, config.buffer_size = 20, 4, 2
  config.local_epochs, config.updates, config.eval_every, config.rounds_per_call = 1, 4, 2, 2
  config.target_accuracy = 0.0      # reached at the first evaluation
  workdir = str(tmp_path / "run")
  state, history, summary = async_train.run(config, workdir, progress=False)
  assert summary["server_steps"] == 4 and summary["updates_applied"] == 4
  assert summary["arrivals"] == 8 == sum(summary["staleness_hist"])
  first_eval = next(r for r in history if "test_accuracy" in r)
  assert summary["time_to_target_s"] == first_eval["sim_time"] == history[1]["sim_time"]
  assert summary["simulated_time_s"] == pytest.approx(history[-1]["sim_time"])
  config.updates = 6
  state2, history2, summary2 = async_train.run(config, workdir, progress=False)
  assert [r["round"] for r in history2] == [5, 6]          # resumed from update 4
  assert summary2["simulated_time_s"] > summary["simulated_time_s"]
  config.target_accuracy = 1.01
  assert async_train.time_to_target(history2, 1.01) is None
  config.algorithm = "fedsomething"
  with pytest.raises(ValueError, match="Unknown asynchronous algorithm"):
    async_train.run(config, None, progress=False)


def test_system_trace_availability_and_next_start(tmp_path):
  path = tmp_path / "trace.csv"
  path.write_text("client_id,compute_s_per_step,comm_s\n1,0.5,2\n0,0.25,1\n")
  compute, comm = system_lib.read_trace(str(path), 2)
  np.testing.assert_array_equal(compute, [0.25, 0.5])
  np.testing.assert_array_equal(comm, [1.0, 2.0])
  path.write_text("0,0.25,1\n")
  with pytest.raises(ValueError, match="no row for clients"):
    system_lib.read_trace(str(path), 2)
  # Client 0 on in bins 2-3, client 1 in bin 5 (bins of 10 s, period 60 s).
  table = np.zeros((2, 6), bool)
  table[0, 2:4] = True
  table[1, 5] = True
  system = system_lib.SystemModel(jnp.ones(2), jnp.zeros(2), jnp.asarray(table), jnp.float32(10.0))
  for t, free, start, who in ((0.0, [1, 1], 20.0, [1, 0]), (25.0, [1, 1], 25.0, [1, 0]),
                              (25.0, [0, 1], 50.0, [0, 1]), (55.0, [1, 0], 80.0, [1, 0])):
    s, c = system_lib.next_start(system, jnp.float32(t), jnp.asarray(free, bool))
    assert float(s) == start and np.asarray(c).tolist() == [bool(w) for w in who]
  s, _ = system_lib.next_start(system, jnp.float32(0.0), jnp.zeros(2, bool))
  assert np.isinf(float(s))
  on = np.asarray(system_lib.markov(jax.random.PRNGKey(0), 2000, 50, 0.1, 0.3))
  assert abs(on.mean() - 0.75) < 0.02          # stationary p_on / (p_on + p_off)
  assert abs(np.asarray(system_lib.diurnal(jax.random.PRNGKey(0), 500, 24, 0.25)).mean() - 0.25) < 0.01


def test_fedau_weights_are_online_mean_intervals():
  init, reweight = methods.fedau_reweight(cutoff=3)
  stats = init(3)
  participants = [[0], [1], [0], [], [], [0, 2]]
  counter, sums, counts = np.zeros(3), np.zeros(3), np.zeros(3)
  for part in participants:
    valid = np.array([True] * len(part) + [False] * (2 - len(part)))
    ids = np.array(part + [0] * (2 - len(part)))
    arr = clock.Arrivals(jnp.asarray(valid), jnp.asarray(ids), *(jnp.zeros(2),) * 3,
                         jnp.zeros(2, jnp.int32))
    fake = clock.ClockState(*([None] * 15), stats=stats)
    factor, stats = reweight(fake, arr)
    counter += 1
    for n in range(3):
      if n in part or counter[n] >= 3:
        sums[n] += min(counter[n], 3)
        counts[n] += 1
        counter[n] = 0
    omega = sums / np.maximum(counts, 1)
    np.testing.assert_allclose(np.asarray(factor)[:len(part)],
                               [omega[n] * len(part) / 3 for n in part], rtol=1e-6)
