"""Robust aggregators, byzantine clients, RFFL and DP-FedAvg against numpy references."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from algorithms import rffl as rffl_lib
from algorithms.fedavg import fedavg
from fedjax_lab import aggregate, byzantine, parallel, privacy
from fedjax_lab.algorithm import make_round, sample_cohort
from fedjax_lab.client import LocalSchedule
from fedjax_lab.server_rules import find_state
from launch import robust
from reference import linear_example_loss, linear_problem, local_sgd, to_numpy, tree_close

RNG = np.random.default_rng(0)


def stacked(count, seed=0):
  """Random messages ``{'a': [C, 3, 2], 'b': [C]}`` (float32) and weights ``[C]``."""
  rng = np.random.default_rng(seed)
  messages = {"a": rng.normal(size=(count, 3, 2)).astype(np.float32),
              "b": rng.normal(size=(count,)).astype(np.float32)}
  weights = rng.integers(1, 9, size=count).astype(np.float32)
  return messages, weights


def rows(messages):
  """``[C, D]`` float64 rows in ravel_pytree's leaf order ('a' then 'b')."""
  return np.concatenate([np.asarray(messages[k], np.float64).reshape(len(messages["b"]), -1)
                         for k in ("a", "b")], axis=1)


_JITTED = {}


def run_agg(agg, messages, weights, state=None):
  """One jitted aggregation (compiled once per aggregator object)."""
  state = agg.init() if state is None else state
  if id(agg) not in _JITTED:
    _JITTED[id(agg)] = (agg, jax.jit(lambda m, w, s: agg.update(m, w, s, None)))
  out, state = _JITTED[id(agg)][1](messages, weights, state)
  return jax.tree.map(np.asarray, out), state


def np_weighted_median(values, weights):
  """Per coordinate: average of the first sorted values where 2*cum >= W and 2*cum > W."""
  out = np.empty(values.shape[1:])
  for idx in np.ndindex(*values.shape[1:]):
    col = values[(slice(None),) + idx]
    order = np.argsort(col, kind="stable")
    v, w = col[order], weights[order]
    cum = np.cumsum(w)
    lo = np.flatnonzero(2 * cum >= cum[-1])[0]
    hi = np.flatnonzero(2 * cum > cum[-1])[0]
    out[idx] = 0.5 * (v[lo] + v[hi])
  return out


def np_weighted_trimmed_mean(values, weights, trim):
  out = np.empty(values.shape[1:])
  total = weights.sum()
  for idx in np.ndindex(*values.shape[1:]):
    col = values[(slice(None),) + idx]
    order = np.argsort(col, kind="stable")
    v, w = col[order], weights[order]
    hi, lo = np.cumsum(w), np.cumsum(w) - w
    keep = np.clip(np.minimum(hi, total - trim) - np.maximum(lo, trim), 0, None)
    out[idx] = np.sum(keep * v) / (total - 2 * trim)
  return out


def np_krum_scores(x, f):
  n = len(x)
  scores = []
  for i in range(n):
    d = sorted(np.sum((x[i] - x[j]) ** 2) for j in range(n) if j != i)
    scores.append(sum(d[:max(n - f - 2, 1)]))
  return np.array(scores)


# --------------------------------------------------------------------------- aggregators


@pytest.mark.parametrize("count", [7, 8])
def test_median_equals_numpy_unweighted_and_weighted(count):
  m, w = stacked(count)
  out, _ = run_agg(aggregate.coordinate_median(), m, w)
  for k in m:
    np.testing.assert_allclose(out[k], np.median(m[k], axis=0), atol=1e-6)
  out, _ = run_agg(aggregate.coordinate_median(weighted=True), m, w)
  for k in m:
    np.testing.assert_allclose(out[k], np_weighted_median(m[k].astype(np.float64), w), atol=1e-6)
  # Integer weights that tie at half the total average the two neighbours.
  tie = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  out, _ = run_agg(aggregate.coordinate_median(weighted=True), {"v": tie},
                   np.array([1, 2, 2, 1], np.float32))
  assert out["v"] == pytest.approx(2.5)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_trimmed_mean_equals_numpy(beta):
  m, w = stacked(9, seed=1)
  k = int(np.floor(beta * 9))
  out, _ = run_agg(aggregate.trimmed_mean(beta), m, w)
  for key in m:
    ref = np.mean(np.sort(m[key], axis=0)[k:9 - k], axis=0)
    np.testing.assert_allclose(out[key], ref, atol=1e-6)
  out, _ = run_agg(aggregate.trimmed_mean(beta, weighted=True), m, w)
  for key in m:
    ref = np_weighted_trimmed_mean(m[key].astype(np.float64), w.astype(np.float64), beta * w.sum())
    np.testing.assert_allclose(out[key], ref, atol=1e-5)
  with pytest.raises(ValueError, match="beta"):
    aggregate.trimmed_mean(0.5)


