"""FAL / FAT / FedDynAT: PGD and FGSM, the adversarial oracle, robust evaluation, launch.

References are closed forms for a linear logistic model (ALGORITHMS.md section 1) and a
few lines of numpy; every check compares numbers, not just directions.
"""
import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import algorithms
from algorithms import fal as fal_lib
from fedjax_lab import attacks, metrics, models, oracles
from fedjax_lab.algorithm import make_multi_round, make_round
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.metrics import read_jsonl
from reference import tree_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- a linear logistic model: y in {-1, +1}, l = softplus(-y (x.w + b)) ------------------------

def logistic_problem(batch=6, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=dim).astype(np.float32)
  w[np.abs(w) < 0.1] = 0.5                        # sign(w) well defined
  params = {"w": jnp.asarray(w), "b": jnp.float32(0.1)}
  x = jnp.asarray(rng.uniform(0.3, 0.7, size=(batch, dim)), jnp.float32)
  y = jnp.asarray(rng.choice([-1.0, 1.0], size=batch), jnp.float32)
  return params, x, y


def logistic_example_loss(params, batch, rng):
  del rng
  return jax.nn.softplus(-batch["y"] * (batch["x"] @ params["w"] + params["b"]))


def logistic_input_loss(params, y):
  return lambda x: logistic_example_loss(params, {"x": x, "y": y}, None)


def numpy_logistic_grad(params, x, y, mask):
  """Gradient of the masked mean logistic loss, in float64."""
  w, b = np.asarray(params["w"], np.float64), float(params["b"])
  x, y, mask = np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(mask, np.float64)
  coef = -y / (1.0 + np.exp(y * (x @ w + b))) * mask      # dl/df = -y sigmoid(-y f)
  return {"w": x.T @ coef / mask.sum(), "b": coef.sum() / mask.sum()}


# ---- a tiny classification population with inputs in [0, 1] -----------------------------------

def classification_problem(sizes=(5, 3, 7, 2, 6), dim=4, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.uniform(0.0, 1.0, size=(n, dim)).astype(np.float32)
  y = rng.integers(0, classes, size=n).astype(np.int32)
  data = FederatedData({"x": x, "y": y}, np.concatenate([[0], np.cumsum(sizes)]))
  model = models.mlp((8,), classes)
  params = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))
  return data, model, params


def run_rounds(method, data, params, rounds, cohort=None, backend="vmap", seed=0):
  round_fn = make_round(method, data, cohort or data.num_clients, backend)
  run = make_multi_round(round_fn, backend)
  state = method.init(params, jax.random.PRNGKey(seed), data.num_clients)
  arrays, offsets = data.device_arrays()
  return run(state, arrays, offsets, rounds)


def per_example_norm(d, norm):
  d = np.asarray(d, np.float64).reshape(d.shape[0], -1)
  return np.abs(d).max(1) if norm == "linf" else np.sqrt((d ** 2).sum(1))


# ---- the attack ------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,eps,jit", [("linf", 0.3, False), ("l2", 0.8, True)])
def test_pgd_stays_in_the_ball_and_the_input_range(norm, eps, jit):
  _, model, params = classification_problem()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0.0, 1.0, size=(32, 4)), jnp.float32)
  x = x.at[:4].set(0.0).at[4:8].set(1.0)              # corners: the range clip must act
  y = jnp.asarray(rng.integers(0, 3, size=32), jnp.int32)
  loss = lambda z: optax.softmax_cross_entropy_with_integer_labels(model.apply(params, z), y)
  attack = attacks.pgd(eps, step_size=eps / 3, steps=7, norm=norm, rand_init=True)
  run = lambda x, key: attack(loss, x, key)
  x_adv = (jax.jit(run) if jit else run)(x, jax.random.PRNGKey(0))
  dist = per_example_norm(x_adv - x, norm)
  assert dist.max() <= eps + 1e-6
  assert dist.max() >= 0.5 * eps                       # it moved: the check could fail
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_stays_in_the_ball(norm):
  x = jnp.full((64, 3, 3), 0.5)
  start = attacks.random_start(jax.random.PRNGKey(0), x, 0.25, norm)
  dist = per_example_norm(start - x, norm)
  assert dist.max() <= 0.25 + 1e-6 and dist.min() > 0.0


