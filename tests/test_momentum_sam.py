"""FedAvg-M, SCAFFOLD-M, MimeLite, FedSAM, FedSpeed, FedNova and FedDyn: two rounds against
numpy transcriptions of their papers' equations, and their server steps composed with
FedHyper's global rate and a coordinate-wise median."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import fedhyper as fh
from algorithms.feddyn import feddyn
from algorithms.fednova import fednova
from algorithms.momentum import fedavg_cm, mimelite, scaffold_m, server_momentum
from algorithms.scaffold import global_control
from algorithms.sharpness import fedsam, fedspeed
from fedjax_lab import aggregate, sampling
from fedjax_lab.algorithm import aggregate_and_step, make_round
from fedjax_lab.client import LocalSchedule
from reference import linear_example_loss, linear_grad, linear_problem, to_numpy, tree_close

SIZES = (5, 3, 7)            # 3, 2 and 4 local steps of batch 2 (the last one partial)
NO_SHUFFLE = LocalSchedule(batch_size=2, epochs=1, shuffle=False)
LR = 0.1
COHORTS = np.array([[0, 2], [1, 2]])   # partial participation, |S| / N = 2 / 3


def run(method, data, params, rounds=2, cohorts=None):
  n = data.num_clients
  if cohorts is None:
    round_fn = make_round(method, data, n)
  else:
    round_fn = make_round(method, data, cohorts.shape[1],
                          sampler=sampling.schedule_sampler(cohorts, n))
  round_fn = jax.jit(round_fn)
  state = method.init(params, jax.random.PRNGKey(0), n)
  arrays, offsets = data.device_arrays()
  states = [state]
  for _ in range(rounds):
    state, _ = round_fn(state, arrays, offsets)
    states.append(state)
  return states


def batches(data, i):
  batch = data.client(i)
  x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
  return [(x[lo:lo + 2], y[lo:lo + 2]) for lo in range(0, len(y), 2)], x, y


def zeros(x):
  return {k: np.zeros_like(v) for k, v in x.items()}


def mean(trees, weights=None):
  weights = np.ones(len(trees)) if weights is None else np.asarray(weights, np.float64)
  weights = weights / weights.sum()
  return {k: sum(w * t[k] for w, t in zip(weights, trees)) for k in trees[0]}


def check(state, x, atol=1e-5):
  tree_close(state.params, x, atol=atol)


def test_fedavg_cm_two_rounds():
  data, params = linear_problem(SIZES)
  beta, gamma = 0.3, 0.5
  states = run(fedavg_cm(linear_example_loss, LR, gamma, beta, NO_SHUFFLE), data, params)
  x, g = to_numpy(params), zeros(to_numpy(params))
  for t in range(2):
    directions = []
    for i in range(3):
      y, steps = dict(x), 0
      for xb, yb in batches(data, i)[0]:
        grad = linear_grad(y, xb, yb)
        y = {k: y[k] - LR * (beta * grad[k] + (1 - beta) * g[k]) for k in y}
        steps += 1
      directions.append({k: (x[k] - y[k]) / (LR * steps) for k in x})
    g = mean(directions)
    x = {k: x[k] - gamma * g[k] for k in x}
    check(states[t + 1], x)
    tree_close(server_momentum(states[t + 1]), g, atol=1e-5)


def test_scaffold_m_two_rounds_with_partial_participation():
  data, params = linear_problem(SIZES)
  beta, gamma = 0.4, 0.6
  states = run(scaffold_m(linear_example_loss, LR, gamma, beta, NO_SHUFFLE), data, params,
               cohorts=COHORTS)
  x = to_numpy(params)
  g, c, ci = zeros(x), zeros(x), [zeros(x) for _ in SIZES]
  for t in range(2):
    directions, new_ci = [], {}
    for i in COHORTS[t]:
      y, total, steps = dict(x), zeros(x), 0
      for xb, yb in batches(data, i)[0]:
        grad = linear_grad(y, xb, yb)
        total = {k: total[k] + grad[k] for k in x}
        y = {k: y[k] - LR * (beta * (grad[k] - ci[i][k] + c[k]) + (1 - beta) * g[k]) for k in y}
        steps += 1
      directions.append({k: (x[k] - y[k]) / (LR * steps) for k in x})
      new_ci[i] = {k: total[k] / steps for k in x}
    g = mean(directions)
    c = {k: c[k] + sum(new_ci[i][k] - ci[i][k] for i in new_ci) / len(SIZES) for k in x}
    for i in new_ci:
      ci[i] = new_ci[i]
    x = {k: x[k] - gamma * g[k] for k in x}
    check(states[t + 1], x)
    tree_close(global_control(states[t + 1]), c, atol=1e-5)
    np.testing.assert_allclose(states[t + 1].client_states["w"][1], ci[1]["w"], atol=1e-5)


def test_mimelite_two_rounds():
  data, params = linear_problem(SIZES)
  beta = 0.8
  states = run(mimelite(linear_example_loss, LR, beta, schedule=NO_SHUFFLE), data, params)
  x = to_numpy(params)
  m = zeros(x)
  for t in range(2):
    ys, full = [], []
    for i in range(3):
      parts, xi, yi = batches(data, i)
      y = dict(x)
      for xb, yb in parts:
        grad = linear_grad(y, xb, yb)
        y = {k: y[k] - LR * ((1 - beta) * grad[k] + beta * m[k]) for k in y}
      ys.append(y)
      full.append(linear_grad(x, xi, yi))   # the full-batch gradient at x
    x = mean(ys)
    m = {k: (1 - beta) * mean(full)[k] + beta * m[k] for k in x}
    check(states[t + 1], x)
    tree_close(server_momentum(states[t + 1]), m, atol=1e-5)


def test_fedsam_two_rounds():
  data, params = linear_problem(SIZES)
  rho = 0.2
  states = run(fedsam(linear_example_loss, LR, rho, schedule=NO_SHUFFLE), data, params)
  x = to_numpy(params)
  for t in range(2):
    deltas = []
    for i in range(3):
      y = dict(x)
      for xb, yb in batches(data, i)[0]:
        grad = linear_grad(y, xb, yb)
        norm = np.sqrt(sum(np.sum(v ** 2) for v in grad.values()))
        grad = linear_grad({k: y[k] + rho * grad[k] / norm for k in y}, xb, yb)
        y = {k: y[k] - LR * grad[k] for k in y}
      deltas.append({k: y[k] - x[k] for k in x})
    step = mean(deltas, SIZES)
    x = {k: x[k] + step[k] for k in x}
    check(states[t + 1], x)


def test_fedspeed_two_rounds():
  data, params = linear_problem(SIZES)
  lam, alpha, rho = 2.0, 0.5, 0.1
  states = run(fedspeed(linear_example_loss, LR, lam, alpha, rho, schedule=NO_SHUFFLE), data,
               params)
  x = to_numpy(params)
  ghat = [zeros(x) for _ in SIZES]
  for t in range(2):
    xhats = []
    for i in range(3):
      y = dict(x)
      for xb, yb in batches(data, i)[0]:
        g1 = linear_grad(y, xb, yb)
        g2 = linear_grad({k: y[k] + rho * g1[k] for k in y}, xb, yb)
        y = {k: y[k] - LR * ((1 - alpha) * g1[k] + alpha * g2[k] - ghat[i][k]
                             + (y[k] - x[k]) / lam) for k in y}
      ghat[i] = {k: ghat[i][k] - (y[k] - x[k]) / lam for k in x}
      xhats.append({k: y[k] - lam * ghat[i][k] for k in x})
    x = mean(xhats)
    check(states[t + 1], x)
    np.testing.assert_allclose(states[t + 1].client_states["w"][2], ghat[2]["w"], atol=1e-5)


def test_fednova_two_rounds_with_local_momentum():
  data, params = linear_problem(SIZES)
  rho = 0.5
  states = run(fednova(linear_example_loss, LR, momentum=rho, schedule=NO_SHUFFLE), data,
               params)
  x = to_numpy(params)
  p = np.asarray(SIZES, np.float64) / sum(SIZES)
  for t in range(2):
    normalized, norms = [], []
    for i in range(3):
      y, trace, steps = dict(x), zeros(x), 0
      for xb, yb in batches(data, i)[0]:
        grad = linear_grad(y, xb, yb)
        trace = {k: grad[k] + rho * trace[k] for k in y}
        y = {k: y[k] - LR * trace[k] for k in y}
        steps += 1
      # ||a_i||_1: the step k gradient's total weight (1 - rho^(tau - k)) / (1 - rho).
      a = sum((1 - rho ** j) / (1 - rho) for j in range(1, steps + 1))
      norms.append(a)
      normalized.append({k: (y[k] - x[k]) / a for k in x})
    tau_eff = float(np.dot(p, norms))
    d = mean(normalized, p)
    x = {k: x[k] + tau_eff * d[k] for k in x}
    check(states[t + 1], x)
    if t == 0:   # different step counts matter: FedAvg's average is elsewhere
      plain = {k: sum(pi * nd[k] * a for pi, nd, a in zip(p, normalized, norms)) for k in x}
      assert abs(float(tau_eff * d["b"] - plain["b"])) > 1e-3


def test_feddyn_two_rounds_with_partial_participation():
  data, params = linear_problem(SIZES)
  alpha = 0.3
  states = run(feddyn(linear_example_loss, LR, alpha, schedule=NO_SHUFFLE), data, params,
               cohorts=COHORTS)
  x = to_numpy(params)
  h, gk = zeros(x), [zeros(x) for _ in SIZES]
  for t in range(2):
    thetas = []
    for i in COHORTS[t]:
      y = dict(x)
      for xb, yb in batches(data, i)[0]:
        grad = linear_grad(y, xb, yb)
        y = {k: y[k] - LR * (grad[k] - gk[i][k] + alpha * (y[k] - x[k])) for k in y}
      gk[i] = {k: gk[i][k] - alpha * (y[k] - x[k]) for k in x}
      thetas.append(y)
    h = {k: h[k] - alpha * sum(th[k] - x[k] for th in thetas) / len(SIZES) for k in x}
    x = {k: mean(thetas)[k] - h[k] / alpha for k in x}
    check(states[t + 1], x)
    np.testing.assert_allclose(states[t + 1].client_states["b"][2], gk[2]["b"], atol=1e-5)


# ---- the server steps, composed with FedHyper-G and a coordinate-wise median

def methods_and_rules():
  """(method, extra message keys, numpy server rule(median message, rule state, cf))."""
  def plain(med, s, cf):
    return {k: -v for k, v in med["delta"].items()}, s

  def momentum(med, s, cf):
    return dict(med["momentum"]), s

  def nova(med, s, cf):
    return {k: -v * med["tau"] for k, v in med["delta"].items()}, s

  def dyn(med, h, cf, alpha=0.3):
    g = {k: -v for k, v in med["delta"].items()}
    h = {k: (0.0 if h is None else h[k]) + alpha * cf * g[k] for k in g}
    return {k: g[k] + h[k] / alpha for k in g}, h

  return {
      "fedavg_cm": (fedavg_cm(linear_example_loss, LR, 0.7, 0.3), ("momentum",), momentum, 0.7),
      "scaffold_m": (scaffold_m(linear_example_loss, LR, 0.7, 0.3),
                     ("momentum", "control_delta"), momentum, 0.7),
      "mimelite": (mimelite(linear_example_loss, LR, 0.9), ("anchor_grad",), plain, 1.0),
      "fedsam": (fedsam(linear_example_loss, LR, 0.1), (), plain, 1.0),
      "fedspeed": (fedspeed(linear_example_loss, LR), (), plain, 1.0),
      "fednova": (fednova(linear_example_loss, LR), ("tau",), nova, 1.0),
      "feddyn": (feddyn(linear_example_loss, LR, 0.3), (), dyn, 1.0),
  }


@pytest.mark.parametrize("name", sorted(methods_and_rules()))
def test_server_step_composes_with_fedhyper_and_a_median(name):
  method, keys, rule, server_lr = methods_and_rules()[name]
  composed = fh.on_top(dataclasses.replace(method, aggregator=aggregate.coordinate_median()),
                       fh.fedhyper_global())
  data, params = linear_problem(SIZES)
  state = composed.init(params, jax.random.PRNGKey(0), 5)
  rng = np.random.default_rng(1)
  x = to_numpy(params)
  acc, prev, rule_state, cf = 0.0, None, None, 0.4
  for t in range(2):
    messages = {key: {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=5)}
                for key in ("delta",) + keys if key != "tau"}
    if "tau" in keys:
      messages["tau"] = rng.uniform(1, 5, size=5)
    state, _ = aggregate_and_step(composed, state, jax.tree.map(jnp.float32, messages),
                                  jnp.ones(5), cohort_fraction=cf)
    med = jax.tree.map(lambda v: np.median(v, axis=0), messages)
    g, rule_state = rule(med, rule_state, cf)
    if prev is not None:   # FedHyper-G: A = clip(A + <g_{t-1}, g_t>), step (1 + A) g_t
      acc = float(np.clip(acc + sum(np.sum(prev[k] * g[k]) for k in g), -0.8, 4.0))
    x = {k: x[k] - server_lr * (1 + acc) * g[k] for k in x}
    prev = g
    check(state, x, atol=1e-5)
  assert acc != 0.0


def test_feddyn_under_fedhyper_and_a_median_through_the_round():
  """End to end: the round's clients, the median, FedDyn's rule, FedHyper-G, in numpy."""
  data, params = linear_problem(SIZES)
  alpha = 0.3
  method = fh.on_top(dataclasses.replace(feddyn(linear_example_loss, LR, alpha,
                                                schedule=NO_SHUFFLE),
                                         aggregator=aggregate.coordinate_median()),
                     fh.fedhyper_global())
  states = run(method, data, params, rounds=3)
  x = to_numpy(params)
  h, gk, acc, prev = zeros(x), [zeros(x) for _ in SIZES], 0.0, None
  for t in range(3):
    deltas = []
    for i in range(3):
      y = dict(x)
      for xb, yb in batches(data, i)[0]:
        grad = linear_grad(y, xb, yb)
        y = {k: y[k] - LR * (grad[k] - gk[i][k] + alpha * (y[k] - x[k])) for k in y}
      gk[i] = {k: gk[i][k] - alpha * (y[k] - x[k]) for k in x}
      deltas.append({k: y[k] - x[k] for k in x})
    g = {k: -np.median([d[k] for d in deltas], axis=0) for k in x}
    h = {k: h[k] + alpha * g[k] for k in x}                     # |P| / m = 1
    g = {k: g[k] + h[k] / alpha for k in x}
    if prev is not None:
      acc = float(np.clip(acc + sum(np.sum(prev[k] * g[k]) for k in g), -0.8, 4.0))
    x = {k: x[k] - (1 + acc) * g[k] for k in x}
    prev = g
    check(states[t + 1], x)
  assert acc != 0.0
