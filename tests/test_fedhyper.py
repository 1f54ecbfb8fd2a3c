"""FedHyper (G, GM, SL, CL), FedExP and the rate baselines against numpy references."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from algorithms import fedexp as fedexp_lib
from algorithms import fedhyper as fh
from algorithms.fedavg import fedavg
from algorithms.fedavg_decay import fedavg_decay
from algorithms.fedavgm import fedavgm
from algorithms.fedopt import fedopt
from algorithms.fedprox import fedprox
from algorithms.scaffold import global_control, scaffold
from fedjax_lab.algorithm import make_round
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import FederatedData
from reference import (linear_example_loss, linear_grad, linear_problem, local_sgd, reddi_init,
                       reddi_step, run_rounds, to_numpy, tree_close)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (5, 3, 7)
NO_SHUFFLE = LocalSchedule(batch_size=2, epochs=2, shuffle=False)


# ------------------------------------------------------------------- numpy references

def dot(a, b):
  return float(sum(np.sum(np.asarray(a[k], np.float64) * np.asarray(b[k], np.float64)) for k in a))


def cosine(a, b):
  norms = np.sqrt(dot(a, a) * dot(b, b))
  return dot(a, b) / norms if norms > 0 else 0.0


def np_global(gs, lo, hi, hyper_lr=1.0, momentum=0.0, normalize=False):
  """Outputs and accumulators of G/GM for the pseudo-gradients ``gs`` (list of dicts)."""
  acc, trace, outs, accs = 0.0, None, [], []
  align = cosine if normalize else dot
  for t, g in enumerate(gs):
    if t > 0:
      acc = float(np.clip(acc + hyper_lr * align(trace, g), lo, hi))
    if trace is None:
      trace = {k: np.zeros_like(v) for k, v in g.items()}
    outs.append({k: (1 + acc) * g[k] + momentum * acc * trace[k] for k in g})
    trace = {k: g[k] + momentum * trace[k] for k in g}
    accs.append(acc)
  return outs, accs


def np_cl_steps(directions, lr, global_update, weight, max_growth=1.1, lo=0.1, hi=10.0,
                measure="step", hyper_lr=1.0):
  """CL on fixed directions: the emitted steps and beta after each step."""
  beta, prev, steps, betas = 1.0, global_update, [], []
  align = cosine if measure == "cosine" else dot
  for k, d in enumerate(directions):
    step = {n: -lr * beta * d[n] for n in d}
    v = step if measure == "step" else {n: -d[n] for n in d}
    if k > 0:
      gamma = min(max_growth, 1 + hyper_lr * (align(v, prev) + weight * align(v, global_update)))
      beta = float(np.clip(gamma * beta, lo, hi))
      prev = v
    steps.append(step)
    betas.append(beta)
  return steps, betas


def np_local_cl(start, x, y, lr, batch_size, epochs, global_update, weight, beta=1.0):
  """Unshuffled local SGD with the CL rate on the linear problem; (params, betas)."""
  w, prev, k, betas = dict(start), global_update, 0, []
  for _ in range(epochs):
    for lo in range(0, len(y), batch_size):
      g = linear_grad(w, x[lo:lo + batch_size], y[lo:lo + batch_size])
      step = {n: -lr * beta * g[n] for n in w}
      w = {n: w[n] + step[n] for n in w}
      if k > 0:
        gamma = min(1.1, 1 + dot(step, prev) + weight * dot(step, global_update))
        beta = float(np.clip(gamma * beta, 0.1, 10.0))
        prev = step
      betas.append(beta)
      k += 1
  return w, betas


def np_mean_delta(data, x, local, weights):
  """Weighted mean of ``local(i, x) - x`` over all clients (``local`` returns params)."""
  weights = np.asarray(weights, np.float64) / np.sum(weights)
  deltas = [{k: v - x[k] for k, v in local(i, x).items()} for i in range(data.num_clients)]
  return {k: sum(w * d[k] for w, d in zip(weights, deltas)) for k in x}, deltas




def random_trees(n, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return [{"a": scale * rng.normal(size=(3, 2)).astype(np.float32),
           "b": scale * rng.normal(size=(4,)).astype(np.float32)} for _ in range(n)]


def apply_tx(tx, gs, jit=False, **extra):
  state = tx.init(jax.tree.map(jnp.zeros_like, gs[0]))
  update = jax.jit(tx.update) if jit else tx.update
  outs, states = [], []
  for g in gs:
    out, state = update(g, state, None, **extra)
    outs.append(out)
    states.append(state)
  return outs, states


# ----------------------------------------------------------------------- G and GM

@pytest.mark.parametrize("momentum,lo,hi", [(0.0, -0.8, 4.0), (0.9, -0.2, 4.0), (0.5, -0.3, 0.7)])
def test_global_rule_matches_numpy_over_rounds(momentum, lo, hi):
  gs = random_trees(6, seed=1, scale=0.6)
  tx = fh.fedhyper_global(lo, hi, hyper_lr=0.7, momentum=momentum)
  outs, states = apply_tx(tx, gs)
  ref_outs, ref_accs = np_global(gs, lo, hi, hyper_lr=0.7, momentum=momentum)
  for out, ref, state, acc in zip(outs, ref_outs, states, ref_accs):
    tree_close(out, ref, atol=1e-5)
    assert abs(float(state.accumulator) - acc) < 1e-5
  assert len({round(a, 4) for a in ref_accs}) > 2      # the rate really moved
  assert any(a in (lo, hi) for a in ref_accs)           # and met a clip bound


def test_aligned_updates_raise_rate_to_clip_and_opposed_shrink_it():
  g = {"w": np.full((2,), 0.5, np.float32)}            # ||g||^2 = 0.5
  _, states = apply_tx(fh.fedhyper_global(), [g] * 12)
  accs = [float(s.accumulator) for s in states]
  np.testing.assert_allclose(accs[:4], [0.0, 0.5, 1.0, 1.5], atol=1e-6)
  assert all(b >= a for a, b in zip(accs, accs[1:]))
  assert fh.global_rate(states[-1]) == pytest.approx(5.0)   # clip: 1 + 4
  flip = [g if t % 2 == 0 else {"w": -g["w"]} for t in range(6)]
  _, states = apply_tx(fh.fedhyper_global(), flip)
  assert float(fh.global_rate(states[-1])) == pytest.approx(0.2)   # 1 - 0.8
  huge = {"w": np.full((2,), 1e3, np.float32)}
  _, states = apply_tx(fh.fedhyper_global(), [huge, huge])
  assert float(fh.global_rate(states[-1])) == 5.0


def same(a, b):
  # XLA may fuse a multiply-add under jit: equal up to one float32 rounding.
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=3e-7, atol=1e-7)


def test_rules_identical_under_jit():
  gs = random_trees(5, seed=2, scale=0.5)
  for tx in (fh.fedhyper_global_momentum(), fh.fedhyper_server_local(0.05)):
    plain, _ = apply_tx(tx, gs)
    jitted, _ = apply_tx(tx, gs, jit=True)
    for a, b in zip(plain, jitted):
      same(a, b)
  cl = fh.fedhyper_client(0.3, global_weight=0.05)
  plain, s1 = apply_tx(cl, gs, global_update=gs[0])
  jitted, s2 = apply_tx(cl, gs, jit=True, global_update=gs[0])
  for a, b in zip(plain, jitted):
    same(a, b)
  assert float(s1[-1].scale) == pytest.approx(float(s2[-1].scale), abs=1e-7)


def test_first_round_equals_fedavg_exactly():
  data, params = linear_problem(SIZES)
  base = fedavg(linear_example_loss, client_lr=0.1, schedule=NO_SHUFFLE)
  arrays, offsets = data.device_arrays()

  def first_round(method):
    # The loop backend compiles the client step alone (the same program for both
    # methods) and runs the server step op by op; one jitted round per method could
    # fuse the local steps differently and differ in the last bit.
    round_fn = make_round(method, data, data.num_clients, "loop")
    return round_fn(method.init(params, jax.random.PRNGKey(0), 3), arrays, offsets)[0]

  plain = first_round(base)
  for rule in (fh.fedhyper_global(), fh.fedhyper_global_momentum()):
    hyper = first_round(fh.on_top(base, rule))
    for k in params:
      np.testing.assert_array_equal(np.asarray(hyper.params[k]), np.asarray(plain.params[k]))
    assert float(fh.global_rate(hyper)) == 1.0


# ------------------------------------------------ composability: G on other methods

def np_g_run(data, params, rounds, local, weights, server_lr, lo=-0.8, hi=4.0):
  x, acc, prev = to_numpy(params), 0.0, None
  for t in range(rounds):
    delta, _ = np_mean_delta(data, x, local, weights)
    if t > 0:
      acc = float(np.clip(acc + dot(prev, delta), lo, hi))
    x = {k: x[k] + server_lr * (1 + acc) * delta[k] for k in x}
    prev = delta
  return x, acc


def np_paper_g_run(data, params, rounds, local, weights, alpha0, lo=0.2, hi=5.0):
  """The paper's eq.: alpha_t = clip(alpha_{t-1} + <Delta_t, Delta_{t-1}>), x += alpha_t Delta_t."""
  x, alpha, prev = to_numpy(params), alpha0, None
  for t in range(rounds):
    delta, _ = np_mean_delta(data, x, local, weights)
    if t > 0:
      alpha = float(np.clip(alpha + dot(prev, delta), lo, hi))
    x = {k: x[k] + alpha * delta[k] for k in x}
    prev = delta
  return x, alpha


