"""Local steps past the cohort's largest client are skipped, not masked, with the same
numbers (``client.local_train(largest_client=...)``)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from algorithms.fedavg import fedavg
from fedjax_lab import client, oracles
from fedjax_lab.algorithm import make_round
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import GradientOracle, as_extra_args
from tests import reference


def _counting(oracle, calls):
  """The oracle, counting the steps it is run for (a host callback, which a skipped
  branch never reaches)."""
  def update(params, batch, rng, state):
    jax.debug.callback(lambda: calls.append(1))
    return oracle.update(params, batch, rng, state)
  return GradientOracle(init=oracle.init, update=update)


def _local(largest, calls, size=3, max_examples=20):
  data, params = reference.linear_problem([max_examples], dim=3)
  rows = {k: jnp.asarray(v) for k, v in data.arrays.items()}
  oracle = _counting(oracles.first_order(reference.linear_example_loss), calls)
  schedule = LocalSchedule(batch_size=2, epochs=2)
  result = client.local_train(oracle, as_extra_args(optax.sgd(0.1)), schedule, params, rows,
                              jnp.int32(size), jax.random.PRNGKey(0), {}, max_examples,
                              largest_client=largest)
  return jax.block_until_ready(result)


def test_steps_past_the_largest_client_are_not_run_and_change_nothing():
  masked_calls, skipped_calls = [], []
  masked = _local(None, masked_calls)
  skipped = _local(jnp.int32(3), skipped_calls)
  # 20 rows, batch 2, 2 epochs: 20 steps; a client of 3 reaches 2 per epoch.
  assert len(masked_calls) == 20
  assert len(skipped_calls) == 4
  for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(skipped)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(skipped.num_steps) == 4


def test_a_round_skipping_steps_equals_numpy_fedavg():
  # Clients of 2-5 examples padded to 12 (one client of 12 in the population, not in
  # the cohort): the cohort's steps stop at its own largest client.
  sizes = [3, 5, 2, 12, 4]
  data, params = reference.linear_problem(sizes, dim=3, seed=1)
  lr = 0.05
  schedule = LocalSchedule(batch_size=2, epochs=2, shuffle=False)
  method = fedavg(reference.linear_example_loss, lr, 1.0, schedule)
  state = method.init(params, jax.random.PRNGKey(0), data.num_clients)
  core_ids = jnp.array([0, 1, 2, 4], jnp.int32)
  from fedjax_lab.algorithm import make_round_core
  core = jax.jit(make_round_core(method, data, 4))
  new_state, _, metrics = core(state, core_ids, (), *data.device_arrays())
  total, weight = None, 0.0
  for i in [0, 1, 2, 4]:
    c = data.client(i)
    w, steps = reference.local_sgd(params, np.float64(c["x"]), np.float64(c["y"]), lr, 2, 2)
    delta = {k: len(c["y"]) * (w[k] - reference.to_numpy(params)[k]) for k in w}
    total = delta if total is None else {k: total[k] + delta[k] for k in delta}
    weight += len(c["y"])
  expected = {k: reference.to_numpy(params)[k] + total[k] / weight for k in total}
  reference.tree_close(new_state.params, expected, atol=1e-5)
  assert int(metrics["local_steps"]) == 2 * (2 + 3 + 1 + 2)


def test_the_round_runs_steps_as_a_branch_under_vmap():
  # The predicate is the cohort's, so the cond stays a branch (not a select of both).
  data, params = reference.linear_problem([3, 5, 2, 12], dim=3)
  method = fedavg(reference.linear_example_loss, 0.1, 1.0, LocalSchedule(batch_size=2, epochs=1))
  state = method.init(params, jax.random.PRNGKey(0), data.num_clients)
  jaxpr = jax.make_jaxpr(make_round(method, data, 2))(state, *data.device_arrays())
  from fedjax_lab import loops
  assert "cond" in loops.primitive_names(jaxpr.jaxpr)
