"""Continuous hyper-parameters as JAX arrays: inject_hyperparams, jit, vmap over runs, grad.

Each test compares numbers: a factory given a traced array against the same factory
given the Python number.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from algorithms import fal as fal_lib
from algorithms import fedexp, fedhyper
from algorithms.fedavg import fedavg
from algorithms.fedavg_decay import fedavg_decay
from algorithms.fedavgm import fedavgm
from algorithms.fedopt import server_optimizer
from algorithms.scaffold import scaffold
from fedjax_lab import aggregate, attacks, byzantine, hyperparams, oracles, privacy
from fedjax_lab.algorithm import make_multi_round, make_round
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import proximal
from reference import linear_example_loss, linear_problem

TOL = 1e-6


def close(a, b, atol=TOL, rtol=TOL):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       atol=atol, rtol=rtol), a, b)


# ------------------------------------------------------------------ the helper

def test_is_concrete_takes_numbers_and_numpy_scalars_not_arrays():
  for value in (1, 0.5, True, np.float32(0.5), np.int64(3), np.array(0.5)):
    assert hyperparams.is_concrete(value), value
  for value in (None, jnp.asarray(0.5), np.ones(2), "0.5"):
    assert not hyperparams.is_concrete(value), value
  jax.jit(lambda x: (assert_not_concrete(x), x)[1])(0.5)
  assert hyperparams.static_value(0.25) == 0.25
  assert hyperparams.static_value(jnp.asarray(0.25)) is None


def assert_not_concrete(x):
  assert not hyperparams.is_concrete(x)


def test_validation_fires_for_bad_numbers():
  with pytest.raises(ValueError, match="max_norm > 0"):
    aggregate.norm_bounded_mean(0.0)
  with pytest.raises(ValueError, match="max_norm > 0"):
    aggregate.norm_bounded_mean(np.float32(-1.0))
  with pytest.raises(ValueError, match="0 <= beta < 0.5"):
    aggregate.trimmed_mean(np.float64(0.6))
  with pytest.raises(ValueError, match="clip_lo must be > -1"):
    fedhyper.fedhyper_global(clip_lo=-1.0)
  with pytest.raises(ValueError, match="Need clip_lo < clip_hi"):
    fedhyper.fedhyper_global(clip_lo=1.0, clip_hi=0.5)
  with pytest.raises(ValueError, match="Attack eps must be >= 0"):
    attacks.pgd(-0.1)
  with pytest.raises(ValueError, match="dp noise_multiplier must be >= 0"):
    privacy.dp_fedavg_aggregator(1.0, -1.0, 5)
  with pytest.raises(ValueError, match="mix_ratio must be in"):
    oracles.adversarial(linear_example_loss, attacks.fgsm(0.1), np.float32(1.5))
  with pytest.raises(ValueError, match="FedDynAT decay"):
    fal_lib.decaying_steps(5, 1.5)
  # Static choices stay checked as before.
  with pytest.raises(ValueError, match="num_selected >= 1"):
    aggregate.multi_krum(num_selected=0)


def test_validation_does_not_fire_for_tracers():
  """Values that would be rejected as numbers pass as tracers (no bool of a tracer)."""
  def build(v):
    aggregate.norm_bounded_mean(v)
    aggregate.trimmed_mean(v + 1.0)
    aggregate.multi_krum(byzantine_fraction=v)
    fedhyper.fedhyper_global(clip_lo=v - 2.0, clip_hi=v - 3.0, hyper_lr=v, momentum=v + 1.0)
    fedhyper.fedhyper_server_local(v, min_lr=v, max_lr=v - 1.0, hyper_lr=v)
    fedhyper.fedhyper_client(v, 4, max_growth=v, min_scale=v, max_scale=v, hyper_lr=v)
    fedhyper.paper_bounds(v + 0.5)
    attacks.PGD(eps=v, step_size=v, steps=2, clip_min=v + 1.0, clip_max=v)
    oracles.adversarial(linear_example_loss, attacks.fgsm(0.1), v + 2.0)
    privacy.dp_fedavg_aggregator(v, v, v, adaptive=privacy.AdaptiveClip(v + 2.0, v, v))
    fal_lib.decaying_steps(5, v + 2.0)
    return v

  jax.make_jaxpr(build)(-0.5)


# ------------------------------------------- optax transforms under inject_hyperparams

PARAMS = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.25)}


def grads_seq(count, seed=0):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.normal(size=3), jnp.float32),
           "b": jnp.asarray(rng.normal(), jnp.float32)} for _ in range(count)]


def run_updates(tx, grads, extras=None):
  """Updates and final state of ``tx`` over ``grads`` (one params), jitted."""
  extras = extras or [{}] * len(grads)

  @jax.jit
  def go(grads, extras):
    state = tx.init(PARAMS)
    outs = []
    for g, e in zip(grads, extras):
      out, state = tx.update(g, state, PARAMS, **e)
      outs.append(out)
    return outs, state

  return go(grads, extras)


def injected_vs_plain(factory, hps, static=None, extras=None, steps=4, static_args=()):
  """``inject_hyperparams(factory)`` with ``hps`` traced (jit arguments) vs ``factory(**hps)``.

  Returns (plain updates, injected updates, plain final state, injected inner state).
  """
  static = static or {}
  grads = grads_seq(steps)
  extras = extras or [{}] * steps
  plain_outs, plain_state = run_updates(factory(**hps, **static), grads, extras)

  @jax.jit
  def go(hp_values, grads, extras):
    for v in jax.tree.leaves(hp_values):
      assert not hyperparams.is_concrete(v)
    tx = optax.inject_hyperparams(factory, static_args=static_args)(**hp_values, **static)
    state = tx.init(PARAMS)
    outs = []
    for g, e in zip(grads, extras):
      out, state = tx.update(g, state, PARAMS, **e)
      outs.append(out)
    return outs, state

  hp_arrays = {k: jnp.asarray(v, jnp.float32) for k, v in hps.items()}
  inj_outs, inj_state = go(hp_arrays, grads, extras)
  return plain_outs, inj_outs, plain_state, inj_state.inner_state


def test_fedexp_rule_injected_eps():
  extras = [{"aggregate": {"sq_norm": jnp.asarray(v, jnp.float32)}} for v in (9.0, 0.1, 30.0)]
  plain, injected, _, _ = injected_vs_plain(fedexp.scale_by_fedexp, {"eps": 0.5}, extras=extras,
                                            steps=3)
  close(injected, plain)
  # The number: g max(1, mean_sq_norm / (2 (||g||^2 + eps))).
  g = grads_seq(1)[0]
  sq = sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(g))
  close(plain[0], jax.tree.map(lambda x: max(1.0, 9.0 / (2 * (sq + 0.5))) * x, g))


def test_proximal_injected_mu():
  global_params = {"w": jnp.array([0.0, 1.0, 1.5]), "b": jnp.array(-0.5)}
  extras = [{"global_params": global_params}] * 3
  plain, injected, _, _ = injected_vs_plain(proximal, {"mu": 0.3}, extras=extras, steps=3)
  close(injected, plain)
  # The number is mu: g + 0.3 (w - w_t).
  g = grads_seq(1)[0]
  close(plain[0], jax.tree.map(lambda g, w, w0: g + 0.3 * (w - w0), g, PARAMS, global_params))


@pytest.mark.parametrize("momentum,normalize", [(0.0, False), (0.9, False), (0.5, True)])
def test_fedhyper_global_injected(momentum, normalize):
  hps = {"clip_lo": -0.5, "clip_hi": 0.3, "hyper_lr": 0.7, "momentum": momentum}
  plain, injected, plain_state, inner = injected_vs_plain(
      fedhyper.fedhyper_global, hps, static={"normalize": normalize}, steps=5)
  close(injected, plain)
  close(inner.accumulator, plain_state.accumulator)
  # The clip at 0.3 binds somewhere in the run or the rate moved: A is not trivially 0.
  assert abs(float(plain_state.accumulator)) > 1e-3


def test_fedhyper_global_momentum_injected():
  hps = {"momentum": 0.8, "clip_lo": -0.2, "clip_hi": 4.0, "hyper_lr": 0.5}
  plain, injected, _, _ = injected_vs_plain(fedhyper.fedhyper_global_momentum, hps, steps=4)
  close(injected, plain)


def test_fedhyper_server_local_injected():
  hps = {"initial_lr": 0.05, "min_lr": 1e-3, "max_lr": 0.2, "hyper_lr": 0.3,
         "clip_lo": -0.5, "clip_hi": 2.0}
  plain, injected, plain_state, inner = injected_vs_plain(
      fedhyper.fedhyper_server_local, hps, steps=4)
  close(injected, plain)
  close(inner.local_lr, plain_state.local_lr)
  assert abs(float(plain_state.local_lr) - 0.05) > 1e-4   # the rate moved
  # Without the optional accumulator clip (None stays a static choice).
  hps = {k: v for k, v in hps.items() if not k.startswith("clip")}
  plain, injected, plain_state, inner = injected_vs_plain(
      fedhyper.fedhyper_server_local, hps, steps=4)
  close(injected, plain)
  close(inner.local_lr, plain_state.local_lr)


def test_scale_by_local_lr_injected():
  plain, injected, _, _ = injected_vs_plain(fedhyper.scale_by_local_lr, {"default_lr": 0.3},
                                            steps=2)
  close(injected, plain)
  close(plain[0], jax.tree.map(lambda g: -0.3 * g, grads_seq(1)[0]))
  extras = [{"local_lr": jnp.float32(0.07)}] * 2
  plain, injected, _, _ = injected_vs_plain(fedhyper.scale_by_local_lr, {"default_lr": 0.3},
                                            extras=extras, steps=2)
  close(injected, plain)
  close(plain[0], jax.tree.map(lambda g: -0.07 * g, grads_seq(1)[0]))


@pytest.mark.parametrize("hypergradient", ["step", "direction", "cosine"])
def test_fedhyper_client_injected(hypergradient):
  global_update = {"w": jnp.array([0.1, -0.2, 0.05]), "b": jnp.array(0.02)}
  hps = {"learning_rate": 0.4, "max_growth": 1.2, "min_scale": 0.5, "max_scale": 3.0,
         "hyper_lr": 0.8}
  static = {"clients_per_round": 4, "hypergradient": hypergradient}
  extras = [{"global_update": global_update}] * 5
  plain, injected, plain_state, inner = injected_vs_plain(
      fedhyper.fedhyper_client, hps, static=static, extras=extras, steps=5,
      static_args=("clients_per_round",))
  close(injected, plain)
  close(inner.scale, plain_state.scale)
  # The global weight too (0.1 / m when not given).
  hps["global_weight"] = 0.3
  plain, injected, _, _ = injected_vs_plain(
      fedhyper.fedhyper_client, hps, static={"hypergradient": hypergradient}, extras=extras,
      steps=5)
  close(injected, plain)


@pytest.mark.parametrize("convention", ["reddi", "optax"])
@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_fedopt_server_optimizer_injected(kind, convention):
  hps = {"lr": 0.05, "b1": 0.8, "b2": 0.95, "tau": 1e-2}
  plain, injected, _, _ = injected_vs_plain(server_optimizer, hps,
                                            static={"kind": kind, "convention": convention},
                                            steps=3)
  close(injected, plain)


# ------------------------------------- factories that are not optax transforms: jit(array)

def quadratic_input_loss(x):
  """Per-example loss of inputs ``x [B, 2]``, smooth and not separable."""
  return jnp.sum((x - 0.3) ** 2, axis=1) + x[:, 0] * x[:, 1]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_attack_with_array_eps_step_and_range(norm):
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 2)), jnp.float32)
  rng = jax.random.PRNGKey(3)

  def attack(eps, step, lo, hi):
    return attacks.PGD(eps=eps, step_size=step, steps=3, norm=norm, clip_min=lo,
                       clip_max=hi)(quadratic_input_loss, x, rng)

  expected = attack(0.2, 0.07, 0.05, 0.9)
  traced = jax.jit(attack)(*map(jnp.asarray, (0.2, 0.07, 0.05, 0.9)))
  close(traced, expected)
  assert float(jnp.max(jnp.abs(expected - x))) > 1e-3   # it moved
  # pgd()'s default step 2.5 eps / steps and fgsm's step eps, from an array eps.
  close(jax.jit(lambda e: attacks.pgd(e, steps=2, norm=norm)(quadratic_input_loss, x, rng))(
      jnp.asarray(0.1)), attacks.pgd(0.1, steps=2, norm=norm)(quadratic_input_loss, x, rng))
  close(jax.jit(lambda e: attacks.fgsm(e, norm=norm)(quadratic_input_loss, x, rng))(
      jnp.asarray(0.1)), attacks.fgsm(0.1, norm=norm)(quadratic_input_loss, x, rng))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_adversarial_oracle_with_array_mix_ratio_and_eps(ratio):
  data, params = linear_problem((6,))
  batch = {**data.client(0), "mask": np.ones(6, bool)}
  batch = jax.tree.map(jnp.asarray, batch)
  params = jax.tree.map(jnp.asarray, params)
  rng = jax.random.PRNGKey(0)

  def grads(r, eps):
    attack = attacks.pgd(eps, steps=2, clip_min=None, clip_max=None)
    oracle = oracles.adversarial(linear_example_loss, attack, r)
    g, aux, _ = oracle.update(params, batch, rng, oracle.init(params))
    return g, aux["loss"]

  expected = grads(ratio, 0.3)
  traced = jax.jit(grads)(jnp.asarray(ratio), jnp.asarray(0.3))
  close(traced, expected, atol=1e-5, rtol=1e-5)
  clean = oracles.first_order(linear_example_loss).update(params, batch, rng, ())
  if ratio == 0.0:
    close(expected[1], clean[1]["loss"])
  else:
    assert float(expected[1]) > float(clean[1]["loss"]) + 1e-3   # the attack raised the loss


def stacked(count=6, seed=0):
  rng = np.random.default_rng(seed)
  messages = {"a": jnp.asarray(rng.normal(size=(count, 3, 2)), jnp.float32),
              "b": jnp.asarray(3 * rng.normal(size=(count,)), jnp.float32)}
  weights = jnp.asarray([1.0, 2.0, 0.0, 4.0, 1.0, 3.0][:count])
  return messages, weights


@pytest.mark.parametrize("make,value", [
    (lambda v: aggregate.trimmed_mean(v, weighted=True), 0.2),
    (lambda v: aggregate.trimmed_mean(v), 0.25),
    (lambda v: aggregate.norm_bounded_mean(v), 1.5),
    (lambda v: aggregate.multi_krum(byzantine_fraction=v), 0.3),
    (lambda v: aggregate.geometric_median(iterations=5, nu=v), 0.5),
])
def test_aggregators_with_array_hyperparameters(make, value):
  messages, weights = stacked()

  def run(v):
    agg = make(v)
    return agg.update(messages, weights, agg.init(), None)[0]

  close(jax.jit(run)(jnp.asarray(value)), run(value))


def test_norm_bounded_mean_streams_with_an_array_bound():
  messages, weights = stacked()

  def run(v):
    stream = aggregate.norm_bounded_mean(v).stream
    acc = stream.zero(aggregate.message_shapes(messages))
    acc = stream.add(acc, jax.tree.map(lambda m: m[:3], messages), weights[:3], ())
    acc = stream.add(acc, jax.tree.map(lambda m: m[3:], messages), weights[3:], ())
    return stream.finish(acc, (), None)[0]

  close(jax.jit(run)(jnp.asarray(1.5)), aggregate.norm_bounded_mean(1.5).update(
      messages, weights, (), None)[0])


@pytest.mark.parametrize("adaptive", [
    None,
    privacy.AdaptiveClip(0.6, 0.3, None),   # count noise m / 20, from a traced m
    privacy.AdaptiveClip(0.6, 0.3, 0.0),    # no count noise: z is the update's multiplier
    privacy.AdaptiveClip(0.4, 0.2, 1.5),
])
def test_dp_aggregator_with_array_clip_noise_and_adaptive_settings(adaptive):
  messages, weights = stacked()

  def run(clip, z, m, adaptive):
    agg = privacy.dp_fedavg_aggregator(clip, z, m, seed=4, adaptive=adaptive)
    state = agg.init()
    out1, state = agg.update(messages, weights, state, None)
    out2, state = agg.update(messages, weights, state, None)
    return out1, out2, state.clip

  expected = run(1.2, 0.3, 5.0, adaptive)
  arrays = jax.tree.map(jnp.asarray, (1.2, 0.3, 5.0))
  traced = jax.jit(run)(*arrays, None if adaptive is None else jax.tree.map(jnp.asarray, adaptive))
  close(traced, expected, atol=1e-5, rtol=1e-5)
  if adaptive is not None:
    assert abs(float(expected[2]) - 1.2) > 1e-3   # the clip adapted


def test_update_noise_multiplier_of_arrays_equals_the_float():
  z = privacy.update_noise_multiplier(1.0, 2.0)
  assert isinstance(z, float)
  close(jax.jit(privacy.update_noise_multiplier)(jnp.asarray(1.0), jnp.asarray(2.0)), z)
  close(jax.jit(privacy.update_noise_multiplier)(jnp.asarray(0.0), jnp.asarray(2.0)), 0.0)


@pytest.mark.parametrize("kind", ["sign_flip", "scale", "gaussian", "free_rider_noise"])
def test_update_attacks_with_an_array_scale(kind):
  messages, _ = stacked(1)
  message = jax.tree.map(lambda m: m[0], messages)
  key = jax.random.PRNGKey(7)
  fn = lambda s: byzantine.attacked_message(kind, message, key, s)
  close(jax.jit(fn)(jnp.asarray(2.5)), fn(2.5))


def test_alie_aggregator_with_an_array_z():
  messages, weights = stacked()
  messages = {**messages, byzantine.MALICIOUS_KEY: jnp.asarray([1, 0, 0, 1, 0, 0], bool)}
  run = lambda z: byzantine.alie_aggregator(aggregate.weighted_mean(), z).update(
      messages, weights, (), None)[0]
  close(jax.jit(run)(jnp.asarray(1.3)), run(1.3))


def test_decaying_steps_and_paper_bounds_with_array_values():
  steps_at = lambda d, t: fal_lib.decaying_steps(12, d, 3)(t)
  for t in range(8):
    expected = max(3, int(np.floor(12 * 0.8 ** t)))
    assert int(steps_at(0.8, jnp.int32(t))) == expected
    assert int(jax.jit(steps_at)(jnp.asarray(0.8), jnp.int32(t))) == expected
  close(jax.jit(fedhyper.paper_bounds)(jnp.asarray(3.0)), fedhyper.paper_bounds(3.0))


# ----------------------------------------------- whole runs: vmap and grad over a rate

SIZES = (5, 3, 7, 4)
SCHEDULE = LocalSchedule(batch_size=2, epochs=2, shuffle=True)
ROUNDS = 3


def run_params(make_method, clients_per_round, value):
  """Params after ROUNDS rounds (one jitted scan) of ``make_method(value)``."""
  data, params = linear_problem(SIZES, seed=2)
  method = make_method(value)
  round_fn = make_round(method, data, clients_per_round, "vmap")
  state = method.init(jax.tree.map(jnp.asarray, params), jax.random.PRNGKey(0), data.num_clients)
  arrays, offsets = data.device_arrays()
  state, metrics = make_multi_round(round_fn, "vmap")(state, arrays, offsets, ROUNDS)
  return state.params, metrics["train_loss"]


METHODS = {
    "fedavg_client_lr": (lambda lr: fedavg(linear_example_loss, client_lr=lr, server_lr=0.8,
                                           schedule=SCHEDULE), 4),
    "fedavg_server_lr": (lambda lr: fedavg(linear_example_loss, client_lr=0.1, server_lr=lr,
                                           schedule=SCHEDULE), 4),
    "scaffold_client_lr": (lambda lr: scaffold(linear_example_loss, client_lr=lr,
                                               server_lr=0.9, schedule=SCHEDULE), 2),
    "fedavgm_momentum": (lambda m: fedavgm(linear_example_loss, 0.1, 0.5, momentum=m,
                                           schedule=SCHEDULE), 4),
    "fedavg_decay_rate": (lambda r: fedavg_decay(linear_example_loss, 0.1, 0.9, rate=1.0 - r,
                                                 schedule=SCHEDULE), 4),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_vmap_of_a_run_over_a_rate_equals_separate_runs(name):
  make_method, cohort = METHODS[name]
  rates = [0.05, 0.1, 0.2]
  run = functools.partial(run_params, make_method, cohort)
  batched_params, batched_loss = jax.vmap(run)(jnp.asarray(rates))
  for i, lr in enumerate(rates):
    params, loss = run(lr)
    close(jax.tree.map(lambda x: x[i], batched_params), params, atol=1e-5, rtol=1e-5)
    close(batched_loss[i], loss, atol=1e-5, rtol=1e-5)
  # The rates lead to different models.
  assert float(jnp.abs(batched_params["b"][0] - batched_params["b"][2])) > 1e-3


def test_grad_of_the_final_loss_wrt_client_lr_matches_finite_differences():
  data, _ = linear_problem(SIZES, seed=2)
  x, y = jnp.asarray(data.arrays["x"]), jnp.asarray(data.arrays["y"])
  make_method, cohort = METHODS["fedavg_client_lr"]

  def final_loss(lr):
    params, _ = run_params(make_method, cohort, lr)
    return jnp.mean(linear_example_loss(params, {"x": x, "y": y}, None))

  lr, h = 0.1, 1e-3
  grad = float(jax.grad(final_loss)(lr))
  finite = float((final_loss(lr + h) - final_loss(lr - h)) / (2 * h))
  assert abs(grad) > 1e-2
  np.testing.assert_allclose(grad, finite, rtol=1e-3)