@pytest.mark.parametrize("server_lr", [0.5, 0.1])
def test_paper_global_rate_from_config_matches_numpy(server_lr):
  """Default fedhyper_global_rate='paper': alpha_0 = server_lr, unscaled hypergradient
  steps, absolute bounds [0.2, 5]; 'scaled' is server_lr (1 + A) (np_g_run)."""
  import algorithms
  import ml_collections
  data, params = linear_problem(SIZES)
  config = ml_collections.ConfigDict(dict(
      client_lr=0.4, server_lr=server_lr, batch_size=2, local_epochs=2, local_steps=0,
      shuffle=False, weighting="num_examples", fedhyper_hyper_lr=1.0))
  def local(i, x):
    c = data.client(i)
    return local_sgd(x, c["x"], c["y"], 0.4, 2, 2)[0]
  paper = run_rounds(algorithms.build("fedhyper_g", config, linear_example_loss),
                     data, params, 3)[-1]
  x, alpha = np_paper_g_run(data, params, 3, local, SIZES, server_lr)
  tree_close(paper.params, x, atol=1e-5)
  assert float(fh.global_rate(paper)) == pytest.approx(alpha, abs=1e-5)
  config.fedhyper_global_rate = "scaled"
  scaled = run_rounds(algorithms.build("fedhyper_g", config, linear_example_loss),
                      data, params, 3)[-1]
  x_scaled, acc = np_g_run(data, params, 3, local, SIZES, server_lr)
  tree_close(scaled.params, x_scaled, atol=1e-5)
  gap = max(float(np.max(np.abs(x[k] - x_scaled[k]))) for k in x)
  assert gap > 1e-3 and alpha - server_lr > 1e-2   # the two forms differ; the rate moved
  config.fedhyper_global_rate = "other"
  with pytest.raises(ValueError, match="Unknown fedhyper_global_rate 'other'"):
    algorithms.build("fedhyper_g", config, linear_example_loss)