def test_pgd_ascends_on_a_random_mlp():
  _, model, params = classification_problem(seed=3)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.uniform(size=(64, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=64), jnp.int32)
  loss = lambda z: optax.softmax_cross_entropy_with_integer_labels(model.apply(params, z), y)
  x_adv = attacks.pgd(0.2, 0.05, 10, rand_init=True)(loss, x, jax.random.PRNGKey(0))
  before, after = np.asarray(loss(x)), np.asarray(loss(x_adv))
  assert after.mean() > before.mean() + 0.01
  assert np.mean(after >= before) >= 0.95


def test_loss_is_non_decreasing_in_the_number_of_steps_on_a_linear_model():
  params, x, y = logistic_problem(batch=16)
  loss = logistic_input_loss(params, y)
  values = [np.asarray(loss(attacks.pgd_perturb(loss, x, None, eps=0.2, step_size=0.03,
                                                 steps=s, rand_init=False)))
            for s in range(9)]
  values = np.stack(values)                            # [steps, B]
  assert np.all(np.diff(values, axis=0) >= -1e-6)
  assert np.all(values[-1] > values[0] + 1e-3)


@pytest.mark.parametrize("step_size,steps,rand_init", [(0.15, 1, False), (0.4, 1, False),
                                                       (0.15, 2, True)])
def test_linf_pgd_reaches_the_closed_form_optimum_of_a_linear_model(step_size, steps, rand_init):
  # max_{||d||_inf <= rho} softplus(-y (w.(x + d) + b)) is attained at d = -rho y sign(w).
  rho = 0.15
  params, x, y = logistic_problem()
  loss = logistic_input_loss(params, y)
  x_adv = attacks.pgd_perturb(loss, x, jax.random.PRNGKey(2), eps=rho, step_size=step_size,
                              steps=steps, rand_init=rand_init, clip_min=None, clip_max=None)
  expected = np.asarray(x) - rho * np.asarray(y)[:, None] * np.sign(np.asarray(params["w"]))
  np.testing.assert_allclose(x_adv, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_is_one_pgd_step_without_random_start(norm):
  params, x, y = logistic_problem(batch=8)
  loss = logistic_input_loss(params, y)
  eps = 0.25
  fgsm = attacks.fgsm(eps, norm)(loss, x, jax.random.PRNGKey(0))
  one_step = attacks.pgd_perturb(loss, x, jax.random.PRNGKey(1), eps=eps, step_size=eps,
                                 steps=1, norm=norm, rand_init=False)
  np.testing.assert_array_equal(fgsm, one_step)
  # By hand: grad_x l = -y sigmoid(-y f) w, so the step direction is -y sign(w) (l_inf)
  # or -y w / ||w|| (l_2).
  w, xn, yn = np.asarray(params["w"], np.float64), np.asarray(x, np.float64), np.asarray(y)
  direction = -yn[:, None] * (np.sign(w) if norm == "linf" else w / np.linalg.norm(w))
  np.testing.assert_allclose(fgsm, np.clip(xn + eps * direction, 0, 1), atol=1e-6)


def test_no_param_gradient_flows_through_the_attack():
  # l_2 steps g/||g|| depend smoothly on the params, so a leaky attack changes the gradient.
  data, model, params = classification_problem()
  example_loss = models.classification_loss(model)
  batch = {"x": jnp.asarray(data.arrays["x"][:8]), "y": jnp.asarray(data.arrays["y"][:8]),
           "mask": jnp.ones(8, bool)}
  cfg = dict(eps=0.5, step_size=0.2, steps=3, norm="l2", rand_init=False,
             clip_min=None, clip_max=None)

  def input_loss(p):
    return lambda x: example_loss(p, {**batch, "x": x}, None)

  def loss_through(attack_fn):
    def loss(p):
      x_adv = attack_fn(input_loss(p), batch["x"], None, **cfg)
      return oracles.batch_loss(example_loss)(p, {**batch, "x": x_adv}, None)
    return jax.jit(jax.grad(loss))(params)

  oracle = oracles.adversarial(example_loss, attacks.PGD(**cfg))
  grads_oracle, _, _ = jax.jit(oracle.update)(params, batch, jax.random.PRNGKey(0), ())
  explicit = loss_through(lambda *a, **k: jax.lax.stop_gradient(attacks._ascend(*a, **k)))
  guarded = loss_through(attacks.pgd_perturb)          # differentiating around pgd_perturb
  leaky = loss_through(attacks._ascend)
  chex.assert_trees_all_close(grads_oracle, explicit, atol=1e-6)
  chex.assert_trees_all_close(guarded, explicit, atol=0)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(leaky), jax.tree.leaves(explicit)))
  assert gap > 1e-4                                    # the comparison can fail


