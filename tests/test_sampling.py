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
