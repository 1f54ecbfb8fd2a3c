"""Size buckets (fedjax_lab.size_buckets): a cohort sorted by size runs in buckets each
padded only to what its largest possible client needs, with the numbers of the round
that pads every client to the largest."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from algorithms.scaffold import scaffold
from fedjax_lab import size_buckets
from fedjax_lab import oracles
from fedjax_lab.algorithm import make_round, plan_size_buckets
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import FederatedData
from tests import reference

SIZES = [1, 2, 3, 9, 10, 11, 2, 1]


def _brute_force(sizes, cohort, schedule, max_examples, max_buckets, bucket_cost):
  """Cheapest split of the sorted cohort's positions into contiguous buckets."""
  batch = schedule.batch_size
  bound = sorted(sizes, reverse=True)[:cohort]
  rows = [max_examples] + [min(max(-(-s // batch), 1) * batch, max_examples) for s in bound[1:]]
  full = cohort * schedule.num_steps(max_examples)
  best = None
  for groups in range(1, max_buckets + 1):
    for cuts in itertools.combinations(range(1, cohort), groups - 1):
      edges = (0,) + cuts + (cohort,)
      cost = sum((b - a) * schedule.num_steps(rows[a]) for a, b in zip(edges, edges[1:]))
      total = cost + bucket_cost * full * (groups - 1)
      if best is None or total < best[0] - 1e-9:
        best = (total, cost)
  return best, full


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_the_cheapest_split(seed):
  rng = np.random.default_rng(seed)
  sizes = list(rng.integers(0, 40, size=12))
  sizes[0] = 40
  cohort = int(rng.integers(2, 9))
  schedule = LocalSchedule(batch_size=int(rng.integers(3, 9)), epochs=int(rng.integers(1, 3)))
  buckets = size_buckets.plan(sizes, cohort, schedule, 40, max_buckets=3, min_saving=0.0,
                              bucket_cost=0.05)
  (total, cost), full = _brute_force(sizes, cohort, schedule, 40, 3, 0.05)
  assert sum(b.count for b in buckets) == cohort
  assert buckets[0].rows == 40
  got = size_buckets.client_steps(buckets, schedule)
  assert got + 0.05 * full * (len(buckets) - 1) == pytest.approx(total)
  assert got == cost


def test_plan_declines_what_it_cannot_or_need_not_bucket():
  sizes = [40, 3, 3, 3, 3, 3]
  assert size_buckets.plan(sizes, 6, LocalSchedule(batch_size=4, epochs=1), 40)
  assert size_buckets.plan(sizes, 6, LocalSchedule(batch_size=4, steps=5), 40) == ()
  assert size_buckets.plan(sizes, 6, LocalSchedule(batch_size=None), 40) == ()
  assert size_buckets.plan([8] * 6, 6, LocalSchedule(batch_size=4), 8) == ()
  # The j-th largest client of a cohort of 2 from these may hold 40 and 40 examples.
  assert size_buckets.plan([40, 40, 3, 3], 2, LocalSchedule(batch_size=4), 40) == ()


def test_fits_counts_the_clients_above_each_bucket():
  buckets = (size_buckets.Bucket(2, 12), size_buckets.Bucket(3, 4))
  for sizes, expected in [([12, 9, 4, 1, 0], True), ([12, 9, 5, 1, 0], False),
                          ([12, 13, 1, 1, 1], False), ([4, 4, 4, 4, 4], True)]:
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]), jnp.int32)
    assert bool(size_buckets.fits(offsets, buckets)) is expected


def test_bucketed_fedavg_equals_numpy_fedavg():
  data, params = reference.linear_problem(SIZES, dim=3)
  lr, batch, epochs = 0.05, 3, 2
  method = fedavg(reference.linear_example_loss, lr, 1.0,
                  LocalSchedule(batch_size=batch, epochs=epochs, shuffle=False))
  assert plan_size_buckets(method, data, data.num_clients)
  states = reference.run_rounds(method, data, params, rounds=2)
  x = reference.to_numpy(params)
  for _ in range(2):
    total = {k: np.zeros_like(v) for k, v in x.items()}
    for i in range(data.num_clients):
      c = data.client(i)
      local, _ = reference.local_sgd(x, np.float64(c["x"]), np.float64(c["y"]), lr, batch, epochs)
      for k in x:
        total[k] += len(c["y"]) * (local[k] - x[k])
    x = {k: x[k] + total[k] / sum(SIZES) for k in x}
  reference.tree_close(states[-1].params, x, atol=1e-5)


def _dropout_loss(params, batch, rng):
  keep = jax.random.bernoulli(rng, 0.7, batch["x"].shape)
  residual = (batch["x"] * keep / 0.7) @ params["w"] + params["b"] - batch["y"]
  return 0.5 * residual ** 2


def _run(method, data, params, rounds, cohort, buckets):
  states, metrics = reference.rounds_with_metrics(method, data, params, rounds, cohort, seed=5,
                                                  size_buckets=buckets)
  return states[-1], metrics


def _assert_same_rounds(method, data, params, cohort, buckets=True, rounds=3):
  bucketed, m_bucketed = _run(method, data, params, rounds, cohort, buckets)
  padded, m_padded = _run(method, data, params, rounds, cohort, False)
  for a, b in zip(jax.tree.leaves(bucketed), jax.tree.leaves(padded)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=1e-5, atol=1e-6)
  for a, b in zip(m_bucketed, m_padded):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("case", ["shuffled_partial_cohort", "scaffold_two_epochs",
                                  "dropout_one_epoch"])
def test_bucketed_round_equals_padded_round(case):
  sizes = [30, 2, 3, 4, 1, 5, 2, 3, 6, 2, 28, 1]
  data, params = reference.linear_problem(sizes, dim=3)
  if case == "shuffled_partial_cohort":
    method = fedavg(reference.linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=4))
    cohort = 9
  elif case == "scaffold_two_epochs":
    method = scaffold(reference.linear_example_loss, 0.05, 1.0,
                      LocalSchedule(batch_size=4, epochs=2))
    cohort = 10
  else:
    method = fedavg(_dropout_loss, 0.05, 1.0, LocalSchedule(batch_size=4))
    method = dataclasses.replace(method, oracle=oracles.first_order(_dropout_loss))
    cohort = 10
  assert plan_size_buckets(method, data, cohort)
  _assert_same_rounds(method, data, params, cohort)