@pytest.mark.parametrize("clip_hi", [4.0, 0.05])
def test_g_on_fedprox_matches_numpy(clip_hi):
  data, params = linear_problem(SIZES)
  method = fh.on_top(fedprox(linear_example_loss, client_lr=0.1, mu=0.5, server_lr=0.8,
                             schedule=NO_SHUFFLE), fh.fedhyper_global(clip_hi=clip_hi))
  state = run_rounds(method, data, params, 3)[-1]
  def local(i, x):
    c = data.client(i)
    return local_sgd(x, c["x"], c["y"], 0.1, 2, 2, mu=0.5)[0]
  x, acc = np_g_run(data, params, 3, local, SIZES, 0.8, hi=clip_hi)
  tree_close(state.params, x, atol=1e-5)
  assert float(fh.global_rate(state)) == pytest.approx(1 + acc, abs=1e-5)
  assert abs(acc) > 1e-2


def test_g_on_scaffold_matches_numpy():
  sizes = (4, 6, 5)
  data, params = linear_problem(sizes, seed=1)
  lr, server_lr, epochs = 0.1, 0.8, 3
  schedule = LocalSchedule(batch_size=None, epochs=epochs, shuffle=False)
  method = fh.on_top(scaffold(linear_example_loss, client_lr=lr, server_lr=server_lr,
                              schedule=schedule), fh.fedhyper_global())
  states = run_rounds(method, data, params, 3)
  x = to_numpy(params)
  c = {k: np.zeros_like(v) for k, v in x.items()}
  ci = [{k: np.zeros_like(v) for k, v in x.items()} for _ in sizes]
  acc, prev = 0.0, None
  for t in range(3):
    dys, dcs = [], []
    for i in range(len(sizes)):
      client = data.client(i)
      y, steps = local_sgd(x, client["x"], client["y"], lr, len(client["y"]), epochs,
                           correction={k: c[k] - ci[i][k] for k in x})
      new_ci = {k: ci[i][k] - c[k] + (x[k] - y[k]) / (steps * lr) for k in x}
      dys.append({k: y[k] - x[k] for k in x})
      dcs.append({k: new_ci[k] - ci[i][k] for k in x})
      ci[i] = new_ci
    delta = {k: np.mean([d[k] for d in dys], axis=0) for k in x}
    if t > 0:
      acc = float(np.clip(acc + dot(prev, delta), -0.8, 4.0))
    x = {k: x[k] + server_lr * (1 + acc) * delta[k] for k in x}
    c = {k: c[k] + np.mean([d[k] for d in dcs], axis=0) for k in x}   # |S| = N
    prev = delta
    tree_close(states[t + 1].params, x, atol=1e-5)
    tree_close(global_control(states[t + 1]), c, atol=1e-5)
  assert abs(acc) > 1e-3


