"""Cohort samplers against their closed-form probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import sampling


def test_weighted_single_draw_follows_the_weights():
  weights = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
  keys = jax.random.split(jax.random.PRNGKey(0), 20000)
  ids = np.asarray(jax.jit(jax.vmap(lambda k: sampling.weighted(k, weights, 1)))(keys))[:, 0]
  freq = np.bincount(ids, minlength=5) / len(ids)
  p = weights / weights.sum()
  # Four standard deviations of a binomial frequency.
  np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / len(ids)) + 1e-12)
  assert freq[4] == 0.0


def test_weighted_cohorts_are_distinct_and_follow_successive_sampling():
  weights = np.array([5.0, 1.0, 1.0, 1.0])
  keys = jax.random.split(jax.random.PRNGKey(1), 20000)
  ids = np.asarray(jax.jit(jax.vmap(lambda k: sampling.weighted(k, weights, 2)))(keys))
  assert all(len(set(row)) == 2 for row in ids[:200])
  # P(client 0 in the cohort) = 5/8 + sum_j (1/8)(5/7) = 5/8 + 3 * 5/56.
  p0 = 5 / 8 + 3 * (1 / 8) * (5 / 7)
  freq0 = np.mean((ids == 0).any(axis=1))
  assert abs(freq0 - p0) < 4 * np.sqrt(p0 * (1 - p0) / len(ids))


def test_fixed_schedule_cycles_through_its_rows():
  schedule = np.array([[0, 1], [2, 3], [4, 0]])
  got = [np.asarray(sampling.fixed_schedule(schedule, jnp.int32(r))).tolist() for r in range(5)]
  assert got == [[0, 1], [2, 3], [4, 0], [0, 1], [2, 3]]
  sampling.validate_schedule(schedule, 5)
  with pytest.raises(ValueError, match="row 1 repeats a client"):
    sampling.validate_schedule([[0, 1], [2, 2]], 5)
  with pytest.raises(ValueError, match=r"row 0 has ids outside \[0, 3\)"):
    sampling.validate_schedule([[0, 3]], 3)
  with pytest.raises(ValueError, match="larger than the population"):
    sampling.validate_schedule([[0, 1, 2]], 2)


def test_a_fixed_schedule_runs_those_cohorts_in_training():
  from algorithms.fedavg import fedavg
  from fedjax_lab import training
  from fedjax_lab.client import LocalSchedule
  from reference import linear_example_loss, linear_problem, local_sgd, to_numpy, tree_close
  sizes = (5, 3, 7, 4)
  data, params = linear_problem(sizes)
  schedule = np.array([[2, 0], [3, 1]])
  method = fedavg(linear_example_loss, 0.1, schedule=LocalSchedule(2, epochs=1, shuffle=False))
  opts = training.TrainOptions(rounds=2, clients_per_round=2, rounds_per_call=2, eval_every=0,
                               progress=False,
                               sampler=sampling.schedule_sampler(schedule, data.num_clients))
  state, _ = training.train(method, params, data, opts=opts)
  x = to_numpy(params)
  for row in schedule:   # numpy FedAvg on exactly these clients, weighted by size
    deltas = []
    for i in row:
      c = data.client(int(i))
      w, _ = local_sgd(x, np.asarray(c["x"], np.float64), np.asarray(c["y"], np.float64),
                       0.1, 2, 1)
      deltas.append({k: w[k] - x[k] for k in x})
    weights = np.asarray([sizes[i] for i in row], np.float64)
    weights /= weights.sum()
    x = {k: x[k] + sum(wi * d[k] for wi, d in zip(weights, deltas)) for k in x}
  tree_close(state.params, x, atol=1e-5)
  with pytest.raises(ValueError, match=r"cohorts of shape \(2,\); clients_per_round=3"):
    training.train(method, params, data, opts=training.TrainOptions(
        rounds=1, clients_per_round=3, progress=False, sampler=opts.sampler))


def test_weighted_sampler_checks_its_weights():
  with pytest.raises(ValueError, match="Only 1 clients have a positive weight"):
    sampling.weighted_sampler([0.0, 2.0, 0.0], 2)
  sampler = sampling.weighted_sampler([1.0, 2.0, 3.0], 2)
  ids = np.asarray(sampler(jax.random.PRNGKey(0), jnp.int32(0)))
  assert ids.shape == (2,) and len(set(ids.tolist())) == 2


def test_poisson_cohorts_have_binomial_sizes_and_distinct_sorted_ids():
  n, q = 50, 0.2
  sampler, max_cohort = sampling.poisson_sampler(n, q)
  from scipy import stats
  assert stats.binom.sf(max_cohort, n, q) < 1e-9 <= stats.binom.sf(max_cohort - 1, n, q)
  keys = jax.random.split(jax.random.PRNGKey(3), 4000)
  ids, info = jax.jit(jax.vmap(lambda k: sampler(k, jnp.int32(0))))(keys)
  ids, sizes = np.asarray(ids), np.asarray(info["cohort_size"])
  # Mean and variance of Binomial(n, q), to four standard errors.
  assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / len(sizes))
  assert abs(sizes.var() - n * q * (1 - q)) < 0.15 * n * q * (1 - q)
  for row, size in zip(ids[:100], sizes[:100]):
    real = row[:size]
    assert np.all(np.diff(real) > 0) and np.all(row[size:] == n)
  # Each client joins with probability q.
  joined = np.zeros(n)
  for row, size in zip(ids, sizes):
    joined[row[:size]] += 1
  np.testing.assert_array_less(np.abs(joined / len(ids) - q), 4 * np.sqrt(q * (1 - q) / len(ids)))


def test_a_poisson_overflow_stops_the_run_and_keeps_the_state():
  from algorithms.fedavg import fedavg
  from fedjax_lab import training
  from fedjax_lab.client import LocalSchedule
  from reference import linear_example_loss, linear_problem
  data, params = linear_problem((5, 3, 7, 4, 6, 2))
  method = fedavg(linear_example_loss, 0.1, schedule=LocalSchedule(2, epochs=1))
  # One slot for a rate of 0.9: the first round overflows.
  sampler = lambda key, r: sampling.poisson(key, data.num_clients, 0.9, 1)
  opts = training.TrainOptions(rounds=3, clients_per_round=1, progress=False, sampler=sampler)
  with pytest.raises(training.CohortOverflowError, match=r"Round 1 sampled a cohort of \d "
                                                          r"clients, more than its 1 slots"):
    training.train(method, params, data, opts=opts)
  # With enough slots the same run trains, with the padded slots at weight 0.
  sampler, max_cohort = sampling.poisson_sampler(data.num_clients, 0.5)
  _, history = training.train(method, params, data, opts=training.TrainOptions(
      rounds=3, clients_per_round=max_cohort, progress=False, sampler=sampler))
  assert all(0 <= h["cohort_size"] <= max_cohort for h in history)
  assert all(h["cohort_examples"] > 0 for h in history if h["cohort_size"] > 0)