def test_krum_scores_by_hand_and_planted_honest_client():
  m, w = stacked(8, seed=2)
  x = rows(m)
  for f in (0, 2):
    got = aggregate.krum_scores(jnp.asarray(x, jnp.float32), jnp.ones(8, bool), f)
    np.testing.assert_allclose(np.asarray(got), np_krum_scores(x, f), rtol=1e-5)
    out, _ = run_agg(aggregate.krum(num_byzantine=f), m, w)
    best = int(np.argmin(np_krum_scores(x, f)))
    np.testing.assert_allclose(rows(jax.tree.map(lambda v: v[None], out))[0], x[best], atol=1e-6)
  # Multi-Krum: the (unweighted) mean of the m best-scored clients; weighted: by w.
  scores = np_krum_scores(x, 2)
  chosen = np.argsort(scores, kind="stable")[:3]
  out, _ = run_agg(aggregate.multi_krum(3, num_byzantine=2), m, w)
  np.testing.assert_allclose(rows(jax.tree.map(lambda v: v[None], out))[0], x[chosen].mean(0),
                             atol=1e-5)
  out, _ = run_agg(aggregate.multi_krum(3, num_byzantine=2, weighted=True), m, w)
  ref = (w[chosen] @ x[chosen]) / w[chosen].sum()
  np.testing.assert_allclose(rows(jax.tree.map(lambda v: v[None], out))[0], ref, atol=1e-5)
  # Planted: 5 honest points near 1, client 3 exactly at their centre; 2 attackers far away.
  honest = np.ones((5, 4)) + 0.1 * RNG.normal(size=(5, 4))
  honest[3] = honest[[0, 1, 2, 4]].mean(0)
  planted = np.concatenate([honest, 50 + RNG.normal(size=(2, 4))]).astype(np.float32)
  out, _ = run_agg(aggregate.krum(num_byzantine=2), {"v": planted}, np.ones(7, np.float32))
  np.testing.assert_allclose(out["v"], planted[3], atol=1e-6)


def test_geometric_median_is_the_weiszfeld_fixed_point_and_the_minimiser():
  from scipy.optimize import minimize
  m, w = stacked(9, seed=3)
  x = rows(m)
  out, _ = run_agg(aggregate.geometric_median(iterations=200, nu=1e-8), m, w)
  z = rows(jax.tree.map(lambda v: v[None], out))[0]
  beta = w / np.linalg.norm(x - z, axis=1)
  np.testing.assert_allclose(beta @ x / beta.sum(), z, atol=1e-4)
  objective = lambda v: np.sum(w * np.linalg.norm(x - v, axis=1))
  best = minimize(objective, x.mean(0), method="Nelder-Mead",
                  options={"xatol": 1e-9, "fatol": 1e-10, "maxiter": 40000, "maxfev": 40000})
  assert objective(z) <= best.fun + 1e-4
  np.testing.assert_allclose(z, best.x, atol=2e-3)


def test_norm_bounded_mean_clips_each_client_then_averages():
  m, w = stacked(6, seed=4)
  x = rows(m)
  scale = np.minimum(1.0, 0.8 / np.linalg.norm(x, axis=1))
  out, _ = run_agg(aggregate.norm_bounded_mean(0.8), m, w)
  ref = (w * scale) @ x / w.sum()
  np.testing.assert_allclose(rows(jax.tree.map(lambda v: v[None], out))[0], ref, atol=1e-6)


def all_aggregators():
  return {
      "mean": aggregate.weighted_mean(),
      "median": aggregate.coordinate_median(),
      "median_weighted": aggregate.coordinate_median(weighted=True),
      "trimmed_mean": aggregate.trimmed_mean(0.2),
      "trimmed_mean_weighted": aggregate.trimmed_mean(0.2, weighted=True),
      "krum": aggregate.krum(byzantine_fraction=0.2),
      "multi_krum": aggregate.multi_krum(byzantine_fraction=0.2),
      "geometric_median": aggregate.geometric_median(),
      "norm_bounded": aggregate.norm_bounded_mean(1.0),
      "dp": privacy.dp_fedavg_aggregator(1.0, 0.7, 13.0, seed=3,
                                         adaptive=privacy.AdaptiveClip(0.5, 0.2, 0.5)),
      "alie_median": byzantine.alie_aggregator(aggregate.coordinate_median()),
      "rffl": rffl_lib.reputation_aggregator(clip=1.0, num_clients=20),
  }


def run_mapper(agg, messages, weights, backend):
  client_fn = lambda shared, one: (one[0], one[1], {})
  mapper = jax.jit(parallel.make_mapper(client_fn, agg, backend))
  out, _, state = mapper((), (messages, weights), agg.init())
  return jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, state)


