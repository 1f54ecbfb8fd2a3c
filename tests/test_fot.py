"""FOT, GPM and EWC for continual FL: projection, FedProject, streams, ACC/BWT, launch."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.linalg import subspace_angles

from algorithms import fedavg, fedewc, fot
from fedjax_lab import activations, continual, models
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data import continual as streams
from reference import linear_example_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def orthonormal(rng, d, k):
  q, _ = np.linalg.qr(rng.normal(size=(d, k)))
  return q


def padded_basis(u, k_max):
  d, k = u.shape
  full = np.zeros((d, k_max), np.float32)
  full[:, :k] = u
  mask = np.zeros(k_max, np.float32)
  mask[:k] = 1
  return fot.LayerBasis(jnp.asarray(full), jnp.asarray(mask))


def max_angle(a, b):
  return float(np.max(subspace_angles(np.asarray(a, np.float64), np.asarray(b, np.float64))))


# ------------------------------------------------------------------------ projection

def test_projection_removes_exactly_the_basis_component_and_is_idempotent():
  rng = np.random.default_rng(0)
  params = {"params": {"Dense_0": {"kernel": rng.normal(size=(6, 3)), "bias": rng.normal(size=3)},
                       "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4))}}}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x)), jnp.float32), params)
  u_dense, u_conv = orthonormal(rng, 6, 2), orthonormal(rng, 18, 5)
  bases = {"params/Dense_0/kernel": padded_basis(u_dense, 6),
           "params/Conv_0/kernel": padded_basis(u_conv, 18)}
  tx = fot.orthogonal_projection(bases=bases)
  out, _ = tx.update(grads, tx.init(params))
  g = np.asarray(grads["params"]["Dense_0"]["kernel"], np.float64)
  expected = g - u_dense @ (u_dense.T @ g)
  got = np.asarray(out["params"]["Dense_0"]["kernel"])
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert np.linalg.norm(u_dense.T @ got) < 1e-5
  gc = np.asarray(grads["params"]["Conv_0"]["kernel"], np.float64).reshape(18, 4)
  got_c = np.asarray(out["params"]["Conv_0"]["kernel"]).reshape(18, 4)
  np.testing.assert_allclose(got_c, gc - u_conv @ (u_conv.T @ gc), atol=1e-5)
  assert np.linalg.norm(u_conv.T @ got_c) < 1e-5
  # Biases pass through; projecting twice changes nothing.
  np.testing.assert_array_equal(out["params"]["Dense_0"]["bias"], grads["params"]["Dense_0"]["bias"])
  twice, _ = tx.update(out, tx.init(params))
  for a, b in zip(jax.tree.leaves(twice), jax.tree.leaves(out)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_empty_bases_are_the_identity():
  params = {"params": {"Dense_0": {"kernel": jnp.ones((5, 8)), "bias": jnp.ones(8)},
                       "Dense_1": {"kernel": jnp.ones((8, 4))}}}
  tx = fot.orthogonal_projection()
  state = tx.init(params)
  assert fot.basis_sizes(state.bases) == {"params/Dense_0/kernel": 0, "params/Dense_1/kernel": 0}
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(0), x.shape), params)
  out, _ = tx.update(grads, state)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="layers differ"):
    fot.set_bases(state, {})


def test_projected_update_keeps_a_linear_layer_outputs_on_old_inputs():
  # Closed form: for a in span(U), (W + P(G))^T a = W^T a + G^T (I - U U^T) a = W^T a.
  rng = np.random.default_rng(2)
  d, out, n = 10, 4, 6
  a_old = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))          # rank 6 in R^10
  basis = fot.empty_bases({"params": {"Dense_0": {"kernel": np.zeros((d, out))}}})
  summed = a_old.T                                                   # exact residual (GPM)
  new, added = fot.grow_basis(basis["params/Dense_0/kernel"], summed, 1.0, 1.0 - 1e-7,
                              squared_ratio=True, min_new=0, strict=False)
  assert added == n
  w = rng.normal(size=(d, out))
  g = jnp.asarray(rng.normal(size=(d, out)), jnp.float32)
  pg = np.asarray(fot.project({"params": {"Dense_0": {"kernel": g}}},
                              {"params/Dense_0/kernel": new})["params"]["Dense_0"]["kernel"])
  np.testing.assert_allclose(a_old @ (w + pg), a_old @ w, atol=1e-4 * np.abs(a_old @ w).max())
  # The update still moves outputs on a new direction.
  fresh = rng.normal(size=(1, d))
  assert np.abs(fresh @ pg).max() > 1e-2


def tiny_arrays(n, seed, side=4, classes=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, side, side, 1)).astype(np.float32)
  teacher = rng.normal(size=(side * side, classes))
  y = np.argmax(x.reshape(n, -1) @ teacher, -1).astype(np.int32)
  return {"x": x, "y": y}


class Recorder:
  """A task-end hook that keeps the params after each task, then calls ``inner``."""

  def __init__(self, inner=None):
    self.inner, self.params = inner, {}

  def __call__(self, state, task, t, rng):
    self.params[t] = state.params
    return (state, {}) if self.inner is None else self.inner(state, task, t, rng)


@pytest.fixture(scope="module")
def tiny_runs():
  """FOT (eps -> 1) and FedAvg on 3 permuted tiny tasks, shared by several tests.

  Task A has 6 examples in R^16, so a near-complete basis still leaves room for the
  next tasks; every parameter is a projected kernel (no biases).
  """
  train, test = tiny_arrays(6, 3), tiny_arrays(20, 4)
  stream = streams.permuted(train, test, 3, 2, seed=1)
  model = models.continual_mlp((16,), 4, use_bias=False)
  params = model.init(jax.random.PRNGKey(0), train["x"][:1])
  loss = continual.classification_loss(model)
  schedule = LocalSchedule(batch_size=3, epochs=2)
  opts = continual.StreamOptions(rounds_per_task=4, clients_per_round=2, rounds_per_call=2,
                                 progress=False)
  ev = continual.make_evaluator(model)
  fot_algo = fot.fot(loss, 0.3, schedule=schedule)
  # The global model's activations: old tasks' outputs are then exactly kept.
  fot_hook = Recorder(fot.FedProject(model.apply, eps=1.0 - 1e-6, extraction="global"))
  fot_run = continual.run_stream(fot_algo, stream, params, ev, opts, fot_hook)
  avg_hook = Recorder()
  avg_run = continual.run_stream(fedavg.fedavg(loss, 0.3, schedule=schedule, weighting="uniform"),
                                 stream, params, ev, opts, avg_hook)
  return dict(stream=stream, model=model, params=params, ev=ev, opts=opts, fot_algo=fot_algo,
              fot_hook=fot_hook, fot=fot_run, fedavg_hook=avg_hook, fedavg=avg_run)


def test_fot_stream_leaves_old_task_outputs_unchanged(tiny_runs):
  model, stream, result = tiny_runs["model"], tiny_runs["stream"], tiny_runs["fot"]
  after_a = tiny_runs["fot_hook"].params[0]
  x_a = jnp.asarray(stream[0].train.arrays["x"])
  before = np.asarray(model.apply(after_a, x_a))
  final = np.asarray(model.apply(result.state.params, x_a))
  np.testing.assert_allclose(final, before, atol=1e-4 * np.abs(before).max())
  moved = max(float(jnp.abs(p - q).max()) for p, q in
              zip(jax.tree.leaves(result.state.params), jax.tree.leaves(after_a)))
  assert moved > 1e-2
  sizes = [{k: v for k, v in info.items() if k.startswith("basis/")} for info in result.task_info]
  assert sizes[0]["basis/params/Dense_0/kernel"] == 6
  assert sizes[1]["basis/params/Dense_0/kernel"] == 12
  # FedAvg on the same stream does move the old task's outputs.
  plain = tiny_runs["fedavg"].state.params
  drift = np.abs(np.asarray(model.apply(plain, x_a)) - before).max()
  assert drift > 0.1 * np.abs(before).max()


def test_fot_without_a_basis_is_fedavg(tiny_runs):
  # During the first task no basis exists yet: FOT's rounds are FedAvg's.
  fot_a, avg_a = tiny_runs["fot_hook"].params[0], tiny_runs["fedavg_hook"].params[0]
  for p, q in zip(jax.tree.leaves(fot_a), jax.tree.leaves(avg_a)):
    np.testing.assert_allclose(p, q, atol=1e-6)
  np.testing.assert_allclose(tiny_runs["fot"].acc[0], tiny_runs["fedavg"].acc[0], atol=1e-6)


def test_rounds_do_not_recompile_when_the_basis_grows(tiny_runs):
  # Three tasks, bases grown twice, rounds in chunks of 2: the round was traced once.
  result = tiny_runs["fot"]
  assert result.traces == 1
  grown = [info["basis/params/Dense_1/kernel"] for info in result.task_info]
  assert grown[0] < grown[1] < grown[2]
  # The bases are in the optimizer state with their pre-allocated shapes.
  bases = fot.get_bases(result.state.rule_state)
  assert bases["params/Dense_0/kernel"].u.shape == (16, 16)
  assert fot.basis_sizes(bases)["params/Dense_1/kernel"] == grown[2]


# ------------------------------------------------------------------------ FedProject

def test_threshold_selection_on_a_known_spectrum():
  assert fot.select_rank([10.0, 1.0, 0.1], 0.98) == 1         # 100 / 101.01 = 0.990
  assert fot.select_rank([10.0, 1.0, 0.1], 0.995) == 2        # 101 / 101.01 = 0.9999
  assert fot.select_rank([10.0, 1.0, 0.1], 0.99999) == 3
  assert fot.adjusted_threshold(0.98, 1.0) == pytest.approx(0.98)
  assert fot.adjusted_threshold(0.95, 0.5) == pytest.approx(0.9)                   # (.5-.05)/.5
  assert fot.adjusted_threshold(0.95, 0.5, squared_ratio=True) == pytest.approx(0.8)
  # Old basis already holds eps: the code still adds one direction, GPM none.
  assert fot.select_rank([3.0, 1.0], fot.adjusted_threshold(0.9, 0.05)) == 1
  assert fot.select_rank([3.0, 1.0], fot.adjusted_threshold(0.9, 0.05), min_new=0) == 0
  # On a matrix with that spectrum the new columns are its top singular vectors.
  rng = np.random.default_rng(3)
  u, v = orthonormal(rng, 8, 3), orthonormal(rng, 8, 3)
  s = u @ np.diag([10.0, 1.0, 0.1]) @ v.T
  empty = fot.empty_bases({"params": {"Dense_0": {"kernel": np.zeros((8, 2))}}})
  grown, k = fot.grow_basis(empty["params/Dense_0/kernel"], s, 1.0, 0.98)
  assert k == 1 and fot.basis_sizes({"l": grown}) == {"l": 1}
  assert max_angle(np.asarray(grown.u)[:, :1], u[:, :1]) < 1e-4


def numpy_fedproject_server(u_old, s, r_bar, eps):
  """The authors' rule in numpy: eps', SVD, smallest k with energy > eps', QR."""
  eps_adj = (r_bar - (1 - eps)) / r_bar
  left, sigma, _ = np.linalg.svd(s)
  energy = np.cumsum(sigma ** 2) / np.sum(sigma ** 2)
  k = int(np.argmax(energy > eps_adj)) + 1
  q, _ = np.linalg.qr(np.concatenate([u_old, left[:, :k]], axis=1))
  return q, k