# ---- the oracle ------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_mix_ratio_weights_clean_and_adversarial_gradients(ratio):
  rho = 0.1
  params, x, y = logistic_problem(batch=7)
  mask = jnp.asarray([1, 1, 1, 0, 1, 1, 0], bool)
  batch = {"x": x, "y": y, "mask": mask}
  attack = attacks.PGD(rho, rho, 1, "linf", rand_init=False, clip_min=None, clip_max=None)
  grads, aux, _ = oracles.adversarial(logistic_example_loss, attack, ratio).update(
      params, batch, jax.random.PRNGKey(0), ())
  x_star = np.asarray(x) - rho * np.asarray(y)[:, None] * np.sign(np.asarray(params["w"]))
  clean = numpy_logistic_grad(params, x, y, mask)
  adv = numpy_logistic_grad(params, x_star, y, mask)
  expected = {k: (1 - ratio) * clean[k] + ratio * adv[k] for k in clean}
  tree_close(grads, expected, atol=1e-6)
  mean_loss = lambda z: float(oracles.masked_mean(logistic_input_loss(params, y)(z), mask))
  assert abs(float(aux["loss"]) - ((1 - ratio) * mean_loss(x) + ratio * mean_loss(x_star))) < 1e-6
  if ratio == 0.3:                                     # the mix differs from both ends
    assert abs(expected["b"] - clean["b"]) > 1e-3 and abs(expected["b"] - adv["b"]) > 1e-3


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="Unknown attack norm 'l1'; choose one of linf, l2"):
    attacks.pgd(0.1, norm="l1")
  with pytest.raises(ValueError, match="steps must be an int >= 0"):
    attacks.PGD(0.1, 0.1, -1)
  with pytest.raises(ValueError, match="eps must be >= 0"):
    attacks.PGD(-0.1, 0.1, 1)
  with pytest.raises(ValueError, match=r"mix_ratio must be in \[0, 1\]"):
    oracles.adversarial(logistic_example_loss, attacks.fgsm(0.1), 1.5)
  with pytest.raises(ValueError, match="min_steps <= initial_steps"):
    fal_lib.decaying_steps(3, 0.9, 5)
  config = small_config()
  config.adversarial_base = "fal"
  with pytest.raises(ValueError, match="adversarial_base must be a non-adversarial method"):
    algorithms.build("fal", config, logistic_example_loss)
  del config["adversarial_training"]
  config.adversarial_base = "fedavg"
  with pytest.raises(ValueError, match="needs config.adversarial_training"):
    algorithms.build("fal", config, logistic_example_loss)


# ---- rounds ----------------------------------------------------------------------------------

def small_config(**overrides):
  # shuffle=False: the shuffle's key derivation doubles the compile time of a round.
  config = ml_collections.ConfigDict(dict(
      local_steps=0, local_epochs=2, batch_size=2, shuffle=False, client_lr=0.1, server_lr=1.0,
      weighting="num_examples", prox_mu=0.5, server_b1=0.9, server_b2=0.99, server_tau=1e-3,
      adversarial_base="fedavg", mix_ratio=0.5,
      adversarial_training=dict(norm="linf", eps=0.2, step_size=0.05, steps=3, rand_init=True,
                  clip_min=0.0, clip_max=1.0)))
  config.update(overrides)
  return config