@pytest.mark.parametrize("name", sorted(all_aggregators()))
def test_sharded_equals_vmap_and_padding_clients_are_ignored(name):
  agg = all_aggregators()[name]
  count = 13                          # padded to 16 on 8 devices
  m, w = stacked(count, seed=5)
  if name == "alie_median":
    m[byzantine.MALICIOUS_KEY] = np.arange(count) % 4 == 0
  if name == "rffl":
    m[rffl_lib.CLIENT_ID_KEY] = np.arange(3, 3 + count, dtype=np.int32)
  reference, ref_state = run_mapper(agg, m, w, "vmap")
  # Padding: 3 zero-weight clients holding large garbage (and, for RFFL, id 0).
  pad = lambda x: np.concatenate([x, np.full((3,) + x.shape[1:], 77, x.dtype)
                                  if x.dtype != bool else np.ones((3,) + x.shape[1:], bool)])
  padded = jax.tree.map(pad, m)
  if name == "rffl":
    padded[rffl_lib.CLIENT_ID_KEY][-3:] = 0
  padded_w = np.concatenate([w, np.zeros(3, np.float32)])
  for backend in ("vmap", "sharded"):
    out, state = run_mapper(agg, padded, padded_w, backend)
    for k in out:
      np.testing.assert_allclose(out[k], reference[k], atol=1e-5, err_msg=f"{backend} {k}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state, ref_state)


# --------------------------------------------------------------------------- attacks


def test_malicious_set_is_reproducible_by_seed_and_nested():
  a = byzantine.malicious_clients(50, 0.2, seed=4)
  assert a.sum() == 10 and np.array_equal(a, byzantine.malicious_clients(50, 0.2, seed=4))
  assert not np.array_equal(a, byzantine.malicious_clients(50, 0.2, seed=5))
  bigger = byzantine.malicious_clients(50, 0.4, seed=4)
  assert np.all(bigger[a])
  with pytest.raises(ValueError, match="malicious_fraction"):
    byzantine.malicious_clients(10, 1.5, 0)


def test_update_attacks_match_their_formulas():
  m = {"w": jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32), "n": jnp.int32(5)}
  key = jax.random.PRNGKey(11)
  np.testing.assert_allclose(byzantine.attacked_message("sign_flip", m, key, 10.0)["w"],
                             -10 * m["w"], rtol=1e-6)
  np.testing.assert_allclose(byzantine.attacked_message("sign_flip", m, key)["w"], -m["w"])
  np.testing.assert_allclose(byzantine.attacked_message("scale", m, key, 3.0)["w"], 3 * m["w"],
                             rtol=1e-6)
  assert not np.any(np.asarray(byzantine.attacked_message("free_rider", m, key)["w"]))
  # Noise attacks: leaf i draws from fold_in(key, i) (leaves in sorted-key order: n, w).
  g = byzantine.attacked_message("gaussian", m, key, 2.0)["w"]
  np.testing.assert_allclose(g, 2.0 * jax.random.normal(jax.random.fold_in(key, 1), (4, 3)),
                             rtol=1e-6)
  u = byzantine.attacked_message("free_rider_noise", m, key, 0.5)["w"]
  np.testing.assert_allclose(u, jax.random.uniform(jax.random.fold_in(key, 1), (4, 3),
                                                   minval=-0.5, maxval=0.5), rtol=1e-6)
  assert byzantine.attacked_message("gaussian", m, key)["n"] == 5     # ints untouched
  np.testing.assert_array_equal(byzantine.flip_labels(jnp.arange(10), 10), 9 - np.arange(10))
  with pytest.raises(ValueError, match="Unknown attack"):
    byzantine.attacked_message("lie", m, key)


def test_alie_replaces_malicious_rows_by_mean_minus_z_std():
  m, w = stacked(10, seed=6)
  flags = np.zeros(10, bool)
  flags[[2, 7]] = True
  from fedjax_lab.transforms import Aggregator
  identity = Aggregator(lambda: (), lambda messages, weights, state, collectives=None: (messages, state))
  seen, _ = run_agg(byzantine.alie_aggregator(identity), {**m, byzantine.MALICIOUS_KEY: flags}, w)
  n, f = 10, 2
  s = np.floor(n / 2 + 1) - f
  from scipy.stats import norm
  z = norm.ppf((n - s) / n)
  assert byzantine.MALICIOUS_KEY not in seen
  for k in m:
    crafted = m[k].mean(0) - z * m[k].std(0)
    np.testing.assert_allclose(seen[k][2], crafted, atol=1e-5)
    np.testing.assert_allclose(seen[k][7], crafted, atol=1e-5)
    np.testing.assert_array_equal(seen[k][~flags], m[k][~flags])


SIZES = (5, 3, 7, 4, 6)
NO_SHUFFLE = LocalSchedule(batch_size=2, epochs=2, shuffle=False)


def first_round(method, data, params, backend="vmap"):
  state = method.init(params, jax.random.PRNGKey(0), data.num_clients)
  new_state, _ = jax.jit(make_round(method, data, data.num_clients, backend))(
      state, *data.device_arrays())
  return state, new_state


