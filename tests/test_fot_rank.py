"""FOT's FedProject: the rank chosen from the masked secure sum is the exact residual's,
the authors' extraction from the last cohort's local models, and the PMNIST MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import fot
from fedjax_lab import continual, models, server_rules
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data import continual as streams

D, CLIENTS, PER_CLIENT, SPECTRUM = 400, 4, 8, (27.0, 9.0, 3.0, 1.0)


def np_rank(sigma, threshold):
  """Smallest k with sum_{j<=k} s_j^2 / sum s_j^2 > threshold (numpy, no helper)."""
  energy = np.cumsum(np.asarray(sigma, np.float64) ** 2)
  return int(np.flatnonzero(energy / energy[-1] > threshold)[0]) + 1


@pytest.mark.parametrize("seed", [0])
def test_masked_sum_rank_equals_the_exact_residual_rank(seed):
  rng = np.random.default_rng(seed)
  old = np.linalg.qr(rng.normal(size=(D, 3)))[0]                  # the current basis
  signal = np.linalg.qr(rng.normal(size=(D, len(SPECTRUM))))[0] * np.array(SPECTRUM)
  basis = fot.LayerBasis(jnp.asarray(np.pad(old, ((0, 0), (0, D - 3))), jnp.float32),
                         jnp.asarray(np.arange(D) < 3, jnp.float32))
  acts = [rng.normal(size=(PER_CLIENT, len(SPECTRUM))) @ signal.T for _ in range(CLIENTS)]
  total, ratio_n = 0.0, 0.0
  for i, a in enumerate(acts):
    up = fot.masked_residuals({"l": jnp.asarray(a, jnp.float32)}, {"l": basis},
                              jnp.float32(PER_CLIENT), jax.random.PRNGKey(10 * seed + i))
    total, ratio_n = total + np.asarray(up["masked"]["l"]), ratio_n + float(up["ratio_n"]["l"])
  exact = np.concatenate([a - a @ old @ old.T for a in acts]).T     # R [d, n]
  s_exact = np.linalg.svd(exact, compute_uv=False)
  s_masked = np.linalg.svd(total.astype(np.float64), compute_uv=False)
  # Thresholds halfway between the exact residual's cumulative energy shares.
  shares = np.cumsum(s_exact[:len(SPECTRUM)] ** 2) / np.sum(s_exact ** 2)
  thresholds = np.concatenate([[shares[0] / 2], (shares[:-1] + shares[1:]) / 2])
  chosen = []
  for t in thresholds:
    k = np_rank(s_exact, t)
    assert fot.select_rank(s_masked, t) == k == fot.select_rank(s_exact, t)
    chosen.append(k)
  assert chosen == [1, 2, 3, 4]
  # Through the server step: eps chosen so that eps' = (r_bar - (1 - eps)) / r_bar is
  # each threshold; the masked sum and the exact residual add the same directions.
  r_bar = ratio_n / (CLIENTS * PER_CLIENT)
  for t, k in zip(thresholds, chosen):
    eps = 1.0 - r_bar * (1.0 - t)
    assert fot.adjusted_threshold(eps, r_bar) == pytest.approx(t)
    assert fot.grow_basis(basis, total, r_bar, eps)[1] == k
    assert fot.grow_basis(basis, exact, r_bar, eps)[1] == k


def test_dropout_mlp_is_the_papers_pmnist_model():
  model = models.dropout_mlp()
  x = jnp.ones((3, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(0), x)
  shapes = {k: v["kernel"].shape for k, v in params["params"].items()}
  assert shapes == {"Dense_0": (784, 400), "Dense_1": (400, 400), "Dense_2": (400, 400),
                    "Dense_3": (400, 10)}
  assert all("bias" in v for v in params["params"].values())
  # Evaluation is deterministic; training drops units (mask from the step's rng).
  np.testing.assert_array_equal(model.apply(params, x), model.apply(params, x))
  a, b = (model.train_apply(params, x, jax.random.PRNGKey(k)) for k in (1, 2))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  # Biases stay unprojected: only the four kernels get a basis.
  assert sorted(fot.projected_layers(params)) == [f"params/Dense_{i}/kernel" for i in range(4)]


def tiny_stream():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 4, 4, 1)).astype(np.float32)
  y = np.argmax(x.reshape(24, -1) @ rng.normal(size=(16, 3)), -1).astype(np.int32)
  return streams.permuted({"x": x, "y": y}, {"x": x[:6], "y": y[:6]}, 2, 4, partition="iid",
                          seed=1)


def test_local_extraction_uses_the_last_cohorts_local_models():
  stream = tiny_stream()
  model = models.continual_mlp((6,), 3, use_bias=True)
  params = model.init(jax.random.PRNGKey(0), stream[0].train.arrays["x"][:1])
  loss = continual.classification_loss(model)
  hook = fot.FedProject(model.apply, eps=0.9, extraction="local", clients_per_round=2)
  method = fot.fot(loss, 0.5, schedule=LocalSchedule(batch_size=3, epochs=1),
                   task_boundary=hook)
  assert hook.algorithm is method
  seen = {}

  def record(state, task, t, rng):
    # On task 0 the basis is empty, so x_R is the mean of the last cohort's local
    # models: the recomputed ones must average to it.
    prev = server_rules.require_state(state.rule_state, fot.PreviousParams, "keep").params
    if t == 0:
      seen["prev"], seen["params"] = prev, state.params
      seen["sums"] = hook._local_sums(state, task, fot.get_bases(state.rule_state))
      seen["local"] = hook.last_local_models(state, task)
    return hook(state, task, t, rng)

  opts = continual.StreamOptions(rounds_per_task=3, clients_per_round=2, rounds_per_call=3,
                                 progress=False)
  result = continual.run_stream(method, stream, params, continual.make_evaluator(model), opts,
                                record)
  assert result.task_info[0]["basis/params/Dense_0/kernel"] >= 1
  # The recomputed local models average to the global model (no basis yet, sgd(1)).
  mean = jax.tree.map(lambda a: jnp.mean(a, 0), seen["local"])
  for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(seen["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="needs the method"):
    fot.FedProject(model.apply, extraction="local")(result.state, stream[0], 0,
                                                     jax.random.PRNGKey(0))
  assert float(seen["sums"]["n"]) == 2 * 6
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), seen["prev"],
                      seen["params"])
  assert max(jax.tree.leaves(diff)) > 0        # x_{R-1} is kept, not x_R
