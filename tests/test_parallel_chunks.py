"""Chunked client maps: the same numbers as one vmap, less compiled memory.

Aggregators with a ``stream`` (weighted sums) are accumulated chunk by chunk; the
others (median) see the stacked messages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from fedjax_lab import aggregate, parallel, privacy
from fedjax_lab.algorithm import make_round
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import gather_cohort
from reference import linear_example_loss, linear_problem, local_sgd, to_numpy

SIZES = [3, 7, 1, 5, 8, 2, 6, 4, 8, 3, 5, 1, 7]   # 13 clients of unequal sizes
SCHEDULE = LocalSchedule(batch_size=3, epochs=2, shuffle=False)
LR = 0.1


def cohort_inputs(data, params, method, padded):
  """Shared message and per-client inputs for ``padded`` slots (extra slots are empty)."""
  ids = jnp.concatenate([jnp.arange(data.num_clients, dtype=jnp.int32),
                         jnp.full((padded - data.num_clients,), data.num_clients, jnp.int32)])
  arrays, offsets = data.device_arrays()
  cohort, sizes = gather_cohort(arrays, offsets, ids, int(data.max_client_size))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(ids)
  shared = {"params": jax.tree.map(jnp.asarray, params)}
  return shared, ((), cohort, sizes, keys)


def run_mapper(aggregator, backend, chunk_size, mesh=None, padded=None):
  data, params = linear_problem(SIZES)
  method = fedavg(linear_example_loss, LR, 1.0, SCHEDULE)
  padded = padded or parallel.padded_cohort_size(data.num_clients, backend, mesh)
  shared, per_client = cohort_inputs(data, params, method, padded)
  client_fn = lambda down, one: method.client_update(down, one, int(data.max_client_size))
  mapper = parallel.make_mapper(client_fn, aggregator, backend, mesh, chunk_size=chunk_size)
  aggregate_, outputs, _ = jax.jit(mapper)(shared, per_client, aggregator.init())
  return aggregate_["delta"], jax.tree.map(lambda x: x[:data.num_clients], outputs)


def numpy_weighted_delta():
  data, params = linear_problem(SIZES)
  start, total, weight = to_numpy(params), {"w": 0.0, "b": 0.0}, 0.0
  for i, n in enumerate(SIZES):
    client = data.client(i)
    local, _ = local_sgd(params, client["x"], client["y"], LR, SCHEDULE.batch_size,
                         SCHEDULE.epochs)
    for k in total:
      total[k] = total[k] + n * (local[k] - start[k])
    weight += n
  return {k: v / weight for k, v in total.items()}


def assert_same(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol)


# Clips 6 of the 13 clients' deltas (norms 0.07 .. 1.99), so clipping changes the mean.
NORM_BOUND = 0.5
AGGREGATORS = {"mean": aggregate.weighted_mean(),
               "median": aggregate.coordinate_median(),
               "norm_bounded": aggregate.norm_bounded_mean(NORM_BOUND),
               # DP-FedAvg: clipped sum, unclipped count, noise and division at the end.
               "dp": privacy.dp_fedavg_aggregator(NORM_BOUND, 0.3, 13.0, seed=1,
                                                  adaptive=privacy.AdaptiveClip(0.5, 0.2))}


@pytest.fixture(scope="module")
def unchunked():
  return {name: run_mapper(agg, "vmap", None) for name, agg in AGGREGATORS.items()}


def test_unchunked_vmap_matches_numpy_fedavg(unchunked):
  delta, outputs = unchunked["mean"]
  assert_same(delta, numpy_weighted_delta())
  np.testing.assert_array_equal(outputs["weight"], SIZES)
  # The median and the clipped mean differ from the mean, so their cases below test
  # something.
  for name in ("median", "norm_bounded"):
    assert np.max(np.abs(np.asarray(unchunked[name][0]["w"]) - np.asarray(delta["w"]))) > 1e-3


def stream_only(aggregator):
  """``aggregator`` whose stacked ``update`` fails: proves the chunked map streamed."""
  def update(*args, **kwargs):
    raise AssertionError("the stacked update ran; the chunked map should have streamed")
  return aggregator._replace(update=update)


@pytest.mark.parametrize("name,backend,devices,chunk,padded", [
    # 13 = 4 + 4 + 4 + 1: the last chunk (clients 9..12) recomputes 9..11.
    ("mean", "vmap", None, 4, None),
    ("mean", "vmap", None, 1, None),
    ("mean", "sharded", 2, 4, None),       # 14 slots, 7 per device: chunks at 0 and 3
    ("mean", "sharded", 8, 1, None),       # 16 slots, 2 per device, 3 padding clients
    # 48 slots, 6 per device (chunks at 0 and 2); devices 3..7 hold only padding.
    ("mean", "sharded", 8, 4, 48),
    ("norm_bounded", "vmap", None, 4, None),
    ("norm_bounded", "sharded", 8, 4, 48),
    ("dp", "vmap", None, 4, None),
    ("dp", "sharded", 8, 4, 48),
    # Median has no stream: chunked, it still sees the whole stacked cohort.
    ("median", "vmap", None, 4, None),
    ("median", "sharded", 2, 4, None),
    ("median", "sharded", 8, 1, None),
])
def test_chunked_equals_unchunked(unchunked, name, backend, devices, chunk, padded):
  mesh = None if devices is None else parallel.client_mesh(jax.devices()[:devices])
  aggregator = AGGREGATORS[name]
  streams = aggregator.stream is not None
  delta, outputs = run_mapper(stream_only(aggregator) if streams else aggregator, backend,
                              chunk, mesh, padded)
  ref_delta, ref_outputs = unchunked[name]
  assert_same(delta, ref_delta, atol=1e-6 if streams else 1e-5)
  assert_same(outputs["loss"], ref_outputs["loss"])
  np.testing.assert_array_equal(outputs["weight"], SIZES)
  np.testing.assert_array_equal(outputs["num_steps"], ref_outputs["num_steps"])


def test_stream_in_chunks_equals_numpy():
  # The stream alone: chunks of 5 and 8 clients (2 of weight 0) against numpy.
  rng = np.random.default_rng(1)
  messages = {"a": rng.normal(size=(13, 3, 2)).astype(np.float32),
              "b": rng.normal(size=(13,)).astype(np.float32)}
  weights = rng.uniform(1, 5, size=13).astype(np.float32)
  weights[[2, 9]] = 0.0
  stream = aggregate.weighted_mean().stream
  acc = stream.zero(aggregate.message_shapes(messages))
  for part in (slice(0, 5), slice(5, 13)):
    acc = stream.add(acc, jax.tree.map(lambda m: m[part], messages), weights[part], ())
  mean, _ = stream.finish(acc, (), None)
  for k, m in messages.items():
    expected = np.tensordot(weights.astype(np.float64), m, axes=1) / weights.sum()
    np.testing.assert_allclose(mean[k], expected, rtol=1e-5, atol=1e-6)
  whole, _ = aggregate.weighted_mean().update(messages, jnp.asarray(weights), (), None)
  assert_same(mean, whole, atol=1e-6)


def chunked_round(method, data, cohort, chunk_size, monkeypatch):
  del monkeypatch
  return make_round(method, data, cohort, "vmap", chunk_size=chunk_size)


def test_chunked_fedavg_rounds_match(monkeypatch):
  data, params = linear_problem(SIZES)
  method = fedavg(linear_example_loss, LR, 1.0, LocalSchedule(batch_size=3, epochs=1))
  arrays, offsets = data.device_arrays()
  finals = []
  for chunk in (None, 4):
    round_fn = jax.jit(chunked_round(method, data, 9, chunk, monkeypatch))
    state = method.init(jax.tree.map(jnp.asarray, params), jax.random.PRNGKey(3),
                        data.num_clients)
    for _ in range(2):
      state, metrics = round_fn(state, arrays, offsets)
    finals.append((state.params, metrics["train_loss"]))
  assert_same(finals[0], finals[1])


def temp_bytes_512(cases):
  """Compiled temp bytes of the vmap mapper at 512 clients, by ``(chunk, streamed)``."""
  # 512 clients of 16 examples, a 64-feature linear model, batch 8.
  data, params = linear_problem([16] * 512, dim=64)
  method = fedavg(linear_example_loss, LR, 1.0, LocalSchedule(batch_size=8, epochs=1))
  shared, per_client = cohort_inputs(data, params, method, 512)
  client_fn = lambda down, one: method.client_update(down, one, 16)
  temps = {}
  for chunk, streamed in cases:
    aggregator = method.aggregator if streamed else method.aggregator._replace(stream=None)
    mapper = parallel.make_mapper(client_fn, aggregator, "vmap", chunk_size=chunk)
    compiled = jax.jit(mapper).lower(shared, per_client, ()).compile()
    temps[chunk, streamed] = compiled.memory_analysis().temp_size_in_bytes
  return temps


def test_compiled_temp_memory_shrinks_with_chunk_size_and_streaming():
  temps = temp_bytes_512([(None, True), (16, True), (13, True), (16, False)])
  print("temp bytes by (chunk size, streamed):", temps)
  # Measured: unchunked 4,271,424 (1,377,224 before the first local step left the scan);
  # chunk 16 134,840 streamed, 269,624 stacked; chunk 13 110,008 streamed.
  assert temps[16, True] < 0.25 * temps[None, True]
  # A chunk that does not divide 512 must not copy the cohort (lax.map's remainder does).
  assert temps[13, True] < 0.25 * temps[None, True]
  # Streaming drops the [512, 65] float32 stack of messages (133,120 bytes): 2.0x here.
  message_bytes = 512 * 65 * 4
  assert temps[16, False] - temps[16, True] > 0.9 * message_bytes
  assert temps[16, True] < 0.55 * temps[16, False]


@pytest.mark.slow
def test_compiled_temp_memory_grows_with_chunk_size():
  temps = temp_bytes_512([(None, False), (64, False), (16, False), (64, True), (16, True)])
  # Measured: unchunked 1,377,224; chunk 64 574,200 stacked, 439,672 streamed;
  # chunk 16 246,008 stacked, 111,096 streamed.
  for streamed in (False, True):
    assert temps[16, streamed] < temps[64, streamed] < 0.5 * temps[None, False]


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_chunk_size_is_a_clear_error(bad):
  with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
    parallel.make_mapper(lambda s, c: c, aggregate.weighted_mean(), "vmap", chunk_size=bad)