def local_sgd_clients(data):
  def local(i, xx):
    c = data.client(i)
    return local_sgd(xx, c["x"], c["y"], 0.1, 2, 2)[0]
  return local


def test_g_on_fedadam_is_algorithm_2_on_scaled_update():
  data, params = linear_problem(SIZES)
  method = fh.on_top(fedopt(linear_example_loss, "adam", client_lr=0.1, server_lr=0.05,
                            schedule=NO_SHUFFLE), fh.fedhyper_global())
  states = run_rounds(method, data, params, 3)
  x, (m, v), acc, prev = to_numpy(params), reddi_init(params, 1e-3), 0.0, None
  for t in range(3):
    delta, _ = np_mean_delta(data, x, local_sgd_clients(data), SIZES)
    if t > 0:
      acc = float(np.clip(acc + dot(prev, delta), -0.8, 4.0))
    scaled = {k: (1 + acc) * delta[k] for k in x}
    x, m, v = reddi_step("adam", x, m, v, scaled, 0.05, 0.9, 0.99, 1e-3)
    prev = delta
    tree_close(states[t + 1].params, x, atol=1e-5)


def test_g_on_fedadam_optax_convention_is_optax_adam_on_scaled_pseudo_gradient():
  data, params = linear_problem(SIZES)
  method = fh.on_top(fedopt(linear_example_loss, "adam", client_lr=0.1, server_lr=0.05,
                            schedule=NO_SHUFFLE, convention="optax"), fh.fedhyper_global())
  states = run_rounds(method, data, params, 3)
  adam = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3)
  x = jax.tree.map(jnp.asarray, params)
  opt_state, acc, prev = adam.init(x), 0.0, None
  for t in range(3):
    delta, _ = np_mean_delta(data, to_numpy(x), local_sgd_clients(data), SIZES)
    if t > 0:
      acc = float(np.clip(acc + dot(prev, delta), -0.8, 4.0))
    scaled = {k: jnp.asarray(-(1 + acc) * delta[k], jnp.float32) for k in x}
    updates, opt_state = adam.update(scaled, opt_state, x)
    x = optax.apply_updates(x, updates)
    prev = delta
    tree_close(states[t + 1].params, x, atol=1e-5)


# ------------------------------------------------------------------------------ SL

def test_sl_emits_clipped_local_rate_and_clients_use_it():
  data, params = linear_problem(SIZES)
  eta0 = 0.1
  method = fh.fedhyper(linear_example_loss, eta0, schedule=NO_SHUFFLE,
                       server_rule=fh.fedhyper_server_local(eta0, min_lr=0.02, max_lr=0.12))
  states = run_rounds(method, data, params, 4)
  x, acc, prev, lr = to_numpy(params), 0.0, None, eta0
  emitted = []
  for t in range(4):
    assert float(fh.local_rate(states[t])) == pytest.approx(lr, abs=1e-6)
    def local(i, xx, lr=lr):
      c = data.client(i)
      return local_sgd(xx, c["x"], c["y"], lr, 2, 2)[0]
    delta, _ = np_mean_delta(data, x, local, SIZES)
    if t > 0:
      acc += dot(prev, delta)
      lr = float(np.clip(eta0 * (1 + acc), 0.02, 0.12))
    x = {k: x[k] + delta[k] for k in x}
    prev = delta
    emitted.append(lr)
    tree_close(states[t + 1].params, x, atol=1e-5)
  assert len({round(v, 5) for v in emitted}) > 1


# ------------------------------------------------------------------------------ CL

