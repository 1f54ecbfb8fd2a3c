"""The round engine: padding and masking, backends agree, schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from algorithms.fedavg import fedavg
from algorithms.scaffold import scaffold
from fedjax_lab import client as client_lib
from fedjax_lab import oracles, parallel
from fedjax_lab.algorithm import make_multi_round, make_round
from fedjax_lab.client import LocalSchedule
from reference import linear_example_loss, linear_problem, local_sgd, to_numpy, tree_close


def train_one_client(x, y, size, schedule, max_examples):
  params = {"w": jnp.ones(3), "b": jnp.zeros(())}
  return client_lib.local_train(
      oracles.first_order(linear_example_loss), optax.sgd(0.1), schedule, params,
      {"x": x, "y": y}, jnp.int32(size), jax.random.PRNGKey(3), {}, max_examples)


@pytest.mark.parametrize("schedule", [
    LocalSchedule(batch_size=4, epochs=2, shuffle=True),
    LocalSchedule(batch_size=3, steps=5, shuffle=True),
    LocalSchedule(batch_size=None, epochs=1),
])
def test_seven_examples_padded_to_8_or_64_give_the_same_update(schedule):
  rng = np.random.default_rng(0)
  x7, y7 = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=7).astype(np.float32)
  results = []
  for pad in (8, 64):
    # Padding rows hold large garbage: they must contribute exactly zero.
    x = np.full((pad, 3), 1e3, np.float32); x[:7] = x7
    y = np.full((pad,), -1e3, np.float32); y[:7] = y7
    results.append(train_one_client(jnp.asarray(x), jnp.asarray(y), 7, schedule, pad))
  a, b = results
  tree_close(a.params, b.params, atol=1e-6)
  assert int(a.num_steps) == int(b.num_steps)
  np.testing.assert_allclose(a.mean_loss, b.mean_loss, rtol=1e-6)


def test_epoch_schedule_without_shuffle_is_plain_minibatch_sgd():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(16, 3)).astype(np.float32), rng.normal(size=16).astype(np.float32)
  result = train_one_client(jnp.asarray(x), jnp.asarray(y), 7,
                            LocalSchedule(batch_size=3, epochs=2, shuffle=False), 16)
  expected, steps = local_sgd({"w": np.ones(3), "b": 0.0}, x[:7], y[:7], 0.1, 3, 2)
  assert int(result.num_steps) == steps == 6
  tree_close(result.params, expected, atol=1e-5)


def test_shuffled_epoch_visits_every_real_example_once():
  indices, mask = client_lib.batch_plan(LocalSchedule(batch_size=4, epochs=3), jnp.int32(10), 16,
                                        jax.random.PRNGKey(0))
  indices, mask = np.asarray(indices).reshape(3, -1), np.asarray(mask).reshape(3, -1)
  for epoch in range(3):
    assert sorted(indices[epoch][mask[epoch]].tolist()) == list(range(10))
  assert not np.array_equal(indices[0][mask[0]], indices[1][mask[1]])   # reshuffled


@pytest.mark.parametrize("n", [1, 2, 7, client_lib.COMPARISON_SORT_MAX,
                               client_lib.COMPARISON_SORT_MAX + 1, 200,
                               client_lib.PACKED_SORT_MAX, client_lib.PACKED_SORT_MAX + 1])
def test_stable_argsort_is_numpys_stable_argsort(n):
  rng = np.random.default_rng(n)
  top = 2**client_lib.PACKED_KEY_BITS
  for keys in (rng.integers(0, top, size=n), rng.integers(top - 3, top, size=n),
               np.zeros(n, np.int64)):                      # ties keep index order
    got = np.asarray(jax.jit(client_lib.stable_argsort)(jnp.asarray(keys, jnp.uint32)))
    np.testing.assert_array_equal(got, np.argsort(keys, kind="stable"))


def test_shuffle_is_the_stable_argsort_of_uniform_keys():
  """The orders are those of ``jax.random.uniform`` keys (real slots) and 2 + slot."""
  rng, size = jax.random.PRNGKey(4), 45
  for max_examples in (40, 64, 300):
    orders = client_lib._orders(rng, jnp.int32(size), max_examples, 2, True)
    for i in range(2):
      keys = np.asarray(jax.random.uniform(jax.random.fold_in(rng, i), (max_examples,)))
      slots = np.arange(max_examples)
      want = np.argsort(np.where(slots < size, keys, 2.0 + slots), kind="stable")
      np.testing.assert_array_equal(np.asarray(orders[i]), want)


def test_steps_schedule_runs_the_same_step_count_for_every_client():
  for size in (1, 5, 40):
    _, mask = client_lib.batch_plan(LocalSchedule(batch_size=8, steps=6), jnp.int32(size), 40,
                                    jax.random.PRNGKey(0))
    assert mask.shape == (6, 8) and bool(jnp.all(mask))
  _, mask = client_lib.batch_plan(LocalSchedule(batch_size=8, steps=6), jnp.int32(0), 40,
                                  jax.random.PRNGKey(0))
  assert not bool(jnp.any(mask))   # a padding client never steps


def run_backend(method, data, backend, cohort, rounds=2, rounds_per_call=1):
  round_fn = make_round(method, data, cohort, backend)
  run = make_multi_round(round_fn, backend)
  state = method.init({"w": jnp.ones(3), "b": jnp.zeros(())}, jax.random.PRNGKey(7),
                      data.num_clients)
  arrays, offsets = data.device_arrays()
  for _ in range(rounds // rounds_per_call):
    state, metrics = run(state, arrays, offsets, rounds_per_call)
  return state, metrics


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_loop_vmap_and_sharded_backends_agree(name):
  assert jax.device_count() == 8, "conftest.py forces 8 CPU devices"
  data, _ = linear_problem((5, 3, 7, 2, 9, 4, 6, 1, 8, 3, 5, 2), seed=2)
  schedule = LocalSchedule(batch_size=2, epochs=2)
  if name == "fedavg":
    method = fedavg(linear_example_loss, 0.05, 1.0, schedule)
  else:
    method = scaffold(linear_example_loss, 0.05, 1.0, schedule)
  results = {b: run_backend(method, data, b, cohort=5) for b in parallel.BACKENDS}
  reference_state, reference_metrics = results["vmap"]
  for backend, (state, metrics) in results.items():
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 state, reference_state)
    np.testing.assert_allclose(metrics["train_loss"], reference_metrics["train_loss"], rtol=1e-5)
  # Five clients on eight devices: three zero-weight padding clients were added and ignored.
  assert parallel.padded_cohort_size(5, "sharded") == 8


def test_rounds_inside_one_scan_equal_rounds_one_by_one():
  data, _ = linear_problem((5, 3, 7, 2, 9, 4), seed=3)
  method = fedavg(linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=2, epochs=1))
  one_by_one, _ = run_backend(method, data, "vmap", 3, rounds=4, rounds_per_call=1)
  scanned, metrics = run_backend(method, data, "vmap", 3, rounds=4, rounds_per_call=4)
  assert metrics["train_loss"].shape == (4,)
  tree_close(scanned.params, one_by_one.params, atol=1e-6)


def test_unknown_backend_and_bad_cohorts_are_named():
  data, _ = linear_problem((3, 4), seed=0)
  method = fedavg(linear_example_loss, 0.1)
  with pytest.raises(ValueError, match="Unknown backend 'pmapp'"):
    make_round(method, data, 1, "pmapp")
  with pytest.raises(ValueError, match="larger than the population"):
    make_round(method, data, 3, "vmap")
  with pytest.raises(ValueError, match="must be positive"):
    make_round(method, data, 0, "vmap")
  with pytest.raises(ValueError, match="exactly one of epochs and steps"):
    LocalSchedule(epochs=1, steps=2)


def test_step_limit_masks_the_tail_of_the_scan_and_aux_totals_count_steps():
  rng = np.random.default_rng(5)
  x, y = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32), jnp.asarray(rng.normal(size=12), jnp.float32)
  base = oracles.first_order(linear_example_loss)

  def counting_update(params, batch, rng, state):
    grads, aux, state = base.update(params, batch, rng, state)
    return grads, {**aux, "queries": jnp.float32(2.0)}, state

  counting = base._replace(update=counting_update)
  params = {"w": jnp.ones(3), "b": jnp.zeros(())}
  run = lambda schedule, limit: client_lib.local_train(
      counting, optax.sgd(0.1), schedule, params, {"x": x, "y": y}, jnp.int32(12),
      jax.random.PRNGKey(0), {}, 12, step_limit=limit)
  limited = run(LocalSchedule(batch_size=4, steps=6, shuffle=False), jnp.int32(2))
  short = run(LocalSchedule(batch_size=4, steps=2, shuffle=False), None)
  assert int(limited.num_steps) == 2
  tree_close(limited.params, short.params, atol=0)
  assert float(limited.aux_totals["queries"]) == 4.0


def test_a_run_of_fixed_shape_rounds_compiles_once():
  data, _ = linear_problem((5, 3, 7, 2), seed=6)
  method = scaffold(linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=2))
  run = make_multi_round(make_round(method, data, 2, "vmap"), "vmap")
  state = method.init({"w": jnp.ones(3), "b": jnp.zeros(())}, jax.random.PRNGKey(0), 4)
  arrays, offsets = data.device_arrays()
  for _ in range(4):
    state, _ = run(state, arrays, offsets, 3)
  assert run._cache_size() == 1
