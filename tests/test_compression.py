"""Compressors against numpy, their unbiasedness to a variance bound, and compressed rounds
(error feedback, downlink, SCAFFOLD, FedHyper, a robust aggregator, backends) against numpy."""
import heapq
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from algorithms import fedhyper as fh
from algorithms.fedavg import fedavg
from algorithms.scaffold import global_control, scaffold
from fedjax_lab import aggregate, compression
from fedjax_lab.client import LocalSchedule
from launch import compression as compression_launch
from reference import linear_example_loss, linear_problem, local_sgd, run_rounds, to_numpy, tree_close

SIZES = (5, 3, 7, 4, 6)
NO_SHUFFLE = LocalSchedule(batch_size=2, epochs=2, shuffle=False)
LR = 0.1


# --------------------------------------------------------------------------- numpy references


def np_top_k(x, fraction):
  flat = np.asarray(x, np.float64).reshape(-1)
  k = max(1, min(flat.size, math.ceil(fraction * flat.size)))
  idx = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[idx] = flat[idx]
  bits = 32 * k + min(k * math.ceil(math.log2(flat.size)) if flat.size > 1 else 0, flat.size)
  return out.reshape(np.shape(x)), bits


def heapq_code_lengths(counts):
  """Huffman code lengths by the textbook heap construction (absent symbols: 0)."""
  heap = [(c, i, [i]) for i, c in enumerate(counts) if c > 0]
  lengths = [0] * len(counts)
  if len(heap) == 1:
    lengths[heap[0][1]] = 1
    return lengths
  heapq.heapify(heap)
  tie = len(counts)
  while len(heap) > 1:
    ca, _, a = heapq.heappop(heap)
    cb, _, b = heapq.heappop(heap)
    for s in a + b:
      lengths[s] += 1
    heapq.heappush(heap, (ca + cb, tie, a + b))
    tie += 1
  return lengths


def np_rounds(params, data, rounds, compress=None, ef=None, combine=None, server=None):
  """Full-participation FedAvg-style rounds in float64 with per-client compressed deltas.

  ``compress(delta) -> delta_hat`` per leaf, ``ef`` None / 'ef' / 'ef21' with its state
  per client, ``combine(deltas, weights)`` (default weighted mean), ``server(x, agg,
  r) -> x``. Returns the params after each round and the final per-client ef states.
  """
  compress = compress or (lambda v: v)
  x = to_numpy(params)
  n = data.num_clients
  state = [{k: np.zeros_like(v) for k, v in x.items()} for _ in range(n)]
  weights = np.array([len(data.client(i)["y"]) for i in range(n)], np.float64)
  history = []
  for r in range(rounds):
    sent = []
    for i in range(n):
      c = data.client(i)
      w, _ = local_sgd(x, c["x"], c["y"], LR, 2, 2)
      delta = {k: w[k] - x[k] for k in w}
      if ef == "ef":
        p = {k: delta[k] + state[i][k] for k in delta}
        m = {k: compress(p[k]) for k in p}
        state[i] = {k: p[k] - m[k] for k in p}
      elif ef == "ef21":
        m = {k: state[i][k] + compress(delta[k] - state[i][k]) for k in delta}
        state[i] = m
      else:
        m = {k: compress(delta[k]) for k in delta}
      sent.append(m)
    if combine is None:
      agg = {k: sum(wi * s[k] for wi, s in zip(weights, sent)) / weights.sum() for k in x}
    else:
      agg = combine(sent, weights)
    x = server(x, agg, r) if server else {k: x[k] + agg[k] for k in x}
    history.append(x)
  return history, state


# --------------------------------------------------------------------------- compressors


def test_top_k_keeps_the_largest_entries_and_counts_their_bits():
  x = np.random.default_rng(0).normal(size=(7, 9)).astype(np.float32)
  out, bits = compression.top_k(0.2).compress(jnp.asarray(x), None)
  ref, ref_bits = np_top_k(x, 0.2)
  np.testing.assert_array_equal(np.asarray(out), ref.astype(np.float32))
  assert int(bits) == ref_bits == 32 * 13 + min(13 * 6, 63)
  assert compression.top_k(0.2).max_bits(63) == ref_bits


@pytest.mark.parametrize("seed", range(6))
def test_huffman_code_lengths_match_the_heap_construction(seed):
  rng = np.random.default_rng(seed)
  counts = rng.integers(0, 40, size=int(rng.integers(2, 9)))
  counts[0] = max(counts[0], 1)
  ours = np.asarray(compression.huffman_code_lengths(jnp.asarray(counts)))
  ref = np.array(heapq_code_lengths(list(counts)))
  # Huffman trees differ on ties, their cost does not.
  assert int(np.sum(counts * ours)) == int(np.sum(counts * ref))
  assert np.all((ours > 0) == (counts > 0))
  assert np.sum(2.0 ** -ours[counts > 0]) <= 1.0        # Kraft: a prefix code exists


