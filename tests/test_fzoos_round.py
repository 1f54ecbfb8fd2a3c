"""One full FZooS round through the engine against a step-by-step numpy reference.

Tiny quadratic (d = 4, 2 clients, T = 2), exploration off (so nothing random is
drawn), every stored query inside the GP's and the RFF's neighbourhoods: the local GP
gradient, the surrogate correction with gamma_tau = 1/(tau+1), Adam, the server
average, the safeguard and the round-end fit of nu_i around x_{r+1} are each written
out in float64 numpy below.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import fzoos as fzoos_lib
from fedjax_lab import objectives, server_rules
from fedjax_lab import zeroth_order as zo
from fedjax_lab.algorithm import make_round

DIM, CLIENTS, STEPS, FEATURES, PREFILL, CAPACITY = 4, 2, 2, 16, 6, 32
LENGTHSCALE, NOISE, RFF_NOISE = 1.0, 1e-4, 1e-2


def np_value(x, c1, c2):
  z = 20.0 * np.clip(x, 0.0, 1.0) - 10.0
  return 0.1 / DIM * (c1 @ (z * z) + c2 @ z + 1.0)


def np_gp_grad(xs, ys, x):
  """SE GP (unit amplitude) on min-max normalised values: grad of the posterior mean."""
  lo, scale = ys.min(), ys.max() - ys.min() + 1e-12
  sq = ((xs[:, None, :] - xs[None, :, :]) ** 2).sum(-1)
  alpha = np.linalg.solve(np.exp(-sq / (2 * LENGTHSCALE ** 2)) + NOISE * np.eye(len(xs)),
                          (ys - lo) / scale)
  k = np.exp(-((x - xs) ** 2).sum(-1) / (2 * LENGTHSCALE ** 2))
  return scale * ((alpha * k)[:, None] * -(x - xs) / LENGTHSCALE ** 2).sum(0)


def np_rff_nu(omega, b, xs, ys):
  """Ridge weights of the RFF surrogate, in the objective's units."""
  lo, scale = ys.min(), ys.max() - ys.min() + 1e-12
  phi = np.sqrt(2.0 / FEATURES) * np.cos(xs @ omega.T + b)
  return scale * phi.T @ np.linalg.solve(phi @ phi.T + RFF_NOISE * np.eye(len(xs)),
                                         (ys - lo) / scale)


def np_rff_grad(omega, b, nu, x):
  return -np.sqrt(2.0 / FEATURES) * omega.T @ (nu * np.sin(omega @ x + b))


def np_round(x_r, c1, c2, bufs, nus, nu_bar, omega, b, lr):
  """The round as the authors' code runs it, one client after the other."""
  x_ends, bufs = [], [list(buf) for buf in bufs]
  for i in range(CLIENTS):
    x, m, v = x_r.copy(), np.zeros(DIM), np.zeros(DIM)
    for tau in range(STEPS):
      bufs[i].append((x.copy(), np_value(x, c1[i], c2[i])))
      xs, ys = map(np.array, zip(*bufs[i]))
      g = np_gp_grad(xs, ys, x)
      g = g + (np_rff_grad(omega, b, nu_bar, x) - np_rff_grad(omega, b, nus[i], x)) / (tau + 1)
      m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
      t = tau + 1
      x = x - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    bufs[i].append((x.copy(), np_value(x, c1[i], c2[i])))
    x_ends.append(x)
  x_new = x_r + np.mean([x - x_r for x in x_ends], axis=0)
  big_f = lambda z: np.mean([np_value(z, c1[i], c2[i]) for i in range(CLIENTS)])
  rejected = big_f(x_new) >= big_f(x_r)
  x = x_r if rejected else x_new
  new_nus = []
  for i in range(CLIENTS):
    bufs[i].append((x.copy(), np_value(x, c1[i], c2[i])))
    xs, ys = map(np.array, zip(*bufs[i]))
    new_nus.append(np_rff_nu(omega, b, xs, ys))
  return x, rejected, np.array(new_nus), np.mean(new_nus, axis=0)


