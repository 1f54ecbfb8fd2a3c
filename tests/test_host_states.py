"""Client-state tables on the host: same numbers as the device table, device memory flat in N."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from algorithms.scaffold import global_control, scaffold
from fedjax_lab import host_states, parallel
from fedjax_lab.algorithm import make_multi_round, make_round, sample_cohort
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import FederatedData
from reference import linear_example_loss, linear_problem, run_rounds

SIZES = (5, 3, 7, 2, 9, 4, 6, 1, 8, 3, 5, 2)


def scaffold_method():
  return scaffold(linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=2, epochs=2))


def init_state(method, data, params=None):
  params = params or {"w": jnp.ones(3), "b": jnp.zeros(())}
  return method.init(params, jax.random.PRNGKey(7), data.num_clients)


def device_rounds(method, data, cohort, backend, rounds):
  return run_rounds(method, data, init_state(method, data).params, rounds, cohort, seed=7,
                    backend=backend)


def assert_same(host_state, table, device_state, atol=1e-6):
  np.testing.assert_allclose(host_state.params["w"], device_state.params["w"], atol=atol)
  np.testing.assert_allclose(host_state.params["b"], device_state.params["b"], atol=atol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol),
               host_state.extra, device_state.extra)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol),
               table, jax.device_get(device_state.client_states))
  assert int(host_state.round) == int(device_state.round)


@pytest.mark.parametrize("backend", ["vmap", "sharded"])
def test_host_table_rounds_equal_device_table_rounds(backend, tmp_path):
  data, _ = linear_problem(SIZES, seed=2)
  method = scaffold_method()
  device = device_rounds(method, data, 5, backend, rounds=4)
  round_fn = host_states.make_host_state_round(method, data, 5, backend)
  arrays, offsets = data.device_arrays()
  if backend == "vmap":
    # The same rounds with the table in np.memmap files (for tables larger than RAM).
    state = init_state(method, data)._replace(client_states=())
    table = host_states.init_host_table(method, state.params, data.num_clients,
                                        directory=str(tmp_path))
    assert all(isinstance(x, np.memmap) for x in jax.tree.leaves(table))
    for r in range(4):
      state, _ = round_fn(state, table, arrays, offsets)
    assert_same(state, table, device[4])
  state, table = host_states.split_state(init_state(method, data))
  touched = set()
  for r in range(4):
    ids, _ = sample_cohort(state, data.num_clients, 5)
    touched |= set(np.asarray(ids).tolist())
    state, metrics = round_fn(state, table, arrays, offsets)
    assert_same(state, table, device[r + 1])
  # The test can fail: clients sampled in some round hold non-zero control variates,
  # the others still zero, and the server control variate moved.
  moved = np.flatnonzero(np.any(table["w"] != 0, axis=1))
  assert set(moved.tolist()) == touched and len(touched) < data.num_clients
  assert np.abs(np.asarray(global_control(state)["w"])).max() > 1e-3
  # Sharded: cohort 5 over 8 devices, so every round also ran 3 padding clients (id 12).
  assert parallel.padded_cohort_size(5, backend) == (8 if backend == "sharded" else 5)


def test_multi_round_host_table_equals_device_scan():
  data, _ = linear_problem(SIZES, seed=5)
  method = scaffold_method()
  # Cohorts of 6 of 12 clients over 3 rounds overlap: a client's row is read after
  # the round that wrote it, inside one call.
  run = make_multi_round(make_round(method, data, 6, "vmap"), "vmap")
  arrays, offsets = data.device_arrays()
  device_state, device_metrics = run(init_state(method, data), arrays, offsets, 3)
  host_run = host_states.make_host_state_multi_round(method, data, 6, "vmap")
  state, table = host_states.split_state(init_state(method, data))
  # Deferred: the table is untouched until the returned rows are written.
  before = jax.tree.map(np.copy, table)
  state, metrics, update = host_run.deferred(state, table, arrays, offsets, 3)
  jax.tree.map(np.testing.assert_array_equal, table, before)
  assert update.ids.shape == (18,) and update.rows["w"].shape == (18, 3)
  update.write(table)
  assert_same(state, table, device_state)
  np.testing.assert_allclose(metrics["train_loss"], device_metrics["train_loss"], rtol=1e-6)
  state, metrics = host_run(state, table, arrays, offsets, 3)
  device_state, _ = run(device_state, arrays, offsets, 3)
  assert_same(state, table, device_state)
  assert host_run.scan_rounds._cache_size() == 1


def test_padding_ids_read_zeros_and_are_dropped_on_write():
  table = {"a": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(4, np.int32)}
  rows = host_states.gather_rows(table, np.array([2, 4, 0, 4]))
  np.testing.assert_array_equal(rows["a"], [[6, 7, 8], [0, 0, 0], [0, 1, 2], [0, 0, 0]])
  np.testing.assert_array_equal(rows["b"], [1, 0, 1, 0])
  host_states.scatter_rows(table, np.array([1, 4]), {"a": np.full((2, 3), -1.0),
                                                     "b": np.array([7, 9])})
  np.testing.assert_array_equal(table["a"][1], [-1, -1, -1])
  np.testing.assert_array_equal(table["b"], [1, 7, 1, 1])


def test_bad_state_or_table_is_named():
  data, _ = linear_problem((3, 4, 2), seed=0)
  method = scaffold_method()
  round_fn = host_states.make_host_state_round(method, data, 2)
  arrays, offsets = data.device_arrays()
  full = init_state(method, data)
  state, table = host_states.split_state(full)
  with pytest.raises(ValueError, match="without its client table"):
    round_fn(full, table, arrays, offsets)
  with pytest.raises(ValueError, match="leading axis of 3 clients"):
    round_fn(state, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)},
             arrays, offsets)
  with pytest.raises(ValueError, match="keeps per-client state"):
    round_fn(state, (), arrays, offsets)


def test_stateless_method_has_an_empty_table():
  method = fedavg(linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=2))
  assert host_states.init_host_table(method, {"w": jnp.ones(3)}, 10) == ()
  params = {"w": jnp.ones(3), "b": jnp.zeros(())}
  table = host_states.init_host_table(scaffold_method(), params, 10)
  assert table["w"].shape == (10, 3) and not table["w"].any()
  host_states.scatter_rows(table, np.array([3]), {"w": np.ones((1, 3)), "b": np.ones(1)})
  assert table["w"].sum() == 3 and table["b"][3] == 1 and table["b"].sum() == 1


def one_example_population(num_clients, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, dim)).astype(np.float32)
  y = x[:, 0].astype(np.float32)
  return FederatedData({"x": x, "y": y}, np.arange(num_clients + 1))


def argument_bytes(lowered):
  return sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape))
             for a in jax.tree.leaves(lowered.in_avals))


def test_hundred_thousand_clients_keep_their_table_on_host():
  dim, cohort = 16, 10
  method = scaffold(linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=1, steps=2))
  params = {"w": jnp.zeros(dim), "b": jnp.zeros(())}
  per_client = (dim + 1) * 4
  host_bytes, device_bytes = {}, {}
  for n in (1_000, 100_000):
    data = one_example_population(n, dim)
    arrays, offsets = data.device_arrays()
    data_bytes = sum(x.nbytes for x in jax.tree.leaves((arrays, offsets)))
    state = method.init(params, jax.random.PRNGKey(1), 1)._replace(client_states=())
    table = host_states.init_host_table(method, params, n)
    assert host_states.table_bytes_per_client(table) == per_client
    round_fn = host_states.make_host_state_round(method, data, cohort)
    lowered = round_fn.core.lower(state, np.arange(cohort, dtype=np.int32),
                                  host_states.gather_rows(table, np.arange(cohort)),
                                  arrays, offsets)
    host_bytes[n] = argument_bytes(lowered) - data_bytes
    device_state = method.init(params, jax.random.PRNGKey(1), n)
    device_bytes[n] = argument_bytes(
        jax.jit(make_round(method, data, cohort)).lower(device_state, arrays, offsets)
    ) - data_bytes
  # The compiled program's arguments besides the data: the state and 10 rows, not 100,000.
  memory = lowered.compile().memory_analysis()
  if memory is not None:
    assert memory.argument_size_in_bytes - data_bytes < 2 * cohort * per_client + 1024
  touched = set()
  for _ in range(3):
    ids, _ = sample_cohort(state, n, cohort)
    touched |= set(np.asarray(ids).tolist())
    state, metrics = round_fn(state, table, arrays, offsets)
  assert np.isfinite(float(metrics["train_loss"])) and int(state.round) == 3
  assert set(np.flatnonzero(np.any(table["w"] != 0, axis=1)).tolist()) == touched
  # Host path: what the round takes besides the data does not depend on N.
  assert host_bytes[1_000] == host_bytes[100_000] < 2 * cohort * per_client + 1024
  # Device path: it grows by the table, (N2 - N1) rows of 68 bytes.
  assert device_bytes[100_000] - device_bytes[1_000] == 99_000 * per_client


@pytest.mark.slow   # the loop backend runs op by op: ~6 s
def test_loop_backend_host_table_equals_device_loop():
  data, _ = linear_problem((3, 2, 4, 2), seed=3)
  method = scaffold(linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=4))
  arrays, offsets = data.device_arrays()
  device_state, device_metrics = make_multi_round(make_round(method, data, 3, "loop"), "loop")(
      init_state(method, data), arrays, offsets, 2)
  host_run = host_states.make_host_state_multi_round(method, data, 3, "loop")
  state, table = host_states.split_state(init_state(method, data))
  state, metrics = host_run(state, table, arrays, offsets, 2)
  assert_same(state, table, device_state)
  np.testing.assert_allclose(metrics["train_loss"], device_metrics["train_loss"], rtol=1e-6)


def test_init_host_state_equals_split_device_init(tmp_path):
  from fedjax_lab import byzantine
  data, _ = linear_problem((3, 4, 2, 5), seed=0)
  params = {"w": jnp.ones(3), "b": jnp.zeros(())}
  base = scaffold_method()
  methods = {
      "zeros": base,
      # Non-zero initial rows are broadcast to every client.
      "halves": dataclasses.replace(
          base, init_client_state=lambda p: jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)),
      # A method that overrides init (per-client tags [N]) runs it on the CPU backend.
      "tagged": byzantine.with_client_tags(base, group=lambda n: np.arange(n) % 3),
  }
  for name, method in methods.items():
    device_state, device_table = host_states.split_state(
        method.init(params, jax.random.PRNGKey(3), data.num_clients))
    for directory in (None, str(tmp_path / name)):
      state, table = host_states.init_host_state(method, params, jax.random.PRNGKey(3),
                                                 data.num_clients, directory)
      assert jax.tree.structure(state) == jax.tree.structure(device_state)
      jax.tree.map(np.testing.assert_array_equal, state, device_state)
      jax.tree.map(np.testing.assert_array_equal, table, device_table)
      kind = np.ndarray if directory is None else np.memmap
      assert all(isinstance(x, kind) for x in jax.tree.leaves(table))
  tags = host_states.init_host_state(methods["tagged"], params, jax.random.PRNGKey(3), 4)[1]
  np.testing.assert_array_equal(tags["tags"]["client_id"], np.arange(4))
  np.testing.assert_array_equal(tags["tags"]["group"], [0, 1, 2, 0])