def test_huffman_code_lengths_exactly_without_ties():
  for counts, lengths in (([1, 2, 4, 8, 16], [4, 4, 3, 2, 1]), ([5, 0, 9, 0], [1, 0, 1, 0]),
                          ([0, 7, 0], [0, 1, 0])):
    np.testing.assert_array_equal(np.asarray(compression.huffman_code_lengths(jnp.asarray(counts))),
                                  lengths)
    assert heapq_code_lengths(counts) == lengths


def test_fedzip_is_top_z_then_kmeans_then_huffman_with_exact_bits():
  x = np.random.default_rng(1).normal(size=(300,)).astype(np.float32)
  comp = compression.fedzip(0.1, clusters=3, iterations=50)
  out, bits = comp.compress(jnp.asarray(x), None)
  out = np.asarray(out)
  kept = np.argsort(-np.abs(x), kind="stable")[:30]
  assert set(np.flatnonzero(out)) == set(kept)
  centroids = np.unique(out[kept])
  assert len(centroids) == 3
  ids = np.argmin(np.abs(x[kept][:, None] - centroids[None]), axis=1)
  np.testing.assert_array_equal(centroids[ids], out[kept])    # each value at its nearest centroid
  for j, c in enumerate(centroids):                           # Lloyd's fixed point
    np.testing.assert_allclose(c, x[kept][ids == j].mean(), rtol=1e-5)
  counts = np.bincount(ids, minlength=3)
  huffman = int(np.sum(counts * np.array(heapq_code_lengths(list(counts)))))
  assert int(bits) == min(30 * 9, 300) + huffman + 32 * 3 + 3 * 2
  assert int(bits) <= comp.max_bits(300)


def test_hadamard_is_scipys_normalised_and_its_own_inverse():
  x = np.random.default_rng(2).normal(size=(3, 16)).astype(np.float32)
  h = scipy.linalg.hadamard(16) / 4.0
  np.testing.assert_allclose(np.asarray(compression.hadamard(jnp.asarray(x))), x @ h.T, atol=1e-5)
  np.testing.assert_allclose(np.asarray(compression.hadamard(compression.hadamard(jnp.asarray(x)))),
                             x, atol=1e-5)


def _draws(comp, x, n=4000):
  keys = jax.random.split(jax.random.PRNGKey(3), n)
  out, bits = jax.jit(jax.vmap(lambda k: comp.compress(jnp.asarray(x), k)))(keys)
  return np.asarray(out, np.float64), np.asarray(bits)


X = np.random.default_rng(4).normal(size=(37,)).astype(np.float32)


def _qsgd_variance(x, bits, norm, bucket):
  s = 2 ** (bits - 1) - 1
  var = np.zeros(x.size)
  for lo in range(0, x.size, bucket or x.size):
    b = x[lo:lo + (bucket or x.size)].astype(np.float64)
    r = np.linalg.norm(b) if norm == "l2" else np.max(np.abs(b))
    p = s * np.abs(b) / r - np.floor(s * np.abs(b) / r)
    var[lo:lo + b.size] = (r / s) ** 2 * p * (1 - p)
  return var


@pytest.mark.parametrize("name,comp,variance", [
    ("random_k", compression.random_k(0.25),
     X.astype(np.float64) ** 2 * (37 / math.ceil(0.25 * 37) - 1)),
    ("qsgd_l2", compression.qsgd(3, "l2"), _qsgd_variance(X, 3, "l2", None)),
    ("qsgd_linf_buckets", compression.qsgd(2, "linf", 8), _qsgd_variance(X, 2, "linf", 8)),
    # pi_srk: Var(x_hat_i) <= (max y - min y)^2 / (4 (2^b - 1)^2) <= ||x||^2 / (2^b - 1)^2.
    ("rotated", compression.rotated(2), np.full(37, np.sum(X.astype(np.float64) ** 2) / 9)),
])
def test_unbiased_compressors_average_to_their_input(name, comp, variance):
  out, bits = _draws(comp, X)
  n = out.shape[0]
  mean = out.mean(0)
  # Every coordinate within 5 standard deviations of its mean (the variance, or its bound).
  assert np.all(np.abs(mean - X) <= 5 * np.sqrt(variance / n) + 1e-6), name
  assert np.all(out.var(0) <= 1.25 * variance + 1e-9), name
  assert np.max(out.var(0)) > 1e-4, name                  # really random
  assert len(set(bits.tolist())) == 1 and int(bits[0]) <= comp.max_bits(37)
  if name.startswith("qsgd"):                             # the variance is exact there
    np.testing.assert_allclose(out.var(0), variance, rtol=0.2, atol=1e-6)


