"""Personalized methods against numpy references (two rounds), the splits, the metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from algorithms.apfl import apfl
from algorithms.ditto import ditto
from algorithms.fedbn import fedbn
from algorithms.fedrep import fedper, fedrep
from algorithms.local_finetune import local_finetune
from fedjax_lab import personalization as pers
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data import held_out_clients, load_federated_with_info, within_client_split
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.models import batchnorm
from reference import linear_example_loss, linear_grad, linear_problem, run_rounds, to_numpy

SIZES = (5, 3, 7)
STEPS = 3
FULL_BATCH = LocalSchedule(batch_size=None, epochs=STEPS, shuffle=False)   # 3 full-batch steps
LR = 0.1


def client_xy(data, i):
  c = data.client(i)
  return np.asarray(c["x"], np.float64), np.asarray(c["y"], np.float64)


def average(data, starts, finals, global_params):
  weights = np.asarray(SIZES, np.float64) / sum(SIZES)
  return {k: global_params[k] + sum(w * (f[k] - s[k]) for w, f, s in zip(weights, finals, starts))
          for k in global_params}


def close(actual, expected, atol=1e-5):
  for k in expected:
    np.testing.assert_allclose(np.asarray(actual[k], np.float64), expected[k], atol=atol, rtol=0,
                               err_msg=f"leaf {k}")


def gd(p, x, y, steps, lr, extra=None):
  p = dict(p)
  for _ in range(steps):
    g = linear_grad(p, x, y)
    p = {k: p[k] - lr * (g[k] + (extra(k, p) if extra else 0.0)) for k in p}
  return p


@pytest.mark.slow   # compile-bound on 2 cores
def test_ditto_two_rounds_match_numpy():
  data, params = linear_problem(SIZES)
  lam = 0.5
  states = run_rounds(ditto(linear_example_loss, LR, lam, schedule=FULL_BATCH), data, params, 2)
  w = to_numpy(params)
  v = [dict(w) for _ in SIZES]
  for state in states[1:]:
    finals = []
    for i in range(len(SIZES)):
      x, y = client_xy(data, i)
      finals.append(gd(w, x, y, STEPS, LR))
      v[i] = gd(v[i], x, y, STEPS, LR, extra=lambda k, p, w=w: lam * (p[k] - w[k]))
    w = average(data, [w] * 3, finals, w)
    close(state.params, w)
    for i in range(len(SIZES)):
      close(jax.tree.map(lambda t: t[i], state.client_states), v[i])
  personal = jax.tree.map(lambda t: t[1], states[-1].client_states)
  method = ditto(linear_example_loss, LR, lam, schedule=FULL_BATCH)
  close(method.personalize(states[-1].params, personal, None, None, None), v[1])


def test_apfl_two_rounds_match_numpy():
  data, params = linear_problem(SIZES)
  alpha_lr, alpha0 = 0.3, 0.5
  method = apfl(linear_example_loss, LR, alpha_lr, alpha0, schedule=FULL_BATCH)
  states = run_rounds(method, data, params, 2)
  w = to_numpy(params)
  rows = [(dict(w), alpha0) for _ in SIZES]
  for state in states[1:]:
    finals = []
    for i in range(len(SIZES)):
      x, y = client_xy(data, i)
      wl, (v, a) = dict(w), rows[i]
      for _ in range(STEPS):
        vbar = {k: a * v[k] + (1 - a) * wl[k] for k in v}
        g_mix = linear_grad(vbar, x, y)
        g_w = linear_grad(wl, x, y)
        g_alpha = sum(np.sum((v[k] - wl[k]) * g_mix[k]) for k in v)
        v = {k: v[k] - LR * a * g_mix[k] for k in v}
        wl = {k: wl[k] - LR * g_w[k] for k in wl}
        a = float(np.clip(a - alpha_lr * g_alpha, 0.0, 1.0))
      rows[i] = (v, a)
      finals.append(wl)
    w = average(data, [w] * 3, finals, w)
    close(state.params, w)
    for i, (v, a) in enumerate(rows):
      row = jax.tree.map(lambda t: t[i], state.client_states)
      close(row["v"], v)
      np.testing.assert_allclose(float(row["alpha"]), a, atol=1e-5)
  v, a = rows[2]
  row = jax.tree.map(lambda t: t[2], states[-1].client_states)
  close(method.personalize(states[-1].params, row, None, None, None),
        {k: a * v[k] + (1 - a) * w[k] for k in w})


@pytest.mark.parametrize("name", ["fedrep", "fedper"])
def test_fedrep_and_fedper_two_rounds_match_numpy(name):
  data, params = linear_problem(SIZES)
  head_steps = 2   # FedRep: 2 head-only steps, then 1 body-only step
  if name == "fedrep":
    method = fedrep(linear_example_loss, LR, head_steps, ("b",), schedule=FULL_BATCH)
  else:
    method = fedper(linear_example_loss, LR, ("b",), schedule=FULL_BATCH)
  states = run_rounds(method, data, params, 2)
  w = to_numpy(params)
  heads = [w["b"] for _ in SIZES]
  for state in states[1:]:
    finals = []
    for i in range(len(SIZES)):
      x, y = client_xy(data, i)
      p = {"w": w["w"], "b": heads[i]}
      for k in range(STEPS):
        g = linear_grad(p, x, y)
        train_head = name == "fedper" or k < head_steps
        train_body = name == "fedper" or k >= head_steps
        p = {"w": p["w"] - LR * g["w"] * train_body, "b": p["b"] - LR * g["b"] * train_head}
      heads[i] = p["b"]
      finals.append({"w": p["w"], "b": w["b"]})   # the head's delta is not uploaded
    w = average(data, [w] * 3, finals, w)
    close(state.params, w)
    np.testing.assert_allclose(np.asarray(state.client_states["b"], np.float64), heads, atol=1e-5)
  row = jax.tree.map(lambda t: t[0], states[-1].client_states)
  close(method.personalize(states[-1].params, row, None, None, None), {"w": w["w"], "b": heads[0]})


@pytest.mark.slow   # compile-bound on 2 cores
def test_local_finetune_is_fedavg_then_sgd_on_the_client():
  data, params = linear_problem(SIZES)
  method = local_finetune(linear_example_loss, LR, finetune_lr=0.2, finetune_epochs=4,
                          schedule=FULL_BATCH)
  states = run_rounds(method, data, params, 2)
  w = to_numpy(params)
  for _ in range(2):
    finals = [gd(w, *client_xy(data, i), STEPS, LR) for i in range(3)]
    w = average(data, [w] * 3, finals, w)
  close(states[-1].params, w)
  x, y = client_xy(data, 2)
  padded = {k: jnp.asarray(np.pad(v, [(0, 2)] + [(0, 0)] * (v.ndim - 1)))
            for k, v in data.client(2).items()}
  tuned = method.personalize(states[-1].params, (), padded, jnp.int32(7), jax.random.PRNGKey(0))
  # Full batch = the client's whole data (batch_size None): 4 SGD steps.
  close(tuned, gd(w, x, y, 4, 0.2))


@pytest.mark.slow   # compile-bound on 2 cores
def test_fedbn_keeps_bn_local_and_averages_the_rest():
  rng = np.random.default_rng(0)
  sizes = (6, 4)
  x = rng.normal(size=(10, 3)).astype(np.float32) * np.repeat([[1.0], [3.0]], sizes, 0)
  y = rng.integers(0, 2, 10).astype(np.int32)
  data = FederatedData({"x": x, "y": y}, np.array([0, 6, 10]))
  model = batchnorm.mlp_bn((4,), 2)
  variables = model.init(jax.random.PRNGKey(1), x[:1])
  states = run_rounds(fedbn(model, LR, schedule=FULL_BATCH), data, variables, 2)
  # Reference: each client's full-batch SGD with flax in a Python loop, FedAvg of non-BN.
  def local(v, xs, ys):
    stats = v["batch_stats"]
    p = v["params"]
    for _ in range(STEPS):
      def loss(p):
        logits, new = model.apply({"params": p, "batch_stats": stats}, xs, train=True,
                                  mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean(), new
      (_, new), g = jax.value_and_grad(loss, has_aux=True)(p)
      p = jax.tree.map(lambda a, b: a - LR * b, p, g)
      stats = new["batch_stats"]
    return {"params": p, "batch_stats": stats}
  glob = variables
  rows = [pers.take_layers(variables, ("batch_stats", "BatchNorm_0")) for _ in sizes]
  for state in states[1:]:
    finals = [local(pers.put_layers(glob, rows[i]), jnp.asarray(data.client(i)["x"]),
                    jnp.asarray(data.client(i)["y"])) for i in range(2)]
    rows = [pers.take_layers(f, ("batch_stats", "BatchNorm_0")) for f in finals]
    weights = np.asarray(sizes) / sum(sizes)
    dense = {name: jax.tree.map(lambda a, b: weights[0] * a + weights[1] * b,
                                finals[0]["params"][name], finals[1]["params"][name])
             for name in ("Dense_0", "Dense_1")}
    glob = pers.put_layers(glob, {"params": dense})
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(glob)):
      np.testing.assert_allclose(a, b, atol=1e-5)
    for i in range(2):
      row = jax.tree.map(lambda t: t[i], state.client_states)
      for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(rows[i])):
        np.testing.assert_allclose(a, b, atol=1e-5)
  # The server's BN layer never moves; the clients' statistics differ (feature skew).
  np.testing.assert_array_equal(states[-1].params["params"]["BatchNorm_0"]["scale"],
                                variables["params"]["BatchNorm_0"]["scale"])
  means = states[-1].client_states["batch_stats"]["BatchNorm_0"]["var"]
  assert not np.allclose(means[0], means[1])


@pytest.mark.slow   # compile-bound on 2 cores
def test_within_client_split_and_held_out_clients():
  ids = np.repeat(np.arange(4), [10, 1, 4, 0][:3] + [5])
  test = within_client_split(ids, 0.25, 0)
  counts = [int(test[ids == c].sum()) for c in range(4)]
  assert counts == [round(10 * 0.25), 0, 1, round(5 * 0.25)]
  held = held_out_clients(10, 3, 0)
  assert held.shape == (3,) and len(set(held)) == 3 and np.all(np.diff(held) > 0)
  with pytest.raises(ValueError, match="at least one client must train"):
    held_out_clients(3, 3, 0)
  fed, _, info = load_federated_with_info("digits", "pathological", 20, client_test_fraction=0.25,
                                          held_out_clients=4, log_stats=False)
  plain, _, _ = load_federated_with_info("digits", "pathological", 20, log_stats=False)
  assert fed.num_clients == info.client_test.num_clients == 16
  assert info.held_out_train.num_clients == info.held_out_test.num_clients == 4
  total = (fed.num_examples + info.client_test.num_examples + info.held_out_train.num_examples
           + info.held_out_test.num_examples)
  assert total == plain.num_examples and info.client_test.num_examples > 0
  for i in range(fed.num_clients):   # a client's test split holds its own classes
    assert set(info.client_test.client(i)["y"]) <= set(fed.client(i)["y"])


def test_evaluate_clients_and_summary_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 2)).astype(np.float32)
  y = rng.integers(0, 3, 12).astype(np.int32)
  train = FederatedData({"x": x[:6], "y": y[:6]}, np.array([0, 2, 4, 6]))
  test = FederatedData({"x": x[6:], "y": y[6:]}, np.array([0, 1, 4, 6]))
  kernels = rng.normal(size=(3, 2, 3)).astype(np.float32)
  apply_fn = lambda p, xs: xs @ p
  personalize = lambda g, row, data, size, key: g + row
  out = pers.evaluate_clients(apply_fn, personalize, jnp.zeros((2, 3)), jnp.asarray(kernels),
                              train, test, jax.random.PRNGKey(0), batch_size=2)
  expected = []
  for i in range(3):
    c = test.client(i)
    expected.append(np.mean(np.argmax(c["x"] @ kernels[i], -1) == c["y"]))
  np.testing.assert_allclose(out["accuracy"], expected, atol=1e-6)
  summary = pers.summarize(out)
  np.testing.assert_allclose(summary["personal_accuracy_mean"], np.mean(expected))
  np.testing.assert_allclose(summary["personal_accuracy_p10"], np.percentile(expected, 10))