def numpy_deltas(data, params, transform_y=None, malicious=()):
  start = to_numpy(params)
  deltas = []
  for i in range(data.num_clients):
    c = data.client(i)
    y = transform_y(c["y"]) if (transform_y is not None and i in malicious) else c["y"]
    w, _ = local_sgd(start, c["x"], y, 0.1, 2, 2)
    deltas.append({k: w[k] - start[k] for k in w})
  return start, deltas


@pytest.mark.parametrize("kind", ["sign_flip", "label_flip"])
def test_attacked_fedavg_round_matches_numpy(kind):
  data, params = linear_problem(SIZES)
  base = fedavg(linear_example_loss, client_lr=0.1, schedule=NO_SHUFFLE)
  method = byzantine.with_attack(base, kind, 0.4, scale=10.0, seed=1, num_classes=3)
  state, new = first_round(method, data, params)
  bad = set(np.flatnonzero(np.asarray(state.client_states["tags"]["malicious"])).tolist())
  assert bad == set(np.flatnonzero(byzantine.malicious_clients(5, 0.4, 1)).tolist())
  start, deltas = numpy_deltas(data, params, lambda y: 2 - y, bad if kind == "label_flip" else ())
  if kind == "sign_flip":
    deltas = [{k: -10 * d[k] for k in d} if i in bad else d for i, d in enumerate(deltas)]
  w = np.array(SIZES, np.float64) / sum(SIZES)
  expected = {k: start[k] + sum(wi * d[k] for wi, d in zip(w, deltas)) for k in start}
  tree_close(new.params, expected, atol=1e-5)


def test_attack_with_median_gives_the_same_round_on_vmap_and_sharded():
  data, params = linear_problem((5, 3, 7, 4, 6, 2, 5, 3, 4, 6, 3), seed=2)   # 11: 5 padding
  config = ml_collections.ConfigDict({"attack": "gaussian", "malicious_fraction": 0.3,
                                      "aggregator": "median", "seed": 0})
  method = robust.apply_robustness(fedavg(linear_example_loss, 0.1, schedule=NO_SHUFFLE), config)
  _, vmapped = first_round(method, data, params, "vmap")
  _, sharded = first_round(method, data, params, "sharded")
  tree_close(sharded.params, vmapped.params, atol=1e-5)


# --------------------------------------------------------------------------- DP


def test_dp_clipping_and_noise_std_match_the_formula():
  dim, clients, clip, z, expected = 200_000, 4, 0.5, 1.3, 10.0
  # No noise: the clipped sum over the expected cohort size.
  x = RNG.normal(size=(clients, 8)).astype(np.float32)
  x[0] *= 0.01                                              # one client below the clip
  out, _ = run_agg(privacy.dp_fedavg_aggregator(clip, 0.0, expected), {"v": x},
                   np.ones(clients, np.float32))
  scale = np.minimum(1.0, clip / np.linalg.norm(x, axis=1))
  np.testing.assert_allclose(out["v"], (scale[:, None] * x).sum(0) / expected, atol=1e-6)
  # Noise: zero updates, so the output is pure noise of std z * clip / expected.
  agg = privacy.dp_fedavg_aggregator(clip, z, expected, seed=1)
  out, state = run_agg(agg, {"v": np.zeros((clients, dim), np.float32)},
                       np.array([1, 1, 1, 0], np.float32))
  std = np.std(out["v"])
  assert std == pytest.approx(z * clip / expected, rel=0.01)     # 200k draws: ~0.2% error
  assert abs(np.mean(out["v"])) < 5 * std / np.sqrt(dim)
  out2, _ = run_agg(agg, {"v": np.zeros((clients, dim), np.float32)},
                    np.array([1, 1, 1, 0], np.float32), state)
  assert not np.allclose(out["v"], out2["v"])                    # fresh noise each round


def test_adaptive_clipping_follows_the_geometric_quantile_update():
  norms = np.array([0.2, 0.5, 0.9, 1.5, 3.0])
  x = np.zeros((5, 4), np.float32)
  x[:, 0] = norms
  agg = privacy.dp_fedavg_aggregator(1.0, 0.0, 5.0, adaptive=privacy.AdaptiveClip(0.8, 0.3, 0.0))
  clip = 1.0
  state = agg.init()
  for _ in range(3):
    _, state = run_agg(agg, {"v": x}, np.ones(5, np.float32), state)
    b = np.mean(norms <= clip)
    clip = clip * np.exp(-0.3 * (b - 0.8))
    assert float(state.clip) == pytest.approx(clip, rel=1e-6)
  z = privacy.update_noise_multiplier(1.0, 2.0)
  assert z == pytest.approx((1.0 - 1 / 16) ** -0.5)
  with pytest.raises(ValueError, match="count_noise"):
    privacy.update_noise_multiplier(2.0, 0.5)