def test_bit_counts_of_fixed_rate_compressors():
  x = jnp.ones((37,))
  cases = {compression.identity(): 32 * 37, compression.random_k(0.25): 32 * 10,
           compression.sign(): 37 + 32, compression.sign(vote=True): 37,
           compression.qsgd(4): 4 * 37 + 32, compression.qsgd(4, bucket_size=8): 4 * 37 + 32 * 5,
           compression.rotated(4): 4 * 64 + 64}
  for comp, expected in cases.items():
    assert int(comp.compress(x, jax.random.PRNGKey(0))[1]) == expected == comp.max_bits(37), comp.name


# --------------------------------------------------------------------------- compressed rounds


def _topk_np(fraction):
  return lambda v: np_top_k(v, fraction)[0]


@pytest.mark.parametrize("kind", ["ef", "ef21"])
def test_error_feedback_residuals_over_two_rounds_match_numpy(kind):
  data, params = linear_problem(SIZES)
  base = fedavg(linear_example_loss, client_lr=LR, schedule=NO_SHUFFLE)
  method = compression.compressed(base, compression.top_k(0.34), error_feedback=kind)
  states = run_rounds(method, data, params, 2)
  history, ef = np_rounds(params, data, 2, _topk_np(0.34), kind)
  for state, expected in zip(states[1:], history):
    tree_close(state.params, expected, atol=1e-5)
  table = states[-1].client_states["ef"]["delta"]
  for i in range(data.num_clients):
    tree_close({k: v[i] for k, v in table.items()}, ef[i], atol=1e-5)
  # w: 3 entries, 2 kept: 64 value bits + min(2 * 2, 3) position bits; b: 32 bits.
  report = compression.report(states[-1])
  assert report["uplink_bits"] == 2 * 5 * (64 + 3 + 32)
  assert report["uplink_bits_uncompressed"] == 2 * 5 * 32 * 4
  assert report["downlink_bits"] == report["downlink_bits_uncompressed"] == 2 * 5 * 32 * 4
  assert report["client_rounds"] == 10


def test_downlink_compression_tracks_the_clients_model():
  data, params = linear_problem(SIZES)
  base = fedavg(linear_example_loss, client_lr=LR, schedule=NO_SHUFFLE)
  method = compression.compressed(base, compression.identity(),
                                  downlink=compression.top_k(0.34))
  states = run_rounds(method, data, params, 2)
  x0 = to_numpy(params)
  # Round 1: the clients hold x0 already, so they train from it.
  x1, _ = np_rounds(params, data, 1)
  x1 = x1[0]
  tree_close(states[1].params, x1, atol=1e-5)
  # Round 2: they hold x0 + C(x1 - x0) and train from there; the server steps from x1.
  held = {k: x0[k] + np_top_k(x1[k] - x0[k], 0.34)[0] for k in x0}
  moved, _ = np_rounds(held, data, 1)
  expected = {k: x1[k] + moved[0][k] - held[k] for k in x1}
  tree_close(states[2].params, expected, atol=1e-5)
  tree_close(compression.comm_state(states[2]).reference, held, atol=1e-6)
  assert compression.report(states[2])["downlink_bits"] == 2 * 5 * (64 + 3 + 32)


def test_scaffold_with_both_messages_compressed_matches_numpy():
  data, params = linear_problem(SIZES)
  base = scaffold(linear_example_loss, client_lr=LR, schedule=NO_SHUFFLE)
  method = compression.compressed(base, compression.top_k(0.34), keys=("delta", "control_delta"))
  state = run_rounds(method, data, params, 1)[-1]
  x0 = to_numpy(params)
  deltas, controls = [], []
  for i in range(data.num_clients):
    c = data.client(i)
    w, steps = local_sgd(x0, c["x"], c["y"], LR, 2, 2)   # c = c_i = 0: no correction
    deltas.append({k: np_top_k(w[k] - x0[k], 0.34)[0] for k in w})
    controls.append({k: np_top_k((x0[k] - w[k]) / (steps * LR), 0.34)[0] for k in w})
  mean = lambda ts: {k: np.mean([t[k] for t in ts], 0) for k in x0}   # uniform weighting
  tree_close(state.params, {k: x0[k] + mean(deltas)[k] for k in x0}, atol=1e-5)
  tree_close(global_control(state), mean(controls), atol=1e-4)
  # Both entries compressed: 2 x (64 + 3 + 32) bits per client; downlink params + c.
  report = compression.report(state)
  assert report["uplink_bits"] == 5 * 2 * 99
  assert report["downlink_bits"] == 5 * 2 * 32 * 4