def test_cl_transform_matches_numpy_growth_cap_and_bounds():
  # Small aligned directions: gamma below the cap, beta tracks the reference.
  ds = random_trees(8, seed=3, scale=0.5)
  ds = [{k: v + 0.8 for k, v in d.items()} for d in ds]   # mostly aligned
  gu = random_trees(1, seed=4, scale=0.3)[0]
  outs, states = apply_tx(fh.fedhyper_client(0.2, global_weight=0.05), ds, global_update=gu)
  ref_steps, ref_betas = np_cl_steps(ds, 0.2, gu, 0.05)
  for out, ref, s, b in zip(outs, ref_steps, states, ref_betas):
    tree_close(out, ref, atol=1e-5)
    assert float(s.scale) == pytest.approx(b, abs=1e-5)
  assert ref_betas[-1] > 1.05
  # The paper's form measures directions: the same inputs at a 100x smaller rate still
  # move beta, where the realised steps would not.
  outs, states = apply_tx(fh.fedhyper_client(0.002, global_weight=0.05, hypergradient="direction"),
                          ds, global_update=gu)
  ref_steps, ref_betas = np_cl_steps(ds, 0.002, gu, 0.05, measure="direction")
  for out, ref, s, b in zip(outs, ref_steps, states, ref_betas):
    tree_close(out, ref, atol=1e-6)
    assert float(s.scale) == pytest.approx(b, rel=1e-5)
  assert ref_betas[-1] > 1.3
  assert np_cl_steps(ds, 0.002, gu, 0.05)[1][-1] < 1.01
  # Huge aligned directions: growth capped at exactly 1.1x per step, up to 10.
  big = [{"w": np.full((3,), 100.0, np.float32)}] * 30
  _, states = apply_tx(fh.fedhyper_client(1.0, global_weight=0.0), big,
                       global_update={"w": np.zeros(3, np.float32)})
  betas = np.array([float(s.scale) for s in states])
  # Step 0 initialises, step 1 compares with Delta_{t-1} = 0: growth starts at step 2.
  np.testing.assert_allclose(betas[:6], [1.0, 1.0, 1.1, 1.21, 1.331, 1.4641], rtol=1e-5)
  assert betas.max() == pytest.approx(10.0) and np.all(betas <= 10.0)
  # Opposing directions: gamma < 0, beta clipped at 0.1.
  flip = [{"w": np.full((3,), 100.0 * (-1) ** k, np.float32)} for k in range(6)]
  _, states = apply_tx(fh.fedhyper_client(1.0, global_weight=0.0), flip,
                       global_update={"w": np.zeros(3, np.float32)})
  betas = np.array([float(s.scale) for s in states])
  assert betas.min() == pytest.approx(0.1) and np.all(betas >= 0.1 - 1e-7)


def test_cosine_rules_match_numpy_and_do_not_depend_on_scale():
  # G with normalize=True accumulates cosines: the same for g and 1e-3 g.
  gs = random_trees(5, seed=11)
  gs = [{k: v + 2.0 for k, v in g.items()} for g in gs]   # mostly aligned
  for scale in (1.0, 1e-3):
    scaled = [{k: scale * v for k, v in g.items()} for g in gs]
    outs, states = apply_tx(fh.fedhyper_global(hyper_lr=0.3, normalize=True), scaled)
    ref_outs, ref_accs = np_global(scaled, -0.8, 4.0, hyper_lr=0.3, normalize=True)
    for out, ref, s, acc in zip(outs, ref_outs, states, ref_accs):
      tree_close(out, ref, atol=1e-6 * scale)
      assert float(s.accumulator) == pytest.approx(acc, abs=1e-5)
    assert 0.3 < ref_accs[-1] < 4.0   # moved, and not by the update's size
  # CL with cosines: beta follows numpy, and gamma stays within 1 +- h (1 + w).
  ds = random_trees(10, seed=12)
  ds = [{k: v + 0.3 for k, v in d.items()} for d in ds]
  gu = random_trees(1, seed=13)[0]
  for lr in (0.5, 5e-4):
    outs, states = apply_tx(fh.fedhyper_client(lr, global_weight=0.5, hypergradient="cosine",
                                               hyper_lr=0.1), ds, global_update=gu)
    ref_steps, ref_betas = np_cl_steps(ds, lr, gu, 0.5, measure="cosine", hyper_lr=0.1)
    for out, ref, s, b in zip(outs, ref_steps, states, ref_betas):
      tree_close(out, ref, atol=1e-6)
      assert float(s.scale) == pytest.approx(b, rel=1e-5)
    ratios = np.array(ref_betas[1:]) / np.array(ref_betas[:-1])
    assert np.all(ratios >= 1 - 0.1 * 1.5 - 1e-6) and np.all(ratios <= 1.1 + 1e-6)
    assert len(set(np.round(ratios, 4))) > 2   # beta really moves at either rate
  # The SL accumulator with normalize=True adds cosines of consecutive pseudo-gradients.
  tx = fh.fedhyper_server_local(0.01, 1e-4, 1.0, hyper_lr=0.5, normalize=True)
  outs, states = apply_tx(tx, gs[:3])
  expected = 0.5 * (cosine(gs[0], gs[1]) + cosine(gs[1], gs[2]))
  assert float(states[-1].accumulator) == pytest.approx(expected, abs=1e-5)
  assert float(states[-1].local_lr) == pytest.approx(0.01 * (1 + expected), rel=1e-5)