def test_epsilon_equals_dp_accounting_and_is_monotone():
  import dp_accounting
  from dp_accounting import pld, rdp
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 10)
  for name, acc in (("rdp", rdp.RdpAccountant()), ("pld", pld.PLDAccountant())):
    acc.compose(event)   # dp-accounting's default precision, as privacy.epsilon uses
    assert privacy.epsilon(1.1, 0.1, 10, 1e-5, name) == pytest.approx(acc.get_epsilon(1e-5),
                                                                      rel=1e-12)
  eps = [privacy.epsilon(1.1, 0.1, r, 1e-5) for r in (10, 30, 90)]
  assert eps[0] < eps[1] < eps[2]
  eps = [privacy.epsilon(z, 0.1, 30, 1e-5) for z in (0.8, 1.1, 2.0)]
  assert eps[0] > eps[1] > eps[2]
  assert privacy.epsilon(0.0, 0.1, 30, 1e-5) == np.inf
  # A fixed-size cohort: replace-one neighbours move the clipped sum by 2 clip, z / 2.
  wor = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  wor.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
      100, 10, dp_accounting.GaussianDpEvent(1.1 / 2)), 30))
  assert privacy.epsilon(1.1, 0.1, 30, 1e-5, sampling="fixed",
                         population=100) == pytest.approx(wor.get_epsilon(1e-5), rel=1e-12)
  config = ml_collections.ConfigDict({"rounds": 10, "clients_per_round": 10, "seed": 0,
                                      "dp": {"clip": 1.0, "noise_multiplier": 1.1}})
  report = robust.privacy_report(config, num_clients=100)
  assert report["dp_epsilon_rdp"] == pytest.approx(privacy.epsilon(1.1, 0.1, 10, 1e-5))
  assert report["dp_sampling_rate"] == 0.1 and report["dp_delta"] == 1e-5
  assert report["dp_sampling"] == "poisson" and report["dp_neighboring"] == "add_remove_one"
  with pytest.raises(ValueError, match="accountant"):
    privacy.epsilon(1.0, 0.1, 3, 1e-5, "moments")


# --------------------------------------------------------------------------- RFFL


def np_reputation_step(r, active, seen, ids, cos, alpha, beta):
  r, active, seen = r.copy(), active.copy(), seen.copy()
  members = seen & active
  prior = r[members].mean() if members.any() else 0.0
  for i, c in zip(ids, cos):
    if active[i]:
      r[i] = alpha * (r[i] if seen[i] else prior) + (1 - alpha) * c
      seen[i] = True
  members = seen & active
  r = np.where(members, r, 0)
  r = r / r.sum()
  active = active & ~(members & (r < beta / members.sum()))
  r = np.where(seen & active, r, 0)
  return r / r.sum(), active, seen


def test_rffl_reputation_update_matches_numpy():
  n, alpha, beta = 6, 0.8, 0.5
  state = rffl_lib.init_reputation(n)
  step_fn = jax.jit(rffl_lib.update_reputation, static_argnums=(4, 5))
  r, active, seen = np.zeros(n), np.ones(n, bool), np.zeros(n, bool)
  rng = np.random.default_rng(7)
  for step in range(5):
    ids = np.arange(n) if step % 2 == 0 else np.array([1, 4, 5])
    cos = rng.uniform(-0.2, 1.0, size=len(ids))
    cos[ids == 2] = -0.5                                     # client 2 disagrees
    state = step_fn(state, jnp.asarray(ids), jnp.ones(len(ids), bool),
                                       jnp.asarray(cos, jnp.float32), alpha, beta)
    r, active, seen = np_reputation_step(r, active, seen, ids, cos, alpha, beta)
    np.testing.assert_allclose(np.asarray(state.reputation), r, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.active), active)
  assert not active[2]


def test_rffl_aggregator_weights_by_reputation_and_uses_cosines():
  m, w = stacked(4, seed=8)
  x = rows(m)
  agg = rffl_lib.reputation_aggregator(alpha=0.5, beta=0.0, num_clients=4)
  msg = {**m, rffl_lib.CLIENT_ID_KEY: np.arange(4, dtype=np.int32)}
  out, state = run_agg(agg, msg, w)
  u = w @ x / w.sum()                                         # round 0: data weights
  np.testing.assert_allclose(rows(jax.tree.map(lambda v: v[None], out))[0], u, atol=1e-5)
  cos = x @ u / (np.linalg.norm(x, axis=1) * np.linalg.norm(u))
  r, _, _ = np_reputation_step(np.zeros(4), np.ones(4, bool), np.zeros(4, bool), range(4), cos,
                               0.5, 0.0)
  np.testing.assert_allclose(np.asarray(state.reputation), r, atol=1e-5)
  out, _ = run_agg(agg, msg, w, state)                        # round 1: reputation weights
  np.testing.assert_allclose(rows(jax.tree.map(lambda v: v[None], out))[0], r @ x / r.sum(),
                             atol=1e-5)