def test_basis_growth_matches_a_numpy_svd_reference():
  rng = np.random.default_rng(4)
  d = 12
  u_old = orthonormal(rng, d, 3)
  a = rng.normal(size=(40, d)) * np.linspace(3, 0.1, d)             # decaying spectrum
  r = a - (a @ u_old) @ u_old.T
  r_bar = np.linalg.norm(r) / np.linalg.norm(a)
  for eps in (0.9, 0.97):
    expected, k_expected = numpy_fedproject_server(u_old, r.T, r_bar, eps)
    basis, k = fot.grow_basis(padded_basis(u_old, d), r.T.astype(np.float32), r_bar, eps)
    assert k == k_expected and k >= 2
    got = np.asarray(basis.u)[:, :3 + k]
    np.testing.assert_allclose(got.T @ got, np.eye(3 + k), atol=1e-5)
    assert max_angle(got, expected) < 1e-3
    assert max_angle(got[:, :3], u_old) < 1e-4        # the old basis is kept


def test_masked_secure_sum_spans_the_clients_residual_space():
  rng = np.random.default_rng(5)
  d = 12
  u_old = orthonormal(rng, d, 2)
  bases = {"l": padded_basis(u_old, d)}
  residuals, total = [], None
  for i, rank in enumerate((2, 3, 1)):
    a = rng.normal(size=(7, rank)) @ rng.normal(size=(rank, d))       # rows: inputs
    up = fot.masked_residuals({"l": jnp.asarray(a, jnp.float32)}, bases, jnp.float32(7),
                              jax.random.PRNGKey(i))
    residuals.append(a - (a @ u_old) @ u_old.T)
    total = up["masked"]["l"] if total is None else total + up["masked"]["l"]
    np.testing.assert_allclose(float(up["ratio_n"]["l"]) / 7,
                               np.linalg.norm(residuals[-1]) / np.linalg.norm(a), rtol=1e-5)
  stacked = np.concatenate(residuals).T                               # [d, sum n_i]
  rank = np.linalg.matrix_rank(stacked)
  left, sigma, _ = np.linalg.svd(np.asarray(total, np.float64))
  assert rank == 6 and np.sum(sigma > 1e-4 * sigma[0]) == rank
  ref, _, _ = np.linalg.svd(stacked)
  assert max_angle(left[:, :rank], ref[:, :rank]) < 1e-3


