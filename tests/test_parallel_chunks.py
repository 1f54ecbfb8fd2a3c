"""Chunked client maps: the same numbers as one vmap, less compiled memory."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from fedjax_lab import aggregate, parallel
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


def run_mapper(aggregator, backend, chunk_size, mesh=None):
  data, params = linear_problem(SIZES)
  method = fedavg(linear_example_loss, LR, 1.0, SCHEDULE)
  padded = parallel.padded_cohort_size(data.num_clients, backend, mesh)
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


@pytest.fixture(scope="module")
def unchunked():
  return {name: run_mapper(agg, "vmap", None)
          for name, agg in (("mean", aggregate.weighted_mean()),
                            ("median", aggregate.coordinate_median()))}


def test_unchunked_vmap_matches_numpy_fedavg(unchunked):
  delta, outputs = unchunked["mean"]
  assert_same(delta, numpy_weighted_delta())
  np.testing.assert_array_equal(outputs["weight"], SIZES)
  # The median differs from the mean here, so the median cases below test something.
  assert np.max(np.abs(np.asarray(unchunked["median"][0]["w"]) - np.asarray(delta["w"]))) > 1e-3


@pytest.mark.parametrize("name,aggregator", [("mean", aggregate.weighted_mean()),
                                             ("median", aggregate.coordinate_median())])
@pytest.mark.parametrize("backend,devices,chunk", [
    ("vmap", None, 4),      # 13 = 4 + 4 + 4 + 1: the last chunk overlaps the one before
    ("vmap", None, 1),
    ("sharded", 2, 4),      # 14 slots, 7 per device: chunks at 0 and 3
    ("sharded", 8, 1),      # 16 slots, 2 per device
])
def test_chunked_equals_unchunked_vmap(unchunked, name, aggregator, backend, devices, chunk):
  mesh = None if devices is None else parallel.client_mesh(jax.devices()[:devices])
  delta, outputs = run_mapper(aggregator, backend, chunk, mesh)
  ref_delta, ref_outputs = unchunked[name]
  assert_same(delta, ref_delta)
  assert_same(outputs["loss"], ref_outputs["loss"])
  np.testing.assert_array_equal(outputs["num_steps"], ref_outputs["num_steps"])


def chunked_round(method, data, cohort, chunk_size, monkeypatch):
  if "chunk_size" in inspect.signature(make_round).parameters:
    return make_round(method, data, cohort, "vmap", chunk_size=chunk_size)
  original = parallel.make_mapper
  monkeypatch.setattr(parallel, "make_mapper",
                      lambda *a, **k: original(*a, **{**k, "chunk_size": chunk_size}))
  return make_round(method, data, cohort, "vmap")


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


def test_compiled_temp_memory_shrinks_with_chunk_size():
  # 512 clients of 16 examples, a 64-feature linear model, batch 8.
  data, params = linear_problem([16] * 512, dim=64)
  method = fedavg(linear_example_loss, LR, 1.0, LocalSchedule(batch_size=8, epochs=1))
  shared, per_client = cohort_inputs(data, params, method, 512)
  client_fn = lambda down, one: method.client_update(down, one, 16)
  temps = {}
  for chunk in (None, 64, 16, 13):
    mapper = parallel.make_mapper(client_fn, method.aggregator, "vmap", chunk_size=chunk)
    compiled = jax.jit(mapper).lower(shared, per_client, ()).compile()
    temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
  print("temp bytes by chunk size:", temps)
  # Measured: None 1,377,224; 64 574,200; 16 246,008; 13 225,656 bytes.
  assert temps[16] < 0.25 * temps[None]
  assert temps[16] < temps[64] < 0.5 * temps[None]
  # A chunk that does not divide 512 must not copy the cohort (lax.map's remainder does).
  assert temps[13] < 0.25 * temps[None]


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_chunk_size_is_a_clear_error(bad):
  with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
    parallel.make_mapper(lambda s, c: c, aggregate.weighted_mean(), "vmap", chunk_size=bad)
