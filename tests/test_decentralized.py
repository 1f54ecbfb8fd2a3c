"""Decentralized learning against closed forms and numpy: mixing matrices, gossip = FedAvg
on a complete graph, the ring's consensus rate, D-PSGD / DFedAvgM / DFedSAM, MoDeST,
variance-corrected averaging, backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import decentralized as methods
from algorithms.fedavg import fedavg
from fedjax_lab import decentralized as dec
from fedjax_lab import parallel, sampling
from fedjax_lab.algorithm import make_round
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import FederatedData
from reference import linear_example_loss, linear_grad, linear_problem, run_rounds, to_numpy

SIZES = (5, 3, 7, 4)
NO_SHUFFLE = LocalSchedule(batch_size=2, epochs=1, shuffle=False)


def run(method, data, params, rounds, backend="vmap", state=None):
  round_fn = dec.make_round(method, data, backend)
  if parallel.get_backend(backend).compiled:
    round_fn = jax.jit(round_fn)
  state = method.init(params, jax.random.PRNGKey(0)) if state is None else state
  arrays, offsets = data.device_arrays()
  states, metrics = [state], []
  for _ in range(rounds):
    state, m = round_fn(state, arrays, offsets)
    states.append(state)
    metrics.append(m)
  return states, metrics


def node(stacked, i):
  return {k: np.asarray(v[i], np.float64) for k, v in stacked.items()}


# ---- mixing matrices

def test_static_matrices_are_doubly_stochastic_with_their_closed_forms():
  n = 8
  for w in (dec.ring(n), dec.torus(2, 4), dec.torus(3, 3), dec.exponential(n),
            dec.erdos_renyi(n, 0.4, seed=1), dec.fully_connected(n)):
    dec.check_doubly_stochastic(w)
  w = dec.ring(n)
  lam = (1 + 2 * np.cos(2 * np.pi * np.arange(n) / n)) / 3   # circulant eigenvalues
  np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(w)), np.sort(lam), atol=1e-12)
  assert dec.spectral_gap(w) == pytest.approx(1 - np.max(np.abs(lam[1:])), abs=1e-12)
  np.testing.assert_allclose(dec.torus(3, 3)[0], [0.2, 0.2, 0.2, 0.2, 0, 0, 0.2, 0, 0])
  # Exponential: node i averages itself and i - 1, i - 2, i - 4 (tau = 3), 1/4 each.
  np.testing.assert_allclose(np.flatnonzero(dec.exponential(n)[5]), [1, 3, 4, 5])
  np.testing.assert_allclose(dec.exponential(n)[5, [1, 3, 4, 5]], 0.25)
  assert dec.spectral_gap(dec.fully_connected(n)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="row 0 sums to 1.1"):
    dec.check_doubly_stochastic(np.eye(3) + np.diag([0.1, 0, 0]))
  with pytest.raises(ValueError, match="column 0 sums to 0.5"):
    dec.check_doubly_stochastic(np.array([[0.5, 0.5], [0.0, 1.0]]))
  with pytest.raises(ValueError, match="no connected graph"):
    dec.erdos_renyi(30, 0.01, max_tries=3)
  with pytest.raises(ValueError, match="Unknown topology 'star'"):
    dec.topology("star", 4)


def test_time_varying_matrices():
  n = 8
  key = jax.random.PRNGKey(3)
  for t in range(3):
    w, active = dec.random_matching(n).mixing(jax.random.fold_in(key, t), t)
    w = dec.check_doubly_stochastic(w)
    assert np.array_equal(w, w.T) and np.all(np.diag(w) == 0.5) and active.all()
  # One-peer exponential: log2(n) rounds multiply to the exact average.
  topo = dec.one_peer_exponential(n)
  product = np.eye(n)
  for t in range(3):
    product = np.asarray(topo.mixing(key, t)[0], np.float64) @ product
  np.testing.assert_allclose(product, np.full((n, n), 1 / n), atol=1e-7)
  # MoDeST: the sample trains; the next sample receives the sample's average.
  w, active = dec.modest(n, 3, seed=1).mixing(key, 4)
  now, nxt = dec.modest_sample(1, 4, n, 3), dec.modest_sample(1, 5, n, 3)
  assert np.array_equal(active, now) and int(np.sum(now)) == 3
  w = np.asarray(w)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-7)
  for i in range(n):
    expected = now / 3.0 if nxt[i] else np.eye(n)[i]
    np.testing.assert_allclose(w[i], expected, atol=1e-7)


# ---- gossip on a complete graph is FedAvg

def test_fully_connected_gossip_equals_fedavg_with_full_participation():
  data, params = linear_problem(SIZES)
  schedule = LocalSchedule(batch_size=2, epochs=2, shuffle=True)   # same shuffles: same keys
  gossip = methods.dfedavgm(linear_example_loss, 0.1, dec.static(dec.fully_connected(4)),
                            schedule, momentum=0.0)
  states, _ = run(gossip, data, params, 3)
  reference = run_rounds(fedavg(linear_example_loss, 0.1, schedule=schedule,
                                weighting="uniform"), data, params, 3)
  for t in (1, 2, 3):
    for i in range(4):
      for k in params:
        np.testing.assert_allclose(states[t].params[k][i], reference[t].params[k], atol=1e-6)
  assert float(jnp.abs(states[3].params["b"][0] - params["b"])) > 1e-3


# ---- the ring's consensus distance on a quadratic, in closed form

def quadratic_nodes(n, dim, seed=0):
  """Node i minimises 0.5 ||x - b_i||^2 (one example b_i)."""
  rng = np.random.default_rng(seed)
  b = rng.normal(size=(n, dim)).astype(np.float32)
  data = FederatedData({"b": b}, np.arange(n + 1))
  loss = lambda params, batch, rng: 0.5 * jnp.sum((params["x"] - batch["b"]) ** 2, -1)
  return data, loss, b.astype(np.float64)


def test_ring_consensus_distance_follows_the_spectral_gap():
  n, dim, lr, steps, rounds = 10, 3, 0.3, 2, 25
  data, loss, b = quadratic_nodes(n, dim)
  rng = np.random.default_rng(1)
  x0 = rng.normal(size=(n, dim))
  method = methods.dfedavgm(loss, lr, dec.static(dec.ring(n), "ring"),
                            LocalSchedule(batch_size=None, steps=steps), momentum=0.0)
  init = method.init({"x": jnp.zeros(dim)}, jax.random.PRNGKey(0),
                     node_params={"x": jnp.asarray(x0, jnp.float32)})
  with pytest.raises(ValueError, match="leading axis of the 10 nodes"):
    method.init({"x": jnp.zeros(dim)}, jax.random.PRNGKey(0), node_params={"x": x0[:3]})
  _, metrics = run(method, data, None, rounds, state=init)
  # K gradient steps on 0.5||x - b||^2: y = c x + (1 - c) b, c = (1 - lr)^K; X' = W Y.
  # In the ring's Fourier basis (W circulant) every mode k evolves on its own:
  #   z_k' = c lam_k z_k + (1 - c) lam_k b_k,   lam_k = (1 + 2 cos(2 pi k / n)) / 3.
  c = (1 - lr) ** steps
  k = np.arange(n)
  lam = (1 + 2 * np.cos(2 * np.pi * k / n)) / 3
  basis = np.exp(-2j * np.pi * np.outer(k, k) / n) / np.sqrt(n)   # unitary DFT
  z, bz = basis @ x0, basis @ b
  expected = []
  for _ in range(rounds):
    z = c * lam[:, None] * z + (1 - c) * lam[:, None] * bz
    expected.append(np.sum(np.abs(z[1:]) ** 2) / n)   # mode 0 is the average
  got = np.array([float(m["consensus_distance"]) for m in metrics])
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  gap = 1 - lam[1]
  assert float(metrics[0]["spectral_gap"]) == pytest.approx(gap, abs=1e-6)
  # Pure gossip (lr = 0): the distance shrinks by (1 - gap)^2 per round once the
  # slowest modes dominate.
  still = methods.dfedavgm(loss, 0.0, dec.static(dec.ring(n), "ring"),
                           LocalSchedule(batch_size=None, steps=1), momentum=0.0)
  _, metrics = run(still, data, None, 60, state=init)
  cd = np.array([float(m["consensus_distance"]) for m in metrics])
  np.testing.assert_allclose(cd[-1] / cd[-2], (1 - gap) ** 2, rtol=1e-3)


# ---- the methods against numpy, two rounds on a 4-node ring

def np_local(w, x, y, lr, batch, epochs=1, momentum=0.0, rho=None):
  """Unshuffled mini-batch steps (last batch partial); heavy ball from zero; SAM if rho."""
  w = dict(w)
  trace = {k: np.zeros_like(v) for k, v in w.items()}
  for _ in range(epochs):
    for lo in range(0, len(y), batch):
      xb, yb = x[lo:lo + batch], y[lo:lo + batch]
      g = linear_grad(w, xb, yb)
      if rho is not None:
        norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
        g = linear_grad({k: w[k] + rho * g[k] / norm for k in w}, xb, yb)
      for k in w:
        trace[k] = g[k] + momentum * trace[k]
        w[k] = w[k] - lr * trace[k]
  return w


def client_xy(data, i):
  batch = data.client(i)
  return np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)


def np_mix(w, models, steps=1):
  for _ in range(steps):
    models = [{k: sum(w[i, j] * models[j][k] for j in range(len(models))) for k in models[0]}
              for i in range(len(models))]
  return models


@pytest.mark.parametrize("kind", ["dpsgd", "dfedavgm", "dfedsam_mgs"])
def test_methods_match_numpy_two_rounds(kind):
  data, params = linear_problem(SIZES)
  w = dec.ring(4)
  topo = dec.static(w, "ring")
  lr = 0.1
  if kind == "dpsgd":
    method = methods.dpsgd(linear_example_loss, lr, topo, batch_size=2, shuffle=False)
  elif kind == "dfedavgm":
    method = methods.dfedavgm(linear_example_loss, lr, topo, NO_SHUFFLE, momentum=0.5)
  else:
    method = methods.dfedsam(linear_example_loss, lr, topo, NO_SHUFFLE, rho=0.05,
                             gossip_steps=2)
  states, _ = run(method, data, params, 2)
  models = [to_numpy(params) for _ in SIZES]
  for t in range(2):
    if kind == "dpsgd":   # x_i' = sum_j W_ij x_j - lr grad F_i(x_i) on the first batch
      mixed = np_mix(w, models)
      new = []
      for i in range(4):
        x, y = client_xy(data, i)
        g = linear_grad(models[i], x[:2], y[:2])
        new.append({k: mixed[i][k] - lr * g[k] for k in g})
      models = new
    else:
      trained = []
      for i in range(4):
        x, y = client_xy(data, i)
        trained.append(np_local(models[i], x, y, lr, 2, momentum=0.5 if kind == "dfedavgm"
                                else 0.0, rho=0.05 if kind == "dfedsam_mgs" else None))
      models = np_mix(w, trained, 2 if kind == "dfedsam_mgs" else 1)
    for i in range(4):
      for k in params:
        np.testing.assert_allclose(states[t + 1].params[k][i], models[i][k], atol=1e-5)
  # The nodes disagree (a ring does not average exactly).
  assert float(np.abs(states[2].params["b"][0] - states[2].params["b"][1])) > 1e-4


def test_modest_holds_fedavg_with_its_samples():
  data, params = linear_problem((5, 3, 7, 4, 6, 2))
  n, s, rounds = 6, 2, 3
  topo = dec.modest(n, s, seed=2)
  method = methods.dfedavgm(linear_example_loss, 0.1, topo, NO_SHUFFLE, momentum=0.0)
  states, metrics = run(method, data, params, rounds)
  cohorts = np.stack([np.flatnonzero(dec.modest_sample(2, t, n, s)) for t in range(rounds + 1)])
  fed = fedavg(linear_example_loss, 0.1, schedule=NO_SHUFFLE, weighting="uniform")
  round_fn = jax.jit(make_round(fed, data, s, sampler=sampling.schedule_sampler(cohorts, n)))
  state = fed.init(params, jax.random.PRNGKey(0), n)
  arrays, offsets = data.device_arrays()
  for t in range(rounds):
    state, _ = round_fn(state, arrays, offsets)
    for i in cohorts[t + 1]:   # the next sample holds the model
      for k in params:
        np.testing.assert_allclose(states[t + 1].params[k][i], state.params[k], atol=1e-6)
    assert int(metrics[t]["active_nodes"]) == s


# ---- variance-corrected averaging

def test_variance_correction_matches_numpy_and_restores_the_variance():
  rng = np.random.default_rng(0)
  n = 6
  models = {"k": rng.normal(size=(n, 30, 20)).astype(np.float32) * 0.3,
            "b": np.zeros((n, 20), np.float32), "s": rng.normal(size=(n,)).astype(np.float32)}
  w = dec.ring(n)
  got = dec.variance_corrected_mix(jnp.asarray(w, jnp.float32), models)
  for i in range(n):
    z = sum(w[i, j] * models["k"][j].astype(np.float64) for j in range(n))
    target = sum(w[i, j] * np.var(models["k"][j].astype(np.float64)) for j in range(n))
    expected = z.mean() + (z - z.mean()) * np.sqrt(target / np.var(z))
    np.testing.assert_allclose(got["k"][i], expected, atol=1e-5)
  np.testing.assert_allclose(got["b"], 0.0)                     # zero variance: as mixed
  np.testing.assert_allclose(got["s"], w @ models["s"], atol=1e-6)   # one element: as mixed
  # Independent models averaged on a complete graph: variance sigma^2 / n, restored to sigma^2.
  plain = dec.mix(jnp.asarray(dec.fully_connected(n), jnp.float32), models)["k"]
  fixed = dec.variance_corrected_mix(jnp.asarray(dec.fully_connected(n), jnp.float32),
                                     models)["k"]
  assert float(np.var(plain[0])) == pytest.approx(0.09 / n, rel=0.15)
  assert float(np.var(fixed[0])) == pytest.approx(np.mean(np.var(models["k"], axis=(1, 2))),
                                                  rel=1e-4)


# ---- backends agree; the launch command

def backends_agree(backends):
  data, params = linear_problem(SIZES)
  method = methods.dfedavgm(linear_example_loss, 0.1, dec.random_matching(4),
                            LocalSchedule(batch_size=2, epochs=1), momentum=0.5,
                            variance_correction=True)
  final = {b: run(method, data, params, 2, backend=b)[0][-1].params
           for b in ("vmap",) + backends}
  for b in backends:
    for k in params:
      np.testing.assert_allclose(final[b][k], final["vmap"][k], atol=1e-6, err_msg=b)


def test_sharded_backend_agrees_with_vmap():
  backends_agree(("sharded",))   # 4 nodes padded to the 8 devices


@pytest.mark.slow
def test_loop_backend_agrees_with_vmap():
  backends_agree(("loop",))


def small_gossip_config():
  from launch.configs import gossip_digits
  config = gossip_digits.get_config()
  config.num_clients, config.hidden, config.rounds, config.local_steps = 8, (16,), 2, 2
  config.rounds_per_call, config.eval_every, config.topology = 2, 2, "torus"
  return config


def test_launch_decentralized_summary(tmp_path):
  from launch import decentralized as launcher
  config = small_gossip_config()
  _, history, summary = launcher.run(config, str(tmp_path), progress=False)
  assert summary["rounds"] == 2 and summary["topology"] == "torus"
  for key in ("test_accuracy", "node_test_accuracy", "consensus_distance"):
    assert 0.0 <= summary[key] and np.isfinite(summary[key])
  assert summary["spectral_gap"] == pytest.approx(dec.spectral_gap(dec.torus(2, 4)), abs=1e-6)
  assert "test_node_accuracy" in history[-1] and (tmp_path / "metrics.jsonl").exists()
  config.algorithm = "dfedfoo"
  with pytest.raises(ValueError, match="Unknown decentralized algorithm 'dfedfoo'"):
    launcher.run(config, None, progress=False)


@pytest.mark.slow
def test_launch_decentralized_resumes(tmp_path):
  from launch import decentralized as launcher
  config = small_gossip_config()
  _, _, first = launcher.run(config, str(tmp_path), progress=False)
  config.rounds = 4
  _, _, resumed = launcher.run(config, str(tmp_path), progress=False)
  _, _, straight = launcher.run(config, None, progress=False)
  assert resumed["rounds"] == 4
  assert resumed["test_accuracy"] == pytest.approx(straight["test_accuracy"], abs=1e-6)
  assert resumed["consensus_distance"] == pytest.approx(straight["consensus_distance"], rel=1e-5)
