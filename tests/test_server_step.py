"""The engine-owned server step: server_tx is replaceable on every registered method,
rules compose across methods, and the public aggregate-and-step API."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import algorithms
from algorithms import fedhyper as fh
from algorithms.fal import adversarial_training, fal
from algorithms.fedavg import fedavg
from algorithms.scaffold import global_control, scaffold
from fedjax_lab import attacks, training
from fedjax_lab.algorithm import aggregate_and_step
from fedjax_lab.client import LocalSchedule
from launch import common
from reference import linear_example_loss, linear_problem, run_rounds, to_numpy, tree_close

SIZES = (5, 3, 7)
NO_SHUFFLE = LocalSchedule(batch_size=2, epochs=1, shuffle=False)


def small_example(name):
  """The method's example config, shrunk to seconds."""
  config = algorithms.example_config(name)
  if "stream" in config:
    config.num_tasks, config.num_clients, config.hidden = 2, 6, (8, 8)
  elif "problem" in config:
    config.dim, config.num_clients, config.local_steps = 6, 3, 2
    config.rff_features, config.rff_points, config.rff_candidates = 32, 32, 16
    config.rff_explore, config.buffer_size, config.gp_points = 4, 128, 32
    config.num_directions, config.lengthscale, config.num_candidates = 3, 1.0, 16
  else:
    config.num_clients, config.hidden, config.local_epochs = 8, (8,), 1
    config.local_steps, config.batch_size = 2, 16
    if "robust_eval" in config:
      config.robust_eval = None
    if "adversarial_training" in config:
      config.adversarial_training.steps = 2
      config.feddynat.initial_steps, config.feddynat.min_steps = 3, 1
  config.clients_per_round = min(config.clients_per_round, 3)
  return config


def final_params(method, params, data, clients_per_round, rounds=2):
  opts = training.TrainOptions(rounds=rounds, clients_per_round=clients_per_round,
                               rounds_per_call=rounds, eval_every=0, progress=False)
  return training.train(method, params, data, opts=opts)[0].params


def max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Every entry is frozen by sgd(0) in the default run; that Adam then takes effect is checked
# for every entry in the slow run and for a few representative ones by default (each check
# compiles the method's round once).
ADAM_BY_DEFAULT = {"fedavg", "scaffold", "fal", "fedhyper_g", "fzoos", "fot", "fedkseed"}


def _built(name):
  config = small_example(name)
  method, params, data = common.build_any(config)
  return method, params, data, min(config.clients_per_round, data.num_clients)


def _first_of_each_module():
  """The first registry entry of each algorithm module (a family's entries share its
  server step's code: fedopt's three, fedhyper's six, ...)."""
  first = {}
  for name in sorted(algorithms.REGISTRY):
    first.setdefault(algorithms.REGISTRY[name].build.__module__, name)
  return set(first.values())


# One entry per algorithm module by default (each check compiles the method's round),
# every entry in the slow run.
SGD0_BY_DEFAULT = _first_of_each_module()


def registry_names(by_default):
  """Every registry name; those outside ``by_default`` marked slow."""
  return [name if name in by_default else pytest.param(name, marks=pytest.mark.slow)
          for name in sorted(algorithms.REGISTRY)]


@pytest.mark.parametrize("name", registry_names(SGD0_BY_DEFAULT))
def test_server_tx_is_replaceable_on_every_registered_method(name):
  method, params, data, cohort = _built(name)
  # x + sgd(0)(g) = x exactly, whatever the method's rule does to g.
  frozen = final_params(dataclasses.replace(method, server_tx=optax.sgd(0.0)), params, data,
                        cohort)
  assert max_abs_diff(frozen, params) == 0.0


@pytest.mark.parametrize("name", registry_names(ADAM_BY_DEFAULT))
def test_a_replaced_server_tx_takes_effect(name):
  method, params, data, cohort = _built(name)
  # Adam's first step moves every coordinate with a nonzero pseudo-gradient by about its
  # rate, so a server_tx that took effect shows at that scale.
  adam = final_params(dataclasses.replace(method, server_tx=optax.adam(0.05)), params, data,
                      cohort)
  assert max_abs_diff(adam, params) > 0.01


def test_every_entry_names_a_config_of_its_own_name():
  for name in algorithms.REGISTRY:
    assert algorithms.example_config(name).algorithm == name
  with pytest.raises(ValueError, match="Unknown algorithm 'fedfoo'"):
    algorithms.example_config("fedfoo")


# ---- composition against numpy: a linear model, FGSM (one l_inf PGD step) at every local step

EPS = 0.1


def fgsm_attack():
  return attacks.pgd(EPS, EPS, steps=1, norm="linf", rand_init=False, clip_min=None,
                     clip_max=None)


def local_fgsm_sgd(params, x, y, lr, batch_size, correction=None):
  """One epoch of unshuffled SGD on FGSM examples of 0.5 (x.w + b - y)^2, in numpy."""
  w = dict(params)
  steps = 0
  for lo in range(0, len(y), batch_size):
    xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
    residual = xb @ w["w"] + w["b"] - yb
    xa = xb + EPS * np.sign(residual[:, None] * w["w"][None, :])   # grad_x l = r w
    ra = xa @ w["w"] + w["b"] - yb
    g = {"w": xa.T @ ra / len(yb), "b": np.mean(ra)}
    for k in w:
      w[k] = w[k] - lr * (g[k] + (0.0 if correction is None else correction[k]))
    steps += 1
  return w, steps