def test_fedhyper_rates_see_the_compressed_aggregate():
  data, params = linear_problem(SIZES)
  base = fh.on_top(fedavg(linear_example_loss, client_lr=LR, schedule=NO_SHUFFLE),
                   fh.fedhyper_global(hyper_lr=0.7))
  method = compression.compressed(base, compression.top_k(0.34), error_feedback="ef")
  states = run_rounds(method, data, params, 3)
  rule = fh.fedhyper_global(hyper_lr=0.7)
  rule_state = [rule.init(to_numpy(params))]

  def server(x, agg, r):
    g = {k: -v for k, v in agg.items()}
    out, rule_state[0] = rule.update(g, rule_state[0], x)
    return {k: x[k] - np.asarray(out[k]) for k in x}    # server_tx = sgd(1)

  history, _ = np_rounds(params, data, 3, _topk_np(0.34), "ef", server=server)
  for state, expected in zip(states[1:], history):
    tree_close(state.params, expected, atol=1e-4)
  ours = fh.global_rate(states[-1].rule_state)
  assert abs(float(ours) - float(fh.global_rate(rule_state[0]))) < 1e-4
  assert abs(float(ours) - 1.0) > 1e-3                    # the rate moved


def test_robust_aggregator_takes_the_median_of_compressed_updates():
  data, params = linear_problem(SIZES)
  base = fedavg(linear_example_loss, client_lr=LR, schedule=NO_SHUFFLE)
  import dataclasses
  base = dataclasses.replace(base, aggregator=aggregate.coordinate_median())
  method = compression.compressed(base, compression.top_k(0.34))
  state = run_rounds(method, data, params, 1)[-1]
  median = lambda sent, w: {k: np.median([s[k] for s in sent], 0) for k in sent[0]}
  history, _ = np_rounds(params, data, 1, _topk_np(0.34), combine=median)
  tree_close(state.params, history[0], atol=1e-5)


def test_majority_vote_steps_by_the_sign_of_the_summed_signs():
  data, params = linear_problem(SIZES)
  base = fedavg(linear_example_loss, client_lr=LR, server_lr=0.01, schedule=NO_SHUFFLE)
  method = compression.compressed(base, compression.sign(vote=True))
  state = run_rounds(method, data, params, 1)[-1]
  vote = lambda sent, w: {k: np.sign(sum(wi * np.sign(s[k]) for wi, s in zip(w, sent)))
                          for k in sent[0]}
  history, _ = np_rounds(params, data, 1, lambda v: v, combine=vote,
                         server=lambda x, agg, r: {k: x[k] + 0.01 * agg[k] for k in x})
  tree_close(state.params, history[0], atol=1e-6)
  assert compression.report(state)["uplink_bits"] == 5 * 4


def test_compressed_rounds_agree_on_vmap_and_sharded():
  data, params = linear_problem((5, 3, 7, 4, 6, 2, 5, 3, 4, 6, 3), seed=2)   # 11: 5 padding
  base = fedavg(linear_example_loss, client_lr=LR, schedule=NO_SHUFFLE)
  method = compression.compressed(base, compression.qsgd(3), error_feedback="ef",
                                  downlink=compression.rotated(4))
  vmapped = run_rounds(method, data, params, 2, clients_per_round=7)[-1]
  sharded = run_rounds(method, data, params, 2, clients_per_round=7, backend="sharded")[-1]
  tree_close(sharded.params, vmapped.params, atol=1e-5)
  tree_close(sharded.client_states["ef"]["delta"], vmapped.client_states["ef"]["delta"], atol=1e-5)
  assert compression.report(sharded) == compression.report(vmapped)
  assert compression.report(vmapped)["client_rounds"] == 14


def test_launch_keys_build_the_compressed_method_and_reject_bad_ones():
  config = ml_collections.ConfigDict({"compression": "qsgd", "compression_bits": 4,
                                      "error_feedback": True, "seed": 0})
  base = fedavg(linear_example_loss, client_lr=LR, schedule=NO_SHUFFLE)
  method = compression_launch.apply_compression(base, config)
  data, params = linear_problem(SIZES)
  state = run_rounds(method, data, params, 1)[-1]
  assert compression.report(state)["uplink_bits"] == 5 * ((4 * 3 + 32) + (4 + 32))
  assert compression_launch.apply_compression(base, ml_collections.ConfigDict({})) is base
  from launch.configs import fal_digits, fedavg_digits
  for get_config in (fedavg_digits.get_config, fal_digits.get_config):   # shared keys, off
    assert compression_launch.apply_compression(base, get_config()) is base
    assert get_config().compression == "none" and get_config().error_feedback is False
  for bad, match in (({"compression": "zip"}, "Unknown compression"),
                     ({"error_feedback": True}, "needs a compressor"),
                     ({"compression": "qsgd", "compression_bits": 1}, "bits in"),
                     ({"compression": "top_k", "compression_fraction": 0.0}, "fraction")):
    with pytest.raises(ValueError, match=match):
      compression_launch.apply_compression(base, ml_collections.ConfigDict(bad))