def test_rffl_personalized_round_and_fairness():
  data, params = linear_problem(SIZES)
  base = fedavg(linear_example_loss, client_lr=0.1, schedule=NO_SHUFFLE)
  method = rffl_lib.rffl(base, alpha=0.9, beta=0.0, personalized=True)
  state, new = first_round(method, data, params)
  start, deltas = numpy_deltas(data, params)
  w = np.array(SIZES, np.float64) / sum(SIZES)
  u = {k: sum(wi * d[k] for wi, d in zip(w, deltas)) for k in start}
  tree_close(new.params, {k: start[k] + u[k] for k in start}, atol=1e-5)
  tree_close(find_state(new.rule_state, rffl_lib.RewardState).reward, u, atol=1e-5)
  for i in range(5):
    tree_close(jax.tree.map(lambda v: v[i], rffl_lib.client_models(new)),
               {k: start[k] + deltas[i][k] for k in start}, atol=1e-5)
  # Top-fraction reward: the largest half of |u| per leaf.
  got = rffl_lib.top_fraction({"w": jnp.array([0.1, -3.0, 2.0, 0.5])}, 0.5)["w"]
  np.testing.assert_allclose(got, [0.0, -3.0, 2.0, 0.0])
  assert rffl_lib.fairness([0.5, 0.7, 0.9], [1, 2, 3]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- config


def test_apply_robustness_reads_the_config_and_names_bad_values():
  base = fedavg(linear_example_loss, client_lr=0.1)
  assert robust.apply_robustness(base, ml_collections.ConfigDict({})) is base
  config = ml_collections.ConfigDict({"aggregator": "median", "attack": "sign_flip",
                                      "malicious_fraction": 0.2, "seed": 0,
                                      "clients_per_round": 5})
  method = robust.apply_robustness(base, config)
  assert isinstance(method, byzantine.TaggedAlgorithm)
  with pytest.raises(ValueError, match="Unknown aggregator"):
    robust.apply_robustness(base, ml_collections.ConfigDict({"aggregator": "mode"}))
  with pytest.raises(ValueError, match="Unknown attack"):
    robust.apply_robustness(base, ml_collections.ConfigDict({"attack": "evil",
                                                             "malicious_fraction": 0.1}))
  with pytest.raises(ValueError, match="DP-FedAvg"):
    robust.apply_robustness(base, ml_collections.ConfigDict(
        {"aggregator": "krum", "clients_per_round": 5, "dp": {"clip": 1.0}}))
  with pytest.raises(ValueError, match="dp.clip"):
    robust.apply_robustness(base, ml_collections.ConfigDict(
        {"dp": {"noise_multiplier": 1.0}}))
  from launch.configs import robust_digits
  config = robust_digits.get_config()
  assert robust.privacy_report(config, 20) == {}
  assert isinstance(robust.apply_robustness(base, config).aggregator, byzantine.Aggregator)


# --------------------------------------------------------------------------- digits benchmark


def digits_accuracy(aggregator, fractions, rounds=50, **overrides):
  """Final test accuracies of robust_digits with each malicious fraction (vmapped masks)."""
  from launch import common
  from launch.configs import robust_digits
  from fedjax_lab import metrics
  config = robust_digits.get_config()
  config.update(dict(aggregator=aggregator, malicious_fraction=max(fractions), rounds=rounds,
                     **overrides))
  exp = common.build(config)
  method = robust.apply_robustness(exp.algorithm, config)

  def init(mask):
    state = method.init(exp.init_params, jax.random.PRNGKey(0), exp.train_data.num_clients)
    tags = {**state.client_states["tags"], "malicious": mask}
    return state._replace(client_states={**state.client_states, "tags": tags})

  masks = jnp.stack([byzantine.malicious_clients(config.num_clients, f, config.attack_seed)
                     for f in fractions])
  round_fn = make_round(method, exp.train_data, config.clients_per_round)
  run = jax.jit(jax.vmap(lambda s, a, o: jax.lax.scan(
      lambda s, _: round_fn(s, a, o), s, None, length=rounds)[0], in_axes=(0, None, None)))
  states = run(jax.vmap(init)(masks), *exp.train_data.device_arrays())
  evaluate = metrics.make_evaluator(exp.model)
  test = jax.tree.map(jnp.asarray, exp.test_arrays)
  return np.asarray(jax.vmap(lambda p: evaluate(p, test)["accuracy"])(states.params))


@pytest.mark.slow
def test_digits_sign_flip_x10_breaks_the_mean_but_not_robust_aggregators():
  """20 clients, all in each round, 20% send -10 x their update, 50 rounds (Dirichlet 0.5)."""
  clean, attacked = digits_accuracy("mean", (0.0, 0.2))
  assert clean > 0.93 and attacked < 0.3
  for name, options in (("median", {}), ("multi_krum", {}), ("rffl", {"rffl_clip": 0.5})):
    own_clean, own_attacked = digits_accuracy(name, (0.0, 0.2), **options)
    assert own_attacked > clean - 0.05, (name, clean, own_attacked)
    assert own_attacked > own_clean - 0.05, (name, own_clean, own_attacked)
  # Krum keeps a single client's update: robust, but its clean run already pays on skewed data.
  own_clean, own_attacked = digits_accuracy("krum", (0.0, 0.2))
  assert own_attacked > own_clean - 0.05 and own_attacked > 0.7


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_privacy_report_is_dp_accounting_on_the_event_the_run_samples(sampling):
  import dp_accounting
  from dp_accounting import pld, rdp
  z, cohort, population, rounds, delta = 1.0, 10, 1000, 1000, 1e-5
  report = privacy.report(z, cohort, population, rounds, delta, sampling)
  if sampling == "poisson":
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        cohort / population, dp_accounting.GaussianDpEvent(z)), rounds)
    accountants = {"rdp": rdp.RdpAccountant(), "pld": pld.PLDAccountant()}
    assert report["dp_neighboring"] == "add_remove_one"
  else:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        population, cohort, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    accountants = {"rdp": rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)}
    assert report["dp_neighboring"] == "replace_one" and "dp_epsilon_pld" not in report
  expected = {}
  for name, acc in accountants.items():
    acc.compose(event)
    expected[name] = acc.get_epsilon(delta)
    assert report[f"dp_epsilon_{name}"] == pytest.approx(expected[name], rel=1e-12)
  assert report["dp_epsilon"] == min(expected.values())
  # The numbers of the issue this fixes: fixed-size cohorts are ten times less private.
  assert report["dp_epsilon_rdp"] == pytest.approx(2.10 if sampling == "poisson" else 20.99,
                                                   abs=0.01)