def test_a_multi_epoch_oracle_that_reads_its_key_is_not_bucketed():
  """Its step keys depend on the padding, so the round pads as before (same numbers)."""
  params = {"w": jnp.ones(3), "b": jnp.zeros(())}
  batch = {"x": jnp.ones((4, 3)), "y": jnp.ones(4), "mask": jnp.ones(4, bool)}
  plain = oracles.first_order(reference.linear_example_loss)
  dropout = oracles.first_order(_dropout_loss)
  assert not size_buckets.reads_step_key(plain, params, batch, plain.init(params))
  assert size_buckets.reads_step_key(dropout, params, batch, dropout.init(params))
  sizes = [30, 2, 3, 4, 1, 5, 2, 3, 6, 2, 28, 1]
  data, params = reference.linear_problem(sizes, dim=3)
  method = fedavg(_dropout_loss, 0.05, 1.0, LocalSchedule(batch_size=4, epochs=2))
  method = dataclasses.replace(method, oracle=dropout)
  _assert_same_rounds(method, data, params, 10, rounds=2)


def test_a_population_that_does_not_fit_runs_unbucketed():
  """A round built for one population, run on another's arrays of the same shapes
  (the next task of a stream), falls back to padding every client to the largest."""
  small = [12, 1, 2, 1, 3, 2, 1, 2]
  large = [12, 11, 10, 12, 9, 2, 1, 2]
  data_small, params = reference.linear_problem(small, dim=3)
  data_large, _ = reference.linear_problem(large, dim=3, seed=1)
  method = fedavg(reference.linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=4))
  buckets = plan_size_buckets(method, data_small, 8)
  assert buckets and not bool(size_buckets.fits(data_large.device_arrays()[1], buckets))
  state = method.init(params, jax.random.PRNGKey(0), 8)
  arrays, offsets = data_large.device_arrays()
  reused, _ = jax.jit(make_round(method, data_small, 8))(state, arrays, offsets)
  padded, _ = jax.jit(make_round(method, data_large, 8, size_buckets=False))(
      state, arrays, offsets)
  reference.tree_close(reused.params, padded.params, atol=1e-6)


def test_buckets_that_do_not_hold_the_cohort_are_an_error():
  data, params = reference.linear_problem(SIZES, dim=3)
  method = fedavg(reference.linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=3))
  round_fn = make_round(method, data, 8, size_buckets=[(3, 11), (4, 3)])
  state = method.init(params, jax.random.PRNGKey(0), 8)
  with pytest.raises(ValueError, match="buckets hold 7 clients; the cohort has 8"):
    jax.jit(round_fn)(state, *data.device_arrays())


def test_padding_ids_of_poisson_like_cohorts_sort_last():
  """Clients of size 0 (padding) land in the last bucket and add nothing."""
  sizes = [9, 0, 0, 1, 2, 0, 8, 1]
  data = FederatedData({"x": np.arange(21, dtype=np.float32)[:, None].repeat(3, 1),
                        "y": np.ones(21, np.float32)},
                       np.concatenate([[0], np.cumsum(sizes)]))
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  method = fedavg(reference.linear_example_loss, 0.01, 1.0, LocalSchedule(batch_size=2))
  assert plan_size_buckets(method, data, 8)
  _assert_same_rounds(method, data, params, 8, rounds=2)