@functools.lru_cache(maxsize=None)
def plain_run(base):
  data, model, params = classification_problem()
  return run_rounds(algorithms.build(base, small_config(), models.classification_loss(model)),
                    data, params, 2)


@pytest.mark.parametrize("base,attack", [
    ("fedavg", dict(eps=0.0)), ("fedavg", dict(steps=0, rand_init=False)),
    ("fedprox", dict(eps=0.0)), ("fedadam", dict(eps=0.0)),
    pytest.param("fedhyper_g", dict(eps=0.0), marks=pytest.mark.slow)])
def test_zero_radius_is_exactly_the_base_method(base, attack):
  """FAL with rho = 0 (or S = 0 without random start) is the base method, bitwise."""
  if base not in algorithms.REGISTRY:
    pytest.skip(f"{base} is not registered")
  data, model, params = classification_problem()
  loss = models.classification_loss(model)
  plain_state, plain_metrics = plain_run(base)
  config = small_config(adversarial_base=base, fal_weighting="num_examples")
  config.adversarial_training.update(attack)
  method = algorithms.build("fal", config, loss)
  assert method.name == "fal"
  state, metrics_ = run_rounds(method, data, params, 2)
  chex.assert_trees_all_equal(state.params, plain_state.params)
  np.testing.assert_array_equal(metrics_["train_loss"], plain_metrics["train_loss"])


def logistic_clients(sizes, seed):
  """Clients of 4-feature inputs in [0.3, 0.7] with +-1 labels, and a logistic model."""
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.uniform(0.3, 0.7, size=(n, 4)).astype(np.float32)
  y = rng.choice([-1.0, 1.0], size=n).astype(np.float32)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  params = {"w": jnp.asarray([0.5, -0.7, 0.3, 0.9], jnp.float32), "b": jnp.float32(0.1)}
  return x, y, offsets, FederatedData({"x": x, "y": y}, offsets), params


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_fal_round_averages_clients_uniformly_by_default(weighting):
  """One FAL round on a logistic model against numpy: each client runs 2 full-batch steps
  on its l_inf-attacked inputs x - rho y sign(w) (the closed-form attack), and the server
  averages the deltas with w_c = 1/N (the paper's, default) or n_c / n (the option)."""
  sizes, rho, lr = (5, 3, 7, 2, 6), 0.1, 0.5
  n = sum(sizes)
  x, y, offsets, data, params = logistic_clients(sizes, seed=7)
  config = small_config(batch_size=-1, local_epochs=2, client_lr=lr)
  config.adversarial_training.update(dict(eps=rho, step_size=rho, steps=1, rand_init=False,
                                          clip_min=None, clip_max=None))
  if weighting != "uniform":
    config.fal_weighting = weighting
  method = algorithms.build("fal", config, logistic_example_loss)
  assert method.weighting == weighting
  state, _ = run_rounds(method, data, params, 1)
  deltas = []
  for c in range(len(sizes)):
    xc, yc = x[offsets[c]:offsets[c + 1]], y[offsets[c]:offsets[c + 1]]
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for _ in range(2):
      x_adv = xc - rho * yc[:, None] * np.sign(p["w"])
      g = numpy_logistic_grad(p, x_adv, yc, np.ones(len(yc)))
      p = {k: p[k] - lr * g[k] for k in p}
    deltas.append({k: p[k] - np.asarray(params[k], np.float64) for k in p})
  weights = np.ones(len(sizes)) if weighting == "uniform" else np.asarray(sizes, np.float64)
  weights = weights / weights.sum()
  expected = {k: np.asarray(params[k], np.float64) + sum(w * d[k] for w, d in zip(weights, deltas))
              for k in params}
  tree_close(state.params, expected, atol=1e-5)
  other = np.asarray(sizes) / n if weighting == "uniform" else np.full(len(sizes), 1 / len(sizes))
  gap = abs(float(np.sum((weights - other) * np.asarray([d["b"] for d in deltas]))))
  assert gap > 1e-4                                    # the two weightings differ here