def test_dp_noise_std_is_z_times_clip():
  z, clip, m = 1.3, 0.7, 4.0
  agg = privacy.dp_fedavg_aggregator(clip, z, m, seed=3)
  messages = {"w": jnp.zeros((2, 20000))}
  mean, _ = agg.update(messages, jnp.ones(2), agg.init(), None)
  noise = np.asarray(mean["w"]) * m       # the sum's noise: N(0, (z clip)^2)
  # The sample std of 20,000 normals is within 2% of sigma with overwhelming probability.
  assert abs(noise.std() / (z * clip) - 1) < 0.02
  assert abs(noise.mean()) < 4 * z * clip / np.sqrt(noise.size)


def test_noise_cohort_size_scales_the_noise_and_reports_both_epsilons():
  import dp_accounting
  from dp_accounting import pld
  # M = 10 m: this run's own noise multiplier is z m / M = 0.2 (PLD slows as it shrinks).
  z, clip, m, big = 2.0, 0.5, 4.0, 40
  agg = privacy.dp_fedavg_aggregator(clip, z, m, seed=5, noise_cohort_size=big)
  mean, _ = agg.update({"w": jnp.zeros((2, 20000))}, jnp.ones(2), agg.init(), None)
  noise = np.asarray(mean["w"]) * m       # noise on the simulated sum: z clip m / M
  assert abs(noise.std() / (z * clip * m / big) - 1) < 0.02
  report = privacy.report(z, 4, 1000, 100, 1e-5, "poisson", noise_cohort_size=big)

  def pld_epsilon(q, noise_multiplier):
    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(noise_multiplier)), 100))
    return acc.get_epsilon(1e-5)

  # The deployment: M of N clients at noise multiplier z; this run: m of N at z m / M.
  deployment = privacy.report(z, big, 1000, 100, 1e-5, "poisson")
  assert report["dp_noise_cohort_epsilon"] == deployment["dp_epsilon"]
  assert deployment["dp_epsilon_pld"] == pytest.approx(pld_epsilon(big / 1000, z), rel=1e-12)
  assert report["dp_epsilon_pld"] == pytest.approx(pld_epsilon(4 / 1000, z * 4 / big),
                                                   rel=1e-12)
  assert report["dp_epsilon"] > report["dp_noise_cohort_epsilon"]
  with pytest.raises(ValueError, match="noise_cohort_size=2 must be at least"):
    privacy.dp_fedavg_aggregator(clip, z, m, noise_cohort_size=2)


def test_shuffled_epochs_take_each_client_at_most_once_per_epoch():
  from fedjax_lab import sampling
  n, c = 11, 3                                    # 3 rounds per epoch, 2 clients sit out
  sampler = sampling.shuffled_epochs_sampler(n, c, seed=4)
  cohorts = np.stack([np.asarray(sampler(None, r)) for r in range(9)])
  assert sampling.rounds_per_epoch(n, c) == 3
  for e in range(3):
    ids = cohorts[3 * e:3 * e + 3].ravel()
    assert len(set(ids.tolist())) == 9 and ids.min() >= 0 and ids.max() < n
  # Each epoch is its own permutation, and the round's key plays no part.
  assert not np.array_equal(cohorts[:3], cohorts[3:6])
  np.testing.assert_array_equal(sampler(jax.random.PRNGKey(9), 4), cohorts[4])
  with pytest.raises(ValueError):
    sampling.shuffled_epochs_sampler(3, 4)