def test_fedproject_hook_sums_clients_through_the_round_machinery():
  # The hook's client part (capture, residual, masking, secure sum over the mapped
  # clients) against numpy on the same inputs; the last-round model is a fixed MLP.
  train, test = tiny_arrays(30, 6), tiny_arrays(10, 7)
  stream = streams.permuted(train, test, 1, 3, partition="iid", seed=2)
  model = models.continual_mlp((5,), 4, use_bias=True)
  params = model.init(jax.random.PRNGKey(1), train["x"][:1])
  tx = fot.orthogonal_projection()
  rng = np.random.default_rng(6)
  u0 = orthonormal(rng, 16, 4)
  bases = {**tx.init(params).bases, "params/Dense_0/kernel": padded_basis(u0, 16)}
  hook = fot.FedProject(model.apply, eps=0.9)
  stat = continual.make_client_statistic(hook._client_fn, fot.secure_sum(), "vmap")
  sums = continual.run_client_statistic(stat, (params, bases), stream[0].train,
                                        jax.random.PRNGKey(0))
  data = stream[0].train
  x_all = data.arrays["x"].reshape(30, -1)
  assert float(sums["n"]) == 30
  ratios = []
  for i in range(3):
    xi = data.client(i)["x"].reshape(-1, 16)
    ri = xi - (xi @ u0) @ u0.T
    ratios.append(np.linalg.norm(ri) / np.linalg.norm(xi) * len(xi))
  np.testing.assert_allclose(float(sums["ratio_n"]["params/Dense_0/kernel"]), sum(ratios), rtol=1e-4)
  resid = x_all - (x_all @ u0) @ u0.T
  left, sigma, _ = np.linalg.svd(np.asarray(sums["masked"]["params/Dense_0/kernel"], np.float64))
  ref, _, _ = np.linalg.svd(resid.T)
  assert np.sum(sigma > 1e-4 * sigma[0]) == 12
  assert max_angle(left[:, :12], ref[:, :12]) < 1e-3
  hidden = np.asarray(jax.nn.relu(x_all @ params["params"]["Dense_0"]["kernel"]
                                  + params["params"]["Dense_0"]["bias"]))
  left1, sigma1, _ = np.linalg.svd(np.asarray(sums["masked"]["params/Dense_1/kernel"], np.float64))
  rank1 = np.linalg.matrix_rank(hidden)
  assert np.sum(sigma1 > 1e-4 * sigma1[0]) == rank1
  assert max_angle(left1[:, :rank1], np.linalg.svd(hidden.T)[0][:, :rank1]) < 1e-3
  # Clients sharded over the 8 CPU devices (padded with empty clients): same sums.
  sharded = continual.make_client_statistic(hook._client_fn, fot.secure_sum(), "sharded")
  sums_sharded = continual.run_client_statistic(sharded, (params, bases), stream[0].train,
                                                jax.random.PRNGKey(0), backend="sharded")
  for a, b in zip(jax.tree.leaves(sums_sharded), jax.tree.leaves(sums)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- activation capture

@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=(3, 3), padding="SAME"),
    dict(kernel_size=(3, 2), padding="VALID", strides=(2, 1)),
    dict(kernel_size=(2, 2), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1)),
    dict(kernel_size=(3,), padding="SAME", strides=2),
])
def test_conv_patches_times_reshaped_kernel_equals_the_conv(kwargs):
  spatial = (7, 6) if len(kwargs["kernel_size"]) == 2 else (9,)
  conv = nn.Conv(5, **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + spatial + (3,))
  variables = conv.init(jax.random.PRNGKey(1), x)
  out = conv.apply(variables, x)
  patches = activations.conv_patches(conv, x)
  kernel = variables["params"]["kernel"]
  via_patches = patches @ kernel.reshape(-1, kernel.shape[-1]) + variables["params"]["bias"]
  assert via_patches.shape == out.shape
  np.testing.assert_allclose(via_patches, out, atol=1e-5)
  # One explicit receptive field, flattened (kh, kw, c_in) by hand.
  if kwargs.get("padding") == "VALID":
    sh, sw = kwargs.get("strides", (1, 1))
    field = np.asarray(x)[1, sh:sh + 3, sw:sw + 2, :].reshape(-1)
    np.testing.assert_allclose(np.asarray(patches)[1, 1, 1], field, atol=1e-6)


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (2, 2), padding="VALID")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