def test_eps_warmup_scales_the_radius_by_the_closed_form_each_round():
  """3 FAL rounds with eps_warmup_rounds=2 against numpy: in round t every client attacks
  with eps_t = rho min(1, (t + 1) / 2) (closed-form l_inf attack x - eps_t y sign(w))."""
  sizes, rho, lr, warmup = (4, 3, 5), 0.2, 0.5, 2
  x, y, offsets, data, params = logistic_clients(sizes, seed=3)
  config = small_config(batch_size=-1, local_epochs=1, client_lr=lr)
  config.adversarial_training.update(dict(eps=rho, step_size=rho, steps=1, rand_init=False,
                                          clip_min=None, clip_max=None,
                                          eps_warmup_rounds=warmup))
  method = algorithms.build("fal", config, logistic_example_loss)
  state, _ = run_rounds(method, data, params, 3)

  def numpy_rounds(eps_at):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for t in range(3):
      deltas = []
      for c in range(len(sizes)):
        xc, yc = x[offsets[c]:offsets[c + 1]], y[offsets[c]:offsets[c + 1]]
        x_adv = xc - eps_at(t) * yc[:, None] * np.sign(p["w"])
        g = numpy_logistic_grad(p, x_adv, yc, np.ones(len(yc)))
        deltas.append({k: -lr * g[k] for k in p})
      p = {k: p[k] + np.mean([d[k] for d in deltas], axis=0) for k in p}   # uniform w_c
    return p

  expected = numpy_rounds(lambda t: rho * min(1.0, (t + 1) / warmup))
  tree_close(state.params, expected, atol=1e-5)
  constant = numpy_rounds(lambda t: rho)            # the warm-up changes the run
  assert abs(constant["b"] - expected["b"]) > 1e-4
  config.adversarial_training.eps_warmup_rounds = -1
  with pytest.raises(ValueError, match="eps_warmup_rounds must be an int >= 0"):
    algorithms.build("fal", config, logistic_example_loss)



def test_fal_mnist_config_ramps_the_radius_over_its_first_ten_rounds():
  from launch.configs import fal_mnist
  config = fal_mnist.get_config()
  method = algorithms.build("fal", config, logistic_example_loss)
  scales = [float(method.init_oracle_state({"round": jnp.int32(t)}, None)) for t in range(12)]
  np.testing.assert_allclose(scales, [min(1.0, (t + 1) / 10) for t in range(12)], rtol=1e-6)
  config.adversarial_training.eps_warmup_rounds = 0     # the paper's constant radius
  assert algorithms.build("fal", config, logistic_example_loss).init_oracle_state is None