def test_fal_attack_on_scaffold_matches_numpy():
  data, params = linear_problem(SIZES)
  lr, server_lr = 0.1, 0.8
  method = adversarial_training(
      scaffold(linear_example_loss, client_lr=lr, server_lr=server_lr, schedule=NO_SHUFFLE),
      linear_example_loss, fgsm_attack())
  states = run_rounds(method, data, params, 2)
  x = to_numpy(params)
  c = {k: np.zeros_like(v) for k, v in x.items()}
  ci = [{k: np.zeros_like(v) for k, v in x.items()} for _ in SIZES]
  for t in range(2):
    deltas, dcs = [], []
    for i in range(len(SIZES)):
      batch = data.client(i)
      corr = {k: c[k] - ci[i][k] for k in x}
      y_i, steps = local_fgsm_sgd(x, np.asarray(batch["x"], np.float64),
                                  np.asarray(batch["y"], np.float64), lr, 2, corr)
      new_ci = {k: ci[i][k] - c[k] + (x[k] - y_i[k]) / (steps * lr) for k in x}
      deltas.append({k: y_i[k] - x[k] for k in x})
      dcs.append({k: new_ci[k] - ci[i][k] for k in x})
      ci[i] = new_ci
    x = {k: x[k] + server_lr * np.mean([d[k] for d in deltas], axis=0) for k in x}
    c = {k: c[k] + np.mean([d[k] for d in dcs], axis=0) for k in x}   # |S| / N = 1
    tree_close(states[t + 1].params, x, atol=1e-5)
    tree_close(global_control(states[t + 1]), c, atol=1e-5)
  # The attack matters: SCAFFOLD on clean inputs lands elsewhere.
  clean = run_rounds(scaffold(linear_example_loss, client_lr=lr, server_lr=server_lr,
                              schedule=NO_SHUFFLE), data, params, 2)[-1]
  assert abs(float(clean.params["b"]) - x["b"]) > 1e-3


def test_fedhyper_global_rate_on_fal_matches_numpy():
  data, params = linear_problem(SIZES)
  lr = 0.1
  method = fh.on_top(fal(linear_example_loss, fgsm_attack(), client_lr=lr, schedule=NO_SHUFFLE),
                     fh.fedhyper_global(), "fal+g")
  states = run_rounds(method, data, params, 3)
  x = to_numpy(params)
  acc, prev = 0.0, None
  weights = np.full(len(SIZES), 1.0 / len(SIZES))   # FAL averages uniformly (the paper's 1/N)
  for t in range(3):
    deltas = []
    for i in range(len(SIZES)):
      batch = data.client(i)
      y_i, _ = local_fgsm_sgd(x, np.asarray(batch["x"], np.float64),
                              np.asarray(batch["y"], np.float64), lr, 2)
      deltas.append({k: y_i[k] - x[k] for k in x})
    delta = {k: sum(wi * d[k] for wi, d in zip(weights, deltas)) for k in x}
    if prev is not None:
      acc = float(np.clip(acc + sum(np.sum(prev[k] * delta[k]) for k in x), -0.8, 4.0))
    x = {k: x[k] + (1 + acc) * delta[k] for k in x}
    prev = delta
    tree_close(states[t + 1].params, x, atol=1e-5)
    assert float(fh.global_rate(states[t + 1])) == pytest.approx(1 + acc, abs=1e-5)
  assert acc != 0.0   # the rate moved


def test_fedhyper_on_fot_keeps_fedproject_and_fot_level_forgetting():
  from launch import continual

  def run(algorithm, base):
    config = algorithms.example_config(algorithm) if algorithm != "fedhyper_g" else None
    if config is None:
      import importlib
      config = importlib.import_module("launch.configs.fot_permuted_digits").get_config()
      config.algorithm, config.fedhyper_base = algorithm, base
    config.num_tasks, config.rounds_per_task, config.rounds_per_call = 3, 15, 15
    config.hidden = (64, 64)
    return continual.run(config, progress=False)

  hyper_fot, summary = run("fedhyper_g", "fot")
  hyper_avg, _ = run("fedhyper_g", "fedavg")
  # FedProject ran at every task end: the bases grew, and FedHyper's rate adapted.
  assert all(size > 0 for size in summary["basis"].values())
  assert "global_rate" in hyper_fot.history[-1]
  assert hyper_fot.history[-1]["global_rate"] != 1.0
  # Measured: forgetting 0.017 (FedHyper on FOT, FOT alone 0.006) vs 0.244 on FedAvg.
  assert hyper_fot.metrics["forgetting"] < 0.25 * hyper_avg.metrics["forgetting"]


# ---- the public research API

def test_aggregate_and_step_is_the_rounds_server_step():
  data, params = linear_problem(SIZES)
  method = scaffold(linear_example_loss, client_lr=0.1, server_lr=0.7, schedule=NO_SHUFFLE)
  state = method.init(params, jax.random.PRNGKey(0), data.num_clients)
  rng = np.random.default_rng(0)
  messages = {"delta": {"w": rng.normal(size=(3, 3)), "b": rng.normal(size=3)},
              "control_delta": {"w": rng.normal(size=(3, 3)), "b": rng.normal(size=3)}}
  messages = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), messages)
  weights = jnp.asarray([1.0, 1.0, 1.0])
  new, aggregate = aggregate_and_step(method, state, messages, weights, cohort_fraction=0.5)
  mean = jax.tree.map(lambda v: np.mean(np.asarray(v, np.float64), axis=0), messages)
  tree_close(new.params, {k: to_numpy(params)[k] + 0.7 * mean["delta"][k] for k in params},
             atol=1e-6)
  tree_close(global_control(new), {k: 0.5 * mean["control_delta"][k] for k in params}, atol=1e-6)
  assert int(new.round) == 0
  with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
    aggregate_and_step(method, state, messages, jnp.ones(2))