def _tree_noise_after(agg, rounds, draws, dim, clip, m):
  """The noise of the model's cumulative update after each round: sum of releases x m."""
  out = np.zeros((draws, rounds, dim))
  zeros = {"w": jnp.zeros((2, dim))}
  for d in range(draws):
    state = agg.init()._replace(key=jax.random.PRNGKey(d))
    total = np.zeros(dim)
    for r in range(rounds):
      mean, state = agg.update(zeros, jnp.ones(2), state, None)
      total = total + np.asarray(mean["w"]) * m
      out[d, r] = total
  return out


def test_dp_ftrl_noise_is_the_trees_prefix_noise():
  # Closed form: after tau rounds of a tree the model holds the noise of the prefix
  # [1, tau], one N(0, (z clip)^2) node per set bit of tau, and two prefixes share the
  # nodes of their common high bits; a restart starts a new tree.
  z, clip, m, per_tree, dim = 1.5, 0.4, 2, 6, 4000
  agg = privacy.tree_aggregation_aggregator(clip, z, m, per_tree, seed=0)
  noise = _tree_noise_after(agg, 8, 2, dim, clip, m)          # [draws, round, dim]
  sigma2 = (z * clip) ** 2
  samples = noise.transpose(1, 0, 2).reshape(8, -1)        # [round, draws * dim]
  for tau in range(1, 9):
    in_tree = tau if tau <= per_tree else per_tree          # rounds 7, 8: tree 2 adds its own
    nodes = bin(in_tree).count("1") + (bin(tau - per_tree).count("1") if tau > per_tree else 0)
    var = samples[tau - 1].var()
    assert abs(var / (nodes * sigma2) - 1) < 0.05, (tau, var, nodes)
  cov = lambda a, b: np.mean(samples[a - 1] * samples[b - 1])
  # tau = 2 (node [1,2]) and 3 ([1,2] + [3]) share one node; 4 ([1,4]) shares none with 3.
  assert abs(cov(2, 3) / sigma2 - 1) < 0.05
  assert abs(cov(3, 4) / sigma2) < 0.05
  # tau = 5 ([1,4] + [5]) and 6 ([1,4] + [5,6]) share [1,4]; the restart at 7 keeps tree 1's
  # last prefix (6 = [1,4] + [5,6]) and adds tree 2's first node.
  assert abs(cov(5, 6) / sigma2 - 1) < 0.05
  assert abs(cov(6, 7) / (2 * sigma2) - 1) < 0.05


def test_dp_ftrl_without_noise_is_the_clipped_mean_and_counts_rounds():
  msgs = {"w": jnp.asarray([[3.0, 4.0], [0.3, 0.4], [9.0, 9.0]])}
  agg = privacy.tree_aggregation_aggregator(1.0, 0.0, 4, 5)
  mean, state = agg.update(msgs, jnp.asarray([1.0, 2.0, 0.0]), agg.init(), None)
  # Clipped to norm 1: (0.6, 0.8) and (0.3, 0.4); the zero-weight client is ignored; / m.
  np.testing.assert_allclose(mean["w"], np.array([0.9, 1.2]) / 4, rtol=1e-6)
  assert int(state.round) == 1


@pytest.mark.parametrize("rounds", [40, 47])
def test_dp_ftrl_epsilon_is_dp_accounting_tree_events(rounds):
  import dp_accounting
  from dp_accounting import rdp
  z, cohort, population, delta = 1.2, 10, 105, 1e-5
  report = privacy.tree_report(z, cohort, population, rounds, delta)
  assert report["dp_rounds_per_tree"] == 10 and report["dp_neighboring"] == "replace_special"
  acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  for start in range(0, rounds, 10):        # one tree per epoch, the last one partial
    acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, min(10, rounds - start)))
  assert report["dp_epsilon"] == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
  assert report["dp_epsilon_rdp"] == report["dp_epsilon"] and "dp_epsilon_pld" not in report
  # RDP of one tree of E rounds: alpha ceil(log2(E + 1)) / (2 z^2) (Kairouz et al., App. D).
  assert privacy.tree_depth(10) == 4 and privacy.tree_depth(7) == 3 and privacy.tree_depth(8) == 4


def test_launch_dp_ftrl_samples_epochs_and_reports_its_epsilon():
  from launch import common
  from launch.configs import robust_digits
  config = robust_digits.get_config()
  config.rounds, config.eval_every, config.num_clients, config.clients_per_round = 4, 4, 20, 10
  config.aggregator, config.attack, config.malicious_fraction = "mean", "none", 0.0
  config.dp.clip, config.dp.noise_multiplier, config.dp.mechanism = 0.5, 1.0, "tree"
  _, history, summary = common.run(config, progress=False)
  assert summary["dp_mechanism"] == "tree_aggregation" and summary["dp_sampling"] == "epochs"
  expected = privacy.tree_epsilon(1.0, 4, 2, summary["dp_delta"])
  assert summary["dp_epsilon"] == pytest.approx(expected, rel=1e-12) and len(history) == 4
  config.dp.sampling = "poisson"
  with pytest.raises(ValueError, match="shuffled epochs only"):
    common.run(config, progress=False)