@pytest.mark.parametrize("eta_h,x0,decreases", [(0.3, 1e4, False), (0.95, 1e4, True)])
def test_cl_on_quadratic_grows_while_aligned_and_stops_after_overshoot(eta_h, x0, decreases):
  # f = 0.5 h x^2; eta_0 h < 1 is stable, beta grows until eta_0 beta h > 1 overshoots.
  h = 2.0
  tx = fh.fedhyper_client(eta_h / h, global_weight=0.0)
  x = jnp.float32(x0)
  state = tx.init(x)
  steps, betas = [], [1.0]                  # betas[k]: the scale step k used
  for _ in range(30):
    step, state = tx.update(h * x, state, x, global_update=jnp.float32(0.0))
    x = x + step
    steps.append(float(step))
    betas.append(float(state.scale))
  flip = next(k for k in range(1, 30) if steps[k] * steps[k - 1] < 0)
  growing = betas[:flip + 1]
  assert all(b >= a for a, b in zip(growing, growing[1:])) and growing[-1] > 1.2
  assert eta_h * growing[-1] > 1.0          # the overshoot came from the grown rate
  assert max(betas[flip + 1:]) <= betas[flip + 1] <= betas[flip] + 1e-7
  if decreases:
    assert betas[flip + 1] < betas[flip] - 0.05


@pytest.mark.parametrize("with_g,keep", [(False, False), (True, False), (False, True)])
def test_cl_algorithm_matches_numpy_and_resets_each_round(with_g, keep):
  data, params = linear_problem(SIZES, seed=2)
  lr, weight, m = 0.3, 0.1 / 3, 3
  method = fh.fedhyper(linear_example_loss, lr, schedule=NO_SHUFFLE,
                       server_rule=fh.fedhyper_global() if with_g else None,
                       client_rule=fh.fedhyper_client(lr, clients_per_round=m),
                       keep_client_rate=keep)
  states = run_rounds(method, data, params, 3)
  x, acc, prev = to_numpy(params), 0.0, {k: np.zeros_like(v) for k, v in to_numpy(params).items()}
  all_betas, kept = [], [1.0] * len(SIZES)
  for t in range(3):
    def local(i, xx, prev=prev):
      c = data.client(i)
      w, betas = np_local_cl(xx, c["x"], c["y"], lr, 2, 2, prev, weight, kept[i] if keep else 1.0)
      all_betas.append(betas)
      kept[i] = betas[-1]
      return w
    delta, _ = np_mean_delta(data, x, local, SIZES)
    if with_g and t > 0:
      acc = float(np.clip(acc + dot(prev, delta), -0.8, 4.0))
    x = {k: x[k] + (1 + acc) * delta[k] for k in x}
    prev = delta
    tree_close(states[t + 1].params, x, atol=1e-5)
    tree_close(fh.find_state(states[t + 1].rule_state, fh.PreviousUpdateState).delta, delta,
               atol=1e-5)
  # The rate moved within a round; every round restarted from beta = 1 unless kept.
  assert max(abs(b - 1.0) for betas in all_betas for b in betas) > 0.02
  if keep:
    np.testing.assert_allclose(np.asarray(states[-1].client_states), kept, rtol=1e-5)
    assert any(abs(b[0] - 1.0) > 0.02 for b in all_betas[len(SIZES):])
  else:
    assert all(betas[0] == 1.0 for betas in all_betas)


# ------------------------------------------------------------------ FedExP, baselines

def opposing_clients():
  rng = np.random.default_rng(5)
  sizes, xs, ys = (6, 4, 5), [], []
  for i, n in enumerate(sizes):
    xs.append(rng.normal(size=(n, 3)).astype(np.float32))
    ys.append(np.full(n, (-3.0, 4.0, 0.5)[i], np.float32))
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  data = FederatedData({"x": np.concatenate(xs), "y": np.concatenate(ys)}, offsets)
  return data, {"w": np.zeros(3, np.float32), "b": np.float32(0.0)}, sizes


def test_fedexp_matches_numpy():
  data, params, sizes = opposing_clients()
  method = fedexp_lib.fedexp(linear_example_loss, client_lr=0.1, server_lr=0.9,
                             schedule=NO_SHUFFLE, eps=1e-3)
  states = run_rounds(method, data, params, 3)
  x, steps = to_numpy(params), []
  for t in range(3):
    def local(i, xx):
      c = data.client(i)
      return local_sgd(xx, c["x"], c["y"], 0.1, 2, 2)[0]
    delta, deltas = np_mean_delta(data, x, local, sizes)
    w = np.asarray(sizes, np.float64) / sum(sizes)
    mean_sq = sum(wi * dot(d, d) for wi, d in zip(w, deltas))
    eta = max(1.0, mean_sq / (2 * (dot(delta, delta) + 1e-3)))
    x = {k: x[k] + 0.9 * eta * delta[k] for k in x}
    steps.append(eta)
    tree_close(states[t + 1].params, x, atol=1e-5)
    assert float(fedexp_lib.server_step_size(states[t + 1])) == pytest.approx(eta, rel=1e-5)
  assert max(steps) > 1.2                    # extrapolation really happened