def test_fal_vmap_and_sharded_backends_agree():
  assert jax.device_count() == 8, "conftest.py forces 8 CPU devices"
  data, model, params = classification_problem(sizes=(5, 3, 7, 2, 6, 4, 1, 5, 3, 2), seed=5)
  method = algorithms.build("fal", small_config(), models.classification_loss(model))
  results = {b: run_rounds(method, data, params, 2, cohort=5, backend=b)
             for b in ("vmap", "sharded")}
  (vmap_state, vmap_metrics), (sharded_state, sharded_metrics) = results.values()
  chex.assert_trees_all_close(sharded_state.params, vmap_state.params, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(sharded_metrics["train_loss"], vmap_metrics["train_loss"], rtol=1e-5)


def test_fat_registry_entry_uses_the_mix_ratio_of_the_config():
  rho = 0.1
  config = small_config(mix_ratio=0.25)
  config.adversarial_training.update(dict(eps=rho, step_size=rho, steps=1, rand_init=False,
                            clip_min=None, clip_max=None))
  method = algorithms.build("fat", config, logistic_example_loss)
  assert method.name == "fat"
  params, x, y = logistic_problem(batch=5)
  mask = jnp.ones(5, bool)
  grads, _, _ = method.oracle.update(params, {"x": x, "y": y, "mask": mask},
                                     jax.random.PRNGKey(0), ())
  x_star = np.asarray(x) - rho * np.asarray(y)[:, None] * np.sign(np.asarray(params["w"]))
  clean = numpy_logistic_grad(params, x, y, mask)
  adv = numpy_logistic_grad(params, x_star, y, mask)
  tree_close(grads, {k: 0.75 * clean[k] + 0.25 * adv[k] for k in clean}, atol=1e-6)


def test_feddynat_local_steps_follow_the_closed_form():
  k0, decay, k_min = 12, 0.8, 3
  steps_at = fal_lib.decaying_steps(k0, decay, k_min)
  for t in range(40):
    assert int(steps_at(jnp.int32(t))) == max(k_min, int(np.floor(k0 * decay ** t))), t
  # In a run: every one of the C non-empty clients takes exactly K_t steps in round t.
  data, model, params = classification_problem()
  config = small_config(feddynat=dict(initial_steps=k0, decay=decay, min_steps=k_min))
  method = algorithms.build("feddynat", config, models.classification_loss(model))
  assert method.schedule.steps == k0 and method.name == "feddynat"
  _, metrics_ = run_rounds(method, data, params, 8, cohort=3)
  expected = [3 * max(k_min, int(np.floor(k0 * decay ** t))) for t in range(8)]
  np.testing.assert_array_equal(metrics_["local_steps"], expected)


# ---- robust evaluation -----------------------------------------------------------------------

def linear_softmax(dim=6, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  params = {"W": rng.normal(size=(dim, classes)).astype(np.float32),
            "b": rng.normal(size=classes).astype(np.float32) * 0.1}
  model = models.Model(init=None, apply=lambda p, x: x @ p["W"] + p["b"])
  return model, params


def numpy_attack(params, x, y, eps, step, steps):
  """l_inf PGD (no random start) on softmax(x W + b), in float64: grad_x = (p - onehot) W^T."""
  w, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
  onehot = np.eye(w.shape[1])[y]
  x0, xa = np.asarray(x, np.float64), np.asarray(x, np.float64)
  for _ in range(steps):
    logits = xa @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    xa = xa + step * np.sign((p - onehot) @ w.T)
    xa = np.clip(x0 + np.clip(xa - x0, -eps, eps), 0.0, 1.0)
  return xa


def test_robust_evaluation_matches_numpy_on_a_linear_model():
  model, params = linear_softmax()
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(37, 6)).astype(np.float32)
  y = np.argmax(x @ params["W"] + params["b"] + rng.normal(size=(37, 4)) * 0.5, 1).astype(np.int32)
  eps = 0.1
  attack_set = metrics.robust_attacks(eps, pgd_steps=5, pgd_step_size=eps / 4, rand_init=False)
  assert list(attack_set) == ["fgsm", "pgd5"]
  result = metrics.make_robust_evaluator(model, attack_set, batch_size=16)(
      params, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
  w, b = params["W"].astype(np.float64), params["b"].astype(np.float64)
  acc = lambda z: np.mean(np.argmax(z @ w + b, 1) == y)
  fgsm_acc = acc(numpy_attack(params, x, y, eps, eps, 1))
  pgd_acc = acc(numpy_attack(params, x, y, eps, eps / 4, 5))
  np.testing.assert_allclose(result["accuracy"], acc(x), atol=1e-6)
  np.testing.assert_allclose(result["fgsm_accuracy"], fgsm_acc, atol=1e-6)
  np.testing.assert_allclose(result["pgd5_accuracy"], pgd_acc, atol=1e-6)
  np.testing.assert_allclose(result["robust_accuracy"], pgd_acc, atol=1e-6)
  clean = metrics.make_evaluator(model, batch_size=16)(params, {"x": x, "y": y})
  np.testing.assert_allclose(result["loss"], clean["loss"], rtol=1e-6)
  assert pgd_acc < acc(x) - 0.1                        # the attack matters at this eps


def test_robust_evaluation_with_random_start_is_repeatable():
  model, params = linear_softmax(seed=2)
  rng = np.random.default_rng(3)
  arrays = {"x": jnp.asarray(rng.uniform(size=(40, 6)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 4, size=40), jnp.int32)}
  evaluate = metrics.make_robust_evaluator(model, metrics.robust_attacks(0.2), batch_size=16)
  a, b = evaluate(params, arrays), evaluate(params, arrays)
  assert float(a["pgd20_accuracy"]) == float(b["pgd20_accuracy"])
  assert float(a["pgd20_accuracy"]) <= float(a["fgsm_accuracy"]) <= float(a["accuracy"])
  with pytest.raises(ValueError, match="robust='pgd7' is not one of the attacks: fgsm, pgd20"):
    metrics.make_robust_evaluator(model, metrics.robust_attacks(0.2), robust="pgd7")


# ---- launch ----------------------------------------------------------------------------------

def test_launch_fal_digits_reports_robust_accuracy(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=launch/configs/fal_digits.py",
       "--config.rounds=2", "--config.eval_every=1", "--config.rounds_per_call=1",
       "--config.local_epochs=1", "--config.shuffle=false", f"--workdir={tmp_path}",
       "--progress=false"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["algorithm"] == "fal" and summary["rounds"] == 2
  for key in ("robust_accuracy", "fgsm_accuracy", "pgd20_accuracy", "test_accuracy"):
    assert 0.0 <= summary[key] <= 1.0, (key, summary)
  assert summary["robust_accuracy"] == summary["pgd20_accuracy"] <= summary["test_accuracy"]
  assert summary["robust_eps"] == 0.2
  history = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["round"] for r in history] == [1, 2]
  assert all("test_robust_accuracy" in r and "test_fgsm_accuracy" in r for r in history)
  assert history[-1]["test_robust_accuracy"] == summary["robust_accuracy"]


def test_fedavg_baseline_on_the_fal_config_has_the_same_data_model_and_evaluation():
  from launch import common
  from launch.configs import fal_digits
  config = fal_digits.get_config()
  fal_exp = common.build(config)
  config.algorithm = "fedavg"
  fedavg_exp = common.build(config)
  assert fal_exp.algorithm.name == "fal" and fedavg_exp.algorithm.name == "fedavg"
  np.testing.assert_array_equal(fal_exp.train_data.arrays["x"], fedavg_exp.train_data.arrays["x"])
  np.testing.assert_array_equal(fal_exp.train_data.client_offsets,
                                fedavg_exp.train_data.client_offsets)
  np.testing.assert_array_equal(fal_exp.test_arrays["y"], fedavg_exp.test_arrays["y"])
  chex.assert_trees_all_equal(fal_exp.init_params, fedavg_exp.init_params)
  # The same robust evaluation: PGD-20 with step eps/8 and FGSM at eps = 0.2.
  assert fal_exp.attacks == fedavg_exp.attacks == {
      "fgsm": attacks.PGD(0.2, 0.2, 1, "linf", False, 0.0, 1.0),
      "pgd20": attacks.PGD(0.2, 0.025, 20, "linf", True, 0.0, 1.0)}
  result = fedavg_exp.evaluate(fedavg_exp.init_params,
                               {k: v[:16] for k, v in fedavg_exp.test_arrays.items()})
  assert set(result) == {"accuracy", "loss", "fgsm_accuracy", "pgd20_accuracy", "robust_accuracy"}


@pytest.mark.slow
def test_fal_is_more_robust_than_fedavg_on_digits():
  """The config's claim: PGD-20 accuracy at eps 0.2, FAL over FedAvg by >= 20 points."""
  from launch import common
  from launch.configs import fal_digits
  results = {}
  for name in ("fedavg", "fal"):
    config = fal_digits.get_config()
    config.algorithm = name
    results[name] = common.run(config, progress=False)[2]
    assert results[name]["algorithm"] == name and results[name]["rounds"] == config.rounds
  assert results["fal"]["robust_accuracy"] >= results["fedavg"]["robust_accuracy"] + 0.20, results
  assert results["fal"]["test_accuracy"] >= 0.85, results


@pytest.mark.slow
def test_fal_converges_on_very_non_iid_digits():
  """Dirichlet(0.1) label skew: FAL still trains to a useful, robust model."""
  from launch import common
  from launch.configs import fal_digits
  config = fal_digits.get_config()
  config.partition, config.alpha = "dirichlet", 0.1
  summary = common.run(config, progress=False)[2]
  assert summary["test_accuracy"] >= 0.80 and summary["robust_accuracy"] >= 0.25, summary