def test_capture_gives_layer_inputs_of_dense_and_conv_layers():
  model = TinyCNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  params = model.init(jax.random.PRNGKey(1), x)
  mask = jnp.array([True, False, True])
  rows = activations.layer_input_rows(model.apply, params, x, mask)
  p = params["params"]
  assert set(rows) == {"params/Conv_0/kernel", "params/Dense_0/kernel", "params/Dense_1/kernel"}
  conv_rows = np.asarray(rows["params/Conv_0/kernel"]).reshape(3, 9, 8)
  np.testing.assert_allclose(conv_rows[0, 0], np.asarray(x)[0, :2, :2, :].reshape(-1), atol=1e-6)
  assert np.all(conv_rows[1] == 0)                                        # masked example
  h = jax.nn.relu(jax.lax.conv_general_dilated(
      x, p["Conv_0"]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      + p["Conv_0"]["bias"]).reshape(3, -1)
  # Dense_1 (4 units) is called first on the flattened conv output.
  np.testing.assert_allclose(rows["params/Dense_1/kernel"][0], h[0], atol=1e-5)
  h2 = jax.nn.relu(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
  np.testing.assert_allclose(rows["params/Dense_0/kernel"][2], h2[2], atol=1e-5)


# ------------------------------------------------------------------- streams, metrics

def test_continual_metrics_against_a_hand_computed_matrix():
  acc = [[0.9, 0.1, 0.2],
         [0.7, 0.8, 0.1],
         [0.5, 0.6, 0.95]]
  m = continual.continual_metrics(acc)
  assert m["acc"] == pytest.approx((0.5 + 0.6 + 0.95) / 3)
  assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)        # -0.3
  assert m["forgetting"] == pytest.approx(0.3)
  assert m["max_forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
  assert m["average_accuracy"] == pytest.approx([0.9, 0.75, (0.5 + 0.6 + 0.95) / 3])
  # Forgetting measured from the best earlier accuracy, not the diagonal.
  m2 = continual.continual_metrics([[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.7, 0.9]])
  assert m2["bwt"] == pytest.approx(((0.6 - 0.5) + (0.7 - 0.8)) / 2)
  assert m2["max_forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.7)) / 2)
  assert continual.continual_metrics([[0.7]])["bwt"] == 0.0
  with pytest.raises(ValueError, match="square"):
    continual.continual_metrics([[0.1, 0.2]])


def test_permuted_stream_properties():
  train, test = tiny_arrays(40, 8), tiny_arrays(12, 9)
  stream = streams.permuted(train, test, 4, 5, partition="dirichlet", alpha=1.0, seed=3)
  assert len(stream) == 4 and stream.scenario == "permuted" and stream.num_clients == 5
  flat_train, flat_test = train["x"].reshape(40, -1), test["x"].reshape(12, -1)
  perms = []
  for t, task in enumerate(stream):
    assert task.train.num_examples == 40 and task.class_mask.all()
    # Recover the permutation from the test set (rows keep their order) and check that
    # the train set of the task uses the same one.
    px = task.test["x"].reshape(12, -1)
    perm = np.array([np.flatnonzero(np.all(np.isclose(flat_test, px[:, [i]]), 0))[0]
                     for i in range(16)])
    np.testing.assert_array_equal(px, flat_test[:, perm])
    np.testing.assert_array_equal(np.sort(perm), np.arange(16))
    order = np.lexsort(task.train.arrays["x"].reshape(40, -1)[:, ::-1].T)
    expected = flat_train[:, perm]
    np.testing.assert_array_equal(task.train.arrays["x"].reshape(40, -1)[order],
                                  expected[np.lexsort(expected[:, ::-1].T)])
    np.testing.assert_array_equal(np.sort(task.train.arrays["y"]), np.sort(train["y"]))
    assert np.all(task.train.arrays["task"] == t) and np.all(task.test["task"] == t)
    assert task.test["x"].shape == test["x"].shape
    perms.append(tuple(perm))
  assert perms[0] == tuple(range(16)) and len(set(perms)) == 4
  again = streams.permuted(train, test, 4, 5, partition="dirichlet", alpha=1.0, seed=3)
  np.testing.assert_array_equal(again[2].train.arrays["x"], stream[2].train.arrays["x"])


def test_split_stream_properties_and_task_masks():
  train, test = tiny_arrays(200, 10, classes=6), tiny_arrays(60, 11, classes=6)
  for scenario in ("task", "class"):
    stream = streams.split(train, test, 4, num_tasks=3, scenario=scenario, seed=1)
    assert stream.num_classes == 6
    seen = []
    for t, task in enumerate(stream):
      assert set(np.unique(task.train.arrays["y"])) <= set(task.classes.tolist())
      assert set(np.unique(task.test["y"])) <= set(task.classes.tolist())
      assert task.train.num_examples == np.isin(train["y"], task.classes).sum()
      assert np.all(task.train.arrays["task"] == t)
      expected_mask = np.isin(np.arange(6), task.classes) if scenario == "task" else np.ones(6, bool)
      np.testing.assert_array_equal(task.class_mask, expected_mask)
      seen.extend(task.classes.tolist())
    assert sorted(seen) == list(range(6))
  with pytest.raises(ValueError, match="divide"):
    streams.split(train, test, 4, num_tasks=4)
  with pytest.raises(ValueError, match="overlap"):
    streams.split(train, test, 4, groups=[[0, 1], [1, 2]])
  with pytest.raises(ValueError, match="unknown stream kind"):
    streams.make_stream(train, test, "rotated", 2, 4)


def test_task_incremental_loss_and_evaluator_mask_to_the_task_classes():
  model = models.continual_mlp((), 4, use_bias=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  params = model.init(jax.random.PRNGKey(1), x)
  masks = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
  batch = {"x": x, "y": jnp.array([0, 1, 2, 3, 2]), "task": jnp.array([0, 0, 1, 1, 1])}
  losses = continual.classification_loss(model, masks)(params, batch, None)
  logits = np.asarray(model.apply(params, x), np.float64)
  for i in range(5):
    sub = logits[i][masks[batch["task"][i]]]
    target = int(batch["y"][i]) - 2 * int(batch["task"][i])
    np.testing.assert_allclose(losses[i], np.log(np.exp(sub).sum()) - sub[target], rtol=1e-5)
  # Task 0's examples give no gradient to task 1's head.
  grads = jax.grad(lambda p: continual.classification_loss(model, masks)(
      p, {k: v[:2] for k, v in batch.items()}, None).sum())(params)
  assert np.all(np.asarray(grads["params"]["Dense_0"]["kernel"])[:, 2:] == 0)
  ev = continual.make_evaluator(model, batch_size=2)
  acc = ev(params, {"x": x[2:], "y": batch["y"][2:]}, jnp.asarray(masks[1]))["accuracy"]
  expected = np.mean(np.argmax(logits[2:, 2:], -1) + 2 == np.asarray(batch["y"][2:]))
  assert float(acc) == pytest.approx(expected)


# ---------------------------------------------------------------------------- EWC, GPM

def test_ewc_penalty_and_aggregated_fisher_match_numpy():
  tx = fedewc.ewc_penalty(2.0)
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  ewc = {"fisher": {"w": jnp.array([0.5, 3.0]), "b": jnp.array(1.0)},
         "anchor": {"w": jnp.array([0.0, 0.0]), "b": jnp.array(1.0)}}
  g = {"w": jnp.array([0.1, 0.1]), "b": jnp.array(0.0)}
  out, _ = tx.update(g, tx.init(params), params, ewc=ewc)
  np.testing.assert_allclose(out["w"], [0.1 + 2 * 0.5 * 1.0, 0.1 + 2 * 3.0 * -2.0])
  np.testing.assert_allclose(out["b"], 2 * 1.0 * -0.5)
  # Fisher of linear regression: mean over ALL examples of (r x)^2 and r^2.
  from reference import linear_problem
  data, p0 = linear_problem((5, 3, 7))
  stream_task = streams.Task(0, data, {}, np.arange(1), np.ones(1, bool))
  algo = fedewc.fedavg_ewc(linear_example_loss, 0.1, 1.0)
  state = algo.init(jax.tree.map(jnp.asarray, p0), jax.random.PRNGKey(0), 3)
  hook = fedewc.FisherUpdate(linear_example_loss)
  state, _ = hook(state, stream_task, 0, jax.random.PRNGKey(1))
  x, y = data.arrays["x"].astype(np.float64), data.arrays["y"].astype(np.float64)
  r = x @ p0["w"] + p0["b"] - y
  np.testing.assert_allclose(state.extra["ewc"]["fisher"]["w"], np.mean((r[:, None] * x) ** 2, 0),
                             rtol=1e-4)
  np.testing.assert_allclose(state.extra["ewc"]["fisher"]["b"], np.mean(r ** 2), rtol=1e-4)
  state2, _ = hook(state, stream_task, 1, jax.random.PRNGKey(1))           # gamma = 1: sums
  np.testing.assert_allclose(state2.extra["ewc"]["fisher"]["b"], 2 * np.mean(r ** 2), rtol=1e-4)


def test_gpm_update_uses_the_exact_energy_criterion():
  model = models.continual_mlp((), 3, use_bias=False)
  rng = np.random.default_rng(12)
  x = (rng.normal(size=(50, 8)) * np.array([5, 3, 2, 1, 0.5, 0.2, 0.1, 0.05])).astype(np.float32)
  data = streams.permuted({"x": x, "y": np.zeros(50, np.int32)},
                          {"x": x, "y": np.zeros(50, np.int32)}, 1, 1, seed=0)
  params = model.init(jax.random.PRNGKey(0), x[:1])
  algo = fot.gpm(continual.classification_loss(model), 0.1)
  state = algo.init(params, jax.random.PRNGKey(0), 1)
  state, info = fot.GPMUpdate(model.apply, eps=0.97, samples=0)(state, data[0], 0,
                                                                 jax.random.PRNGKey(0))
  sigma = np.linalg.svd(x.astype(np.float64), compute_uv=False)
  energy = np.cumsum(sigma ** 2) / np.sum(sigma ** 2)
  k = int(np.argmax(energy >= 0.97)) + 1
  assert info["basis/params/Dense_0/kernel"] == k
  u = np.asarray(state.extra["bases"]["params/Dense_0/kernel"].u)[:, :k]
  assert max_angle(u, np.linalg.svd(x.T.astype(np.float64))[0][:, :k]) < 1e-3


# ---------------------------------------------------------------------- launch, resume

def test_stream_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_runs, tmp_path):
  t = tiny_runs
  fedproject = t["fot_hook"].inner

  def crashing(state, task, index, rng):
    if index == 1:
      raise KeyboardInterrupt("killed")
    return fedproject(state, task, index, rng)

  opts = continual.StreamOptions(rounds_per_task=4, clients_per_round=2, rounds_per_call=2,
                                 progress=False, workdir=str(tmp_path))
  with pytest.raises(KeyboardInterrupt):
    continual.run_stream(t["fot_algo"], t["stream"], t["params"], t["ev"], opts, crashing)
  resumed = continual.run_stream(t["fot_algo"], t["stream"], t["params"], t["ev"], opts,
                                 fedproject)
  straight = t["fot"]
  np.testing.assert_array_equal(resumed.acc, straight.acc)
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed.traces == 0                  # the cached compiled round was reused
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [line["task_end"] for line in lines if "task_end" in line] == [0, 1, 2]
  assert [line["round"] for line in lines if "task_end" not in line] == list(range(1, 13))


def run_launch(*flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "launch.continual", "--progress=false", *flags],
                        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_launch_runs_a_tiny_stream_and_prints_the_summary():
  proc = run_launch("--config=launch/configs/fot_split_digits.py", "--config.num_tasks=2",
                    "--config.rounds_per_task=2", "--config.rounds_per_call=2",
                    "--config.num_clients=4", "--config.clients_per_round=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["algorithm"] == "fot" and summary["tasks"] == 2 and summary["stream"] == "task"
  assert {"acc", "bwt", "wall_s", "acc_matrix", "basis"} <= set(summary)
  acc = np.array(summary["acc_matrix"])
  assert acc.shape == (2, 2)
  assert summary["acc"] == pytest.approx(acc[-1].mean(), abs=1e-4)
  assert summary["bwt"] == pytest.approx(acc[1, 0] - acc[0, 0], abs=1e-3)
  assert "params/Dense_2/kernel" not in summary["basis"]          # the head is excluded


def test_launch_rejects_bad_config_values():
  from launch import continual as launch_continual
  from launch.configs import fot_permuted_digits
  for key, value, message in [("algorithm", "nope", "Unknown algorithm 'nope'"),
                              ("stream", "rotated", "unknown stream kind"),
                              ("model", "vit", "Unknown model")]:
    config = fot_permuted_digits.get_config()
    config.num_tasks = 2
    config[key] = value
    with pytest.raises(ValueError, match=message):
      launch_continual.run(config, progress=False)
  with pytest.raises(ValueError, match="Unknown preset"):
    fot_permuted_digits.get_config("sgd")


# ------------------------------------------------------------------------------ slow

@pytest.mark.slow
def test_fot_forgets_less_than_fedavg_on_permuted_digits():
  from launch import continual as launch_continual
  from launch.configs import fot_permuted_digits
  results = {}
  for name in ("fedavg", "fot"):
    config = fot_permuted_digits.get_config(name)
    _, results[name] = launch_continual.run(config, progress=False)
  fedavg_forgetting, fot_forgetting = -results["fedavg"]["bwt"], -results["fot"]["bwt"]
  assert results["fot"]["bwt"] > results["fedavg"]["bwt"]
  assert fot_forgetting <= 0.5 * fedavg_forgetting
  assert results["fot"]["acc"] >= results["fedavg"]["acc"] + 0.10