def test_decay_and_server_momentum_match_numpy():
  data, params = linear_problem(SIZES)
  states = run_rounds(fedavg_decay(linear_example_loss, 0.1, 0.9, rate=0.8,
                                      schedule=NO_SHUFFLE), data, params, 3)
  x = to_numpy(params)
  for t in range(3):
    lr = 0.1 * 0.8 ** t
    def local(i, xx, lr=lr):
      c = data.client(i)
      return local_sgd(xx, c["x"], c["y"], lr, 2, 2)[0]
    delta, _ = np_mean_delta(data, x, local, SIZES)
    x = {k: x[k] + 0.9 * 0.8 ** t * delta[k] for k in x}
    tree_close(states[t + 1].params, x, atol=1e-5)
  states = run_rounds(fedavgm(linear_example_loss, 0.1, 0.7, momentum=0.9,
                                 schedule=NO_SHUFFLE), data, params, 3)
  x = to_numpy(params)
  buf = {k: np.zeros_like(v) for k, v in x.items()}
  for t in range(3):
    def local(i, xx):
      c = data.client(i)
      return local_sgd(xx, c["x"], c["y"], 0.1, 2, 2)[0]
    delta, _ = np_mean_delta(data, x, local, SIZES)
    buf = {k: -delta[k] + 0.9 * buf[k] for k in x}
    x = {k: x[k] - 0.7 * buf[k] for k in x}
    tree_close(states[t + 1].params, x, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="clip_lo"):
    fh.fedhyper_global(clip_lo=-1.5)
  with pytest.raises(ValueError, match="clients_per_round"):
    fh.fedhyper_client(0.1)
  with pytest.raises(ValueError, match="global_update"):
    tx = fh.fedhyper_client(0.1, 10)
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
  with pytest.raises(ValueError, match="min_lr"):
    fh.fedhyper_server_local(0.1, min_lr=0.5, max_lr=0.1)
  from launch.configs import fedhyper_digits
  config = fedhyper_digits.get_config()
  config.server_optimizer = "lbfgs"
  with pytest.raises(ValueError, match="server_optimizer"):
    fh.server_optimizer_from_config(config)
  config = fedhyper_digits.get_config()
  config.fedhyper_base = "fedhyper_gm"
  with pytest.raises(ValueError, match="fedhyper_base"):
    fh.from_config_for("g")(config, linear_example_loss)


@pytest.mark.slow
def test_broadcast_extras_agree_across_backends():
  data, params = linear_problem((5, 3, 7, 4, 6, 2), seed=3)
  methods = [
      fh.fedhyper(linear_example_loss, 0.2, schedule=NO_SHUFFLE, server_rule=fh.fedhyper_global(),
                  client_rule=fh.fedhyper_client(0.2, 4)),
      fh.fedhyper(linear_example_loss, 0.1, schedule=NO_SHUFFLE,
                  server_rule=fh.fedhyper_server_local(0.1)),
      fedexp_lib.fedexp(linear_example_loss, 0.1, schedule=NO_SHUFFLE)]
  arrays, offsets = data.device_arrays()
  for method in methods:
    finals = []
    for backend in ("vmap", "sharded"):
      round_fn = jax.jit(make_round(method, data, 4, backend))
      state = method.init(params, jax.random.PRNGKey(1), data.num_clients)
      for _ in range(3):
        state, _ = round_fn(state, arrays, offsets)
      finals.append(state.params)
    tree_close(finals[0], finals[1], atol=1e-6)


# ------------------------------------------------------------- launch and sweep

def test_config_shares_data_and_model_with_fedavg_digits():
  from launch.configs import fedavg_digits, fedhyper_digits
  a, b = fedavg_digits.get_config(), fedhyper_digits.get_config()
  for key in ("data", "partition", "alpha", "num_clients", "test_fraction", "model", "hidden",
              "clients_per_round", "local_epochs", "batch_size", "seed"):
    assert a[key] == b[key], key


