"""Each method's round against an independent numpy or optax reference."""
import jax
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from algorithms.fedprox import fedprox
from algorithms.fedsgd import fedsgd
from algorithms.scaffold import global_control, scaffold
from fedjax_lab.algorithm import make_round, sample_cohort
from fedjax_lab.client import LocalSchedule
from reference import (linear_example_loss, linear_grad, linear_problem, local_sgd, run_rounds,
                       to_numpy, tree_close)

SIZES = (5, 3, 7)
NO_SHUFFLE = LocalSchedule(batch_size=2, epochs=2, shuffle=False)




def numpy_fedavg_round(data, params, lr, batch_size, epochs, weights, server_lr=1.0, mu=0.0):
  start = to_numpy(params)
  deltas = []
  for i in range(data.num_clients):
    c = data.client(i)
    w, _ = local_sgd(start, c["x"], c["y"], lr, batch_size, epochs, mu=mu)
    deltas.append({k: w[k] - start[k] for k in w})
  weights = np.asarray(weights, np.float64) / np.sum(weights)
  return {k: start[k] + server_lr * sum(wi * d[k] for wi, d in zip(weights, deltas)) for k in start}


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_fedavg_round_matches_numpy(weighting):
  data, params = linear_problem(SIZES)
  method = fedavg(linear_example_loss, client_lr=0.1, server_lr=0.7, schedule=NO_SHUFFLE,
                  weighting=weighting)
  state = run_rounds(method, data, params, 1)[-1]
  weights = SIZES if weighting == "num_examples" else (1, 1, 1)
  expected = numpy_fedavg_round(data, params, 0.1, 2, 2, weights, server_lr=0.7)
  tree_close(state.params, expected, atol=1e-5)


def test_fedprox_round_matches_numpy():
  data, params = linear_problem(SIZES)
  method = fedprox(linear_example_loss, client_lr=0.1, mu=0.5, schedule=NO_SHUFFLE)
  state = run_rounds(method, data, params, 1)[-1]
  expected = numpy_fedavg_round(data, params, 0.1, 2, 2, SIZES, mu=0.5)
  tree_close(state.params, expected, atol=1e-5)
  # mu matters: the same round without the proximal term lands elsewhere.
  plain = numpy_fedavg_round(data, params, 0.1, 2, 2, SIZES)
  assert abs(plain["b"] - expected["b"]) > 1e-3


def test_fedsgd_is_one_full_batch_gradient_step():
  data, params = linear_problem(SIZES)
  state = run_rounds(fedsgd(linear_example_loss, client_lr=0.3), data, params, 1)[-1]
  start = to_numpy(params)
  grads = [linear_grad(start, data.client(i)["x"], data.client(i)["y"]) for i in range(3)]
  mean = {k: sum(n * g[k] for n, g in zip(SIZES, grads)) / sum(SIZES) for k in start}
  tree_close(state.params, {k: start[k] - 0.3 * mean[k] for k in start}, atol=1e-6)


# FedAdam / FedYogi / FedAdagrad (both conventions): tests/test_fedopt.py.


def test_scaffold_two_rounds_match_numpy_with_partial_participation():
  sizes = (4, 6, 5, 3)
  data, params = linear_problem(sizes, seed=1)
  lr, server_lr, epochs, cohort = 0.1, 0.8, 3, 2
  schedule = LocalSchedule(batch_size=None, epochs=epochs, shuffle=False)  # K = 3 GD steps
  method = scaffold(linear_example_loss, client_lr=lr, server_lr=server_lr, schedule=schedule)
  states = run_rounds(method, data, params, 2, clients_per_round=cohort)

  x = to_numpy(params)
  seen = set()
  c = {k: np.zeros_like(v) for k, v in x.items()}
  ci = [{k: np.zeros_like(v) for k, v in x.items()} for _ in sizes]
  for r in range(2):
    ids, _ = sample_cohort(states[r], len(sizes), cohort)
    dys, dcs = [], []
    for i in np.asarray(ids):
      seen.add(int(i))
      client = data.client(int(i))
      correction = {k: c[k] - ci[i][k] for k in x}
      y, steps = local_sgd(x, client["x"], client["y"], lr, len(client["y"]), epochs,
                           correction=correction)
      new_ci = {k: ci[i][k] - c[k] + (x[k] - y[k]) / (steps * lr) for k in x}
      dys.append({k: y[k] - x[k] for k in x})
      dcs.append({k: new_ci[k] - ci[i][k] for k in x})
      ci[i] = new_ci
    x = {k: x[k] + server_lr * np.mean([d[k] for d in dys], axis=0) for k in x}
    c = {k: c[k] + cohort / len(sizes) * np.mean([d[k] for d in dcs], axis=0) for k in x}
    state = states[r + 1]
    tree_close(state.params, x, atol=1e-5)
    tree_close(global_control(state), c, atol=1e-5)
    for i in range(len(sizes)):
      tree_close(jax.tree.map(lambda v: v[i], state.client_states), ci[i], atol=1e-5)
  # Scatter: sampled clients got non-zero control variates, the others kept zeros.
  final = np.asarray(states[-1].client_states["w"])
  for i in range(len(sizes)):
    assert np.any(final[i] != 0) == (i in seen)
