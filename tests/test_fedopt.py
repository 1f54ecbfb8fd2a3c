"""FedAdam / FedYogi / FedAdagrad: Algorithm 2 of Reddi et al. (default) and optax's
conventions, against float64 numpy and optax applied by hand."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from algorithms import fedhyper
from algorithms import fedopt as fedopt_lib
from algorithms.fedopt import fedopt, reddi_server, scale_by_reddi, server_optimizer
from fedjax_lab import hyperparams
from fedjax_lab.client import LocalSchedule
from launch.configs import fedavg_digits
from reference import (linear_example_loss, linear_problem, local_sgd, reddi_init, reddi_step,
                       run_rounds, to_numpy, tree_close)

SIZES = (5, 3, 7)
NO_SHUFFLE = LocalSchedule(batch_size=2, epochs=2, shuffle=False)
CLIENT_LR, SERVER_LR, ROUNDS = 0.1, 0.05, 5
KINDS = ("adam", "yogi", "adagrad")
PAPER = {"b1": 0.9, "b2": 0.99, "tau": 1e-3}


def mean_delta(data, x):
  """sum_i (n_i / n) (local SGD from x on client i - x), in float64."""
  x = to_numpy(x)
  weights = np.asarray(SIZES, np.float64) / np.sum(SIZES)
  out = {k: np.zeros_like(v) for k, v in x.items()}
  for i, w in enumerate(weights):
    c = data.client(i)
    y, _ = local_sgd(x, c["x"], c["y"], CLIENT_LR, 2, 2)
    for k in x:
      out[k] = out[k] + w * (y[k] - x[k])
  return out


def engine_params(kind, rounds=ROUNDS, **kwargs):
  data, params = linear_problem(SIZES)
  method = fedopt(linear_example_loss, kind, client_lr=CLIENT_LR, server_lr=SERVER_LR,
                  schedule=NO_SHUFFLE, **kwargs)
  return [s.params for s in run_rounds(method, data, params, rounds)]


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
             for k in a)


# ------------------------------------------------------------- Algorithm 2 (the default)

@pytest.mark.parametrize("hps", [PAPER, {"b1": 0.5, "b2": 0.9, "tau": 1e-2}],
                         ids=["paper", "other"])
@pytest.mark.parametrize("kind", KINDS)
def test_default_is_algorithm_2_for_five_rounds(kind, hps):
  data, params = linear_problem(SIZES)
  trajectory = engine_params(kind, **hps)
  x = to_numpy(params)
  m, v = reddi_init(params, hps["tau"])
  for t in range(ROUNDS):
    x, m, v = reddi_step(kind, x, m, v, mean_delta(data, x), SERVER_LR, **hps)
    tree_close(trajectory[t + 1], x, atol=1e-5)
  assert max_abs_diff(trajectory[-1], to_numpy(params)) > 1e-2   # the server moved


@pytest.mark.parametrize("kind", KINDS)
def test_transform_state_holds_the_paper_moments(kind):
  # On the pseudo-gradient g = -Delta the state keeps m^g = -m_t and v_t, starting at
  # (0, tau^2); initial_v=0 is Flower's start.
  rng = np.random.default_rng(3)
  deltas = [{"w": rng.normal(size=(3,)), "b": rng.normal(size=())} for _ in range(4)]
  for initial_v in (None, 0.0):
    tx = scale_by_reddi(kind, 0.8, 0.95, 1e-2, initial_v=initial_v)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state = tx.init(params)
    x, m, v = to_numpy(params), *reddi_init(params, 1e-2, initial_v)
    tree_close(state.nu, v, atol=1e-10)
    for d in deltas:
      g = {k: jnp.asarray(-val, jnp.float32) for k, val in d.items()}
      out, state = tx.update(g, state)
      new_x, m, v = reddi_step(kind, x, m, v, d, 1.0, 0.8, 0.95, 1e-2)
      tree_close(out, {k: x[k] - new_x[k] for k in x}, atol=1e-5)   # emitted = -(step)
      x = new_x
      for k in x:   # float32 state against float64: relative
        np.testing.assert_allclose(state.mu[k], -m[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state.nu[k], v[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- optax's conventions

OPTAX = {
    "adam": lambda: optax.adam(SERVER_LR, b1=0.9, b2=0.99, eps=1e-3),
    "yogi": lambda: optax.yogi(SERVER_LR, b1=0.9, b2=0.99, eps=1e-3),
    "adagrad": lambda: optax.adagrad(SERVER_LR, initial_accumulator_value=0.0, eps=1e-3),
}


@pytest.mark.parametrize("kind", KINDS)
def test_optax_convention_is_optax_on_the_pseudo_gradient(kind):
  data, params = linear_problem(SIZES)
  trajectory = engine_params(kind, convention="optax")
  opt = OPTAX[kind]()
  x = jax.tree.map(jnp.asarray, params)
  opt_state = opt.init(x)
  for t in range(ROUNDS):
    delta = mean_delta(data, x)
    pseudo_grad = {k: jnp.asarray(-delta[k], jnp.float32) for k in x}
    updates, opt_state = opt.update(pseudo_grad, opt_state, x)
    x = optax.apply_updates(x, updates)
    tree_close(trajectory[t + 1], x, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_the_two_conventions_differ_measurably(kind):
  reddi = engine_params(kind)[-1]
  optax_ = engine_params(kind, convention="optax")[-1]
  assert max_abs_diff(reddi, optax_) > 1e-3


# ------------------------------------------------------------ traceable hyper-parameters

@pytest.mark.parametrize("kind", KINDS)
def test_array_hyperparameters_under_jit_give_the_same_rounds(kind):
  data, params = linear_problem(SIZES)
  hps = {"server_lr": SERVER_LR, "b1": 0.8, "b2": 0.95, "tau": 1e-2}

  def final(**values):
    method = fedopt(linear_example_loss, kind, client_lr=CLIENT_LR, schedule=NO_SHUFFLE,
                    **values)
    return run_rounds(method, data, params, ROUNDS)[-1].params

  @jax.jit
  def traced(values):
    for value in values.values():
      assert not hyperparams.is_concrete(value)
    return final(**values)

  expected = final(**hps)
  got = traced({k: jnp.asarray(v, jnp.float32) for k, v in hps.items()})
  tree_close(got, expected, atol=1e-6)


@pytest.mark.parametrize("convention", fedopt_lib.CONVENTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_inject_hyperparams_server_tx_matches_python_numbers(kind, convention):
  data, params = linear_problem(SIZES)
  hps = {"lr": SERVER_LR, "b1": 0.8, "b2": 0.95, "tau": 1e-2}
  injected = optax.inject_hyperparams(server_optimizer)(
      kind=kind, convention=convention, **{k: jnp.asarray(v, jnp.float32) for k, v in hps.items()})
  base = fedopt(linear_example_loss, kind, CLIENT_LR, SERVER_LR, NO_SHUFFLE,
                b1=0.8, b2=0.95, tau=1e-2, convention=convention)
  plain = run_rounds(base, data, params, ROUNDS)[-1]
  inj = run_rounds(dataclasses.replace(base, server_tx=injected), data, params, ROUNDS)[-1]
  tree_close(inj.params, plain.params, atol=1e-6)
  assert float(inj.opt_state.hyperparams["lr"]) == pytest.approx(SERVER_LR)


# ----------------------------------------------------------------------- config, checks

def test_config_key_server_convention_selects_the_convention():
  config = fedavg_digits.get_config()
  assert config.server_convention == "reddi"
  data, params = linear_problem(SIZES)
  pseudo_grad = {"w": jnp.asarray([0.3, -0.2, 0.1]), "b": jnp.asarray(0.05)}
  x = jax.tree.map(jnp.asarray, params)

  def step(tx):
    return tx.update(pseudo_grad, tx.init(x), x)[0]

  for convention in fedopt_lib.CONVENTIONS:
    config.server_convention = convention
    for kind in KINDS:
      expected = step(server_optimizer(kind, config.server_lr, 0.9, 0.99, 1e-3, convention))
      built = fedopt_lib.from_config_for(kind)(config, linear_example_loss)
      tree_close(step(built.server_tx), expected, atol=0)
      config.server_optimizer = kind   # FedHyper's server optimizer reads the same key
      tree_close(step(fedhyper.server_optimizer_from_config(config)), expected, atol=0)
  assert max_abs_diff(step(server_optimizer("adam", 0.1)),
                      step(server_optimizer("adam", 0.1, convention="optax"))) > 1e-3


def test_reddi_server_is_the_transform_then_minus_lr():
  g = {"w": jnp.asarray([0.3, -0.2, 0.1]), "b": jnp.asarray(0.05)}
  params = jax.tree.map(jnp.zeros_like, g)
  for kind in KINDS:
    direction = scale_by_reddi(kind).update(g, scale_by_reddi(kind).init(params))[0]
    tx = reddi_server(kind, 0.3)
    tree_close(tx.update(g, tx.init(params))[0], jax.tree.map(lambda d: -0.3 * d, direction),
               atol=1e-7)


def test_bad_hyperparameters_and_names_raise():
  with pytest.raises(ValueError, match="b1 must be in"):
    server_optimizer("adam", 0.1, b1=1.0)
  with pytest.raises(ValueError, match="b2 must be in"):
    server_optimizer("yogi", 0.1, b2=np.float32(-0.1))
  with pytest.raises(ValueError, match="tau must be > 0"):
    server_optimizer("adagrad", 0.1, tau=0.0)
  with pytest.raises(ValueError, match="tau must be > 0"):
    server_optimizer("adam", 0.1, tau=0.0, convention="optax")
  with pytest.raises(ValueError, match="server lr must be > 0"):
    reddi_server("adam", -0.1)
  with pytest.raises(ValueError, match="initial_v must be >= 0"):
    scale_by_reddi("adam", initial_v=-1.0)
  with pytest.raises(ValueError, match="Unknown FedOpt convention 'paper'"):
    server_optimizer("adam", 0.1, convention="paper")
  with pytest.raises(ValueError, match="Unknown server optimizer 'sgd'"):
    scale_by_reddi("sgd")
  # Arrays are not range-checked (they may be traced).
  server_optimizer("adam", jnp.asarray(0.1), b1=jnp.asarray(1.0), tau=jnp.asarray(0.0))