def test_launch_fedhyper_digits_end_to_end(tmp_path):
  cmd = [sys.executable, "-m", "launch.train", "--config=launch/configs/fedhyper_digits.py",
         "--config.algorithm=fedhyper_g_cl", "--config.rounds=2", "--config.num_clients=20",
         "--config.clients_per_round=4", "--config.local_epochs=1", "--config.hidden=16",
         "--config.rounds_per_call=2", "--config.eval_every=2", "--config.server_lr=0.5",
         "--config.backend=loop",
         f"--workdir={tmp_path}", "--noprogress"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["algorithm"] == "fedhyper_g_cl" and summary["rounds"] == 2
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert os.path.exists(tmp_path / "metrics.jsonl")


def test_sweep_writes_table_and_plot(tmp_path):
  cmd = [sys.executable, "-m", "launch.sweep_lr", f"--workdir={tmp_path}", "--lrs=0.1,1.0",
         "--which=server", "--methods=fedavg,fedhyper_g_cl", "--config.rounds=2", "--config.num_clients=20",
         "--config.clients_per_round=4", "--config.local_epochs=1", "--config.hidden=16",
         "--config.eval_every=2", "--config.rounds_per_call=2", "--config.checkpoint_every=0",
         "--config.backend=loop"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["runs"] == 4
  rows = json.load(open(tmp_path / "sweep.json"))
  assert [(r["method"], r["initial_lr"]) for r in rows] == [
      (m, lr) for m in ("fedavg", "fedhyper_g_cl") for lr in (0.1, 1.0)]
  assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["rounds"] == 2 for r in rows)
  assert open(tmp_path / "sweep.csv").read().count("\n") == 5
  table = open(tmp_path / "sweep.md").read()
  assert "fedhyper_g_cl" in table and "server_lr=0.1" in table
  png = tmp_path / "sweep.png"
  assert os.path.getsize(png) > 1000
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_helpers():
  from launch import sweep_lr
  history = [{"round": 5, "test_accuracy": 0.5}, {"round": 10, "test_accuracy": 0.91}]
  assert sweep_lr.rounds_to_target(history, 0.9) == 10
  assert sweep_lr.rounds_to_target(history, 0.95) is None
  from launch.configs import fedhyper_digits
  with pytest.raises(ValueError, match="Unknown methods"):
    sweep_lr.sweep(fedhyper_digits.get_config(), [0.1], methods=["nope"])
  with pytest.raises(ValueError, match="positive"):
    sweep_lr.sweep(fedhyper_digits.get_config(), [0.0])


def test_adapted_rates_are_logged_with_each_round():
  from fedjax_lab import training
  data, params = linear_problem(SIZES)
  method = fh.on_top(fedprox(linear_example_loss, client_lr=0.1, mu=0.5, server_lr=0.8,
                             schedule=NO_SHUFFLE), fh.fedhyper_global())
  state, history = training.train(method, jax.tree.map(jnp.asarray, params), data,
                                  opts=training.TrainOptions(rounds=3, clients_per_round=3,
                                                             rounds_per_call=3, progress=False))
  def local(i, x):
    c = data.client(i)
    return local_sgd(x, c["x"], c["y"], 0.1, 2, 2, mu=0.5)[0]
  rates = [1 + np_g_run(data, params, r, local, SIZES, 0.8)[1] for r in (1, 2, 3)]
  np.testing.assert_allclose([h["global_rate"] for h in history], rates, atol=1e-5)
  assert history[-1]["global_rate"] == pytest.approx(float(fh.global_rate(state)))
  sl = fh.fedhyper(linear_example_loss, 0.1, schedule=NO_SHUFFLE,
                   server_rule=fh.fedhyper_server_local(0.1, min_lr=0.02, max_lr=0.12))
  state, history = training.train(sl, jax.tree.map(jnp.asarray, params), data,
                                  opts=training.TrainOptions(rounds=2, clients_per_round=3,
                                                             progress=False))
  assert history[-1]["local_lr"] == pytest.approx(float(fh.local_rate(state)))
  assert "global_rate" not in history[-1]


@pytest.mark.slow
def test_scale_free_rules_rescue_a_bad_local_rate_on_digits():
  # fedhyper_digits.py, local rate 0.1x the tuned 0.05, 100 rounds, seed 0.
  from launch import common
  from launch.configs import fedhyper_digits

  def final_accuracy(**overrides):
    config = fedhyper_digits.get_config()
    config.client_lr = 0.005
    config.update(overrides)
    return common.run(config, None, False)[2]["test_accuracy"]

  fedavg_acc = final_accuracy(algorithm="fedavg")
  code_acc = final_accuracy(algorithm="fedhyper_g_cl")
  scale_free_acc = final_accuracy(
      algorithm="fedhyper_g_cl", cl_hypergradient="cosine", cl_hyper_lr=0.1, cl_reset=False,
      fedhyper_normalize=True, fedhyper_hyper_lr=0.1)
  assert fedavg_acc < 0.9 and code_acc < fedavg_acc + 0.03
  assert scale_free_acc >= fedavg_acc + 0.05, (fedavg_acc, code_acc, scale_free_acc)