@pytest.mark.parametrize("lr", [0.05, 3.0])
def test_one_fzoos_round_matches_the_numpy_reference(lr):
  problem = objectives.quadratic(dim=DIM, num_clients=CLIENTS, div=1.0, seed=3)
  config = zo.SurrogateConfig(kernel="se", lengthscale=LENGTHSCALE, noise=NOISE,
                              num_points=CAPACITY, num_init=0, num_explore=0, num_candidates=1,
                              buffer_size=CAPACITY)
  method = fzoos_lib.fzoos(problem.value, problem.row_template(), DIM, client_lr=lr,
                           local_steps=STEPS, surrogate=config, rff_features=FEATURES,
                           rff_noise=RFF_NOISE, rff_points=CAPACITY, rff_explore=0,
                           rff_candidates=1)
  rng = np.random.default_rng(0)
  c1, c2 = problem.data.arrays["c1"], problem.data.arrays["c2"]
  x_r = np.asarray(problem.x0, np.float64)
  bufs = [[(p, np_value(p, c1[i], c2[i])) for p in x_r + rng.uniform(-0.2, 0.2, (PREFILL, DIM))]
          for i in range(CLIENTS)]
  nus = rng.normal(0.0, 0.05, (CLIENTS, FEATURES))
  nu_bar = nus.mean(0)

  state = method.init(jnp.asarray(problem.x0), jax.random.PRNGKey(0), CLIENTS)
  pad = np.zeros((CLIENTS, CAPACITY - PREFILL))
  buffer = zo.QueryBuffer(
      jnp.asarray(np.concatenate([np.array([[p for p, _ in buf] for buf in bufs]),
                                  np.zeros((CLIENTS, CAPACITY - PREFILL, DIM))], 1), jnp.float32),
      jnp.asarray(np.concatenate([np.array([[y for _, y in buf] for buf in bufs]), pad], 1),
                  jnp.float32),
      jnp.full((CLIENTS,), PREFILL, jnp.int32))
  rows = dict(state.client_states, buffer=buffer, nu=jnp.asarray(nus, jnp.float32),
              has_nu=jnp.ones((CLIENTS,), bool))
  state = state._replace(
      client_states=rows, rule_state=server_rules.replace_state(
          state.rule_state, fzoos_lib.SurrogateConsensusState(jnp.asarray(nu_bar, jnp.float32),
                                                              jnp.ones((), bool))))
  arrays, offsets = problem.data.device_arrays()
  new, _ = jax.jit(make_round(method, problem.data, CLIENTS))(state, arrays, offsets)

  rff = zo.rff_init(jax.random.PRNGKey(0), DIM, FEATURES, 1.0, "se")
  omega, b = np.asarray(rff.omega, np.float64), np.asarray(rff.b, np.float64)
  x, rejected, ref_nus, ref_nu_bar = np_round(x_r, c1, c2, bufs, nus, nu_bar, omega, b, lr)
  assert rejected == (lr > 1.0)            # both branches of the safeguard are checked
  np.testing.assert_allclose(np.asarray(new.params), x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new.client_states["nu"]), ref_nus, rtol=2e-3, atol=2e-4)
  kept = server_rules.find_state(new.rule_state, fzoos_lib.SurrogateConsensusState)
  np.testing.assert_allclose(np.asarray(kept.nu), ref_nu_bar, rtol=2e-3, atol=2e-4)
  # 1 + T local queries, the last iterate's, and x_{r+1} at the round end.
  per_round = fzoos_lib.queries_per_round(STEPS, 0, 0)
  assert per_round == STEPS + 2
  np.testing.assert_array_equal(np.asarray(new.client_states["queries"]), [per_round] * CLIENTS)
  np.testing.assert_array_equal(np.asarray(new.client_states["buffer"].count),
                                [PREFILL + per_round] * CLIENTS)


@pytest.mark.slow
def test_correction_off_skips_the_round_end_fit():
  problem = objectives.quadratic(dim=DIM, num_clients=CLIENTS, seed=3)
  config = zo.SurrogateConfig(kernel="se", lengthscale=LENGTHSCALE, num_init=3, num_explore=1,
                              num_candidates=4, num_points=CAPACITY, buffer_size=CAPACITY)
  method = fzoos_lib.fzoos(problem.value, problem.row_template(), DIM, local_steps=STEPS,
                           surrogate=config, rff_features=FEATURES, rff_points=CAPACITY,
                           rff_explore=2, rff_candidates=4, correction=False)
  state = method.init(jnp.asarray(problem.x0), jax.random.PRNGKey(0), CLIENTS)
  arrays, offsets = problem.data.device_arrays()
  new, _ = jax.jit(make_round(method, problem.data, CLIENTS))(state, arrays, offsets)
  # Initial points, then 1 + T + e (T - 1): no round-end queries, no surrogate.
  assert fzoos_lib.queries_per_round(STEPS, 1, 2, correction=False) == 1 + STEPS + 1
  np.testing.assert_array_equal(np.asarray(new.client_states["queries"]),
                                [3 + 1 + STEPS + 1] * CLIENTS)
  assert not bool(server_rules.find_state(new.rule_state,
                                          fzoos_lib.SurrogateConsensusState).has_nu)
