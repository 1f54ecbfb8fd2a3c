"""Unrolled loops (XLA:CPU convolutions are slow inside loops): same numbers, right decisions."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from fedjax_lab import loops, training
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import FederatedData


def _conv_problem(sizes, seed=0):
  """Clients of 1-D signals and a one-filter convolution regressor (cheap to compile)."""
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.normal(size=(n, 5, 1)).astype(np.float32)
  y = rng.normal(size=n).astype(np.float32)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  params = {"kernel": rng.normal(size=(3, 1, 1)).astype(np.float32)}

  def example_loss(params, batch, rng):
    del rng
    out = jax.lax.conv_general_dilated(batch["x"], params["kernel"], (1,), "VALID",
                                       dimension_numbers=("NWC", "WIO", "NWC"))
    return 0.5 * (jnp.sum(out, axis=(1, 2)) - batch["y"]) ** 2
  return FederatedData({"x": x, "y": y}, offsets), example_loss, params


def test_unrolled_scan_equals_lax_scan():
  f = lambda c, x: (c * 1.5 + x, c - x)
  xs = jnp.arange(5.0)
  want = jax.lax.scan(f, 1.0, xs)
  got = loops.scan(f, 1.0, xs, unroll=True)
  np.testing.assert_allclose(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1])
  # No loop is left in the unrolled program; an empty scan still has its shapes.
  assert "while" not in loops.primitive_names(jax.make_jaxpr(
      lambda: loops.scan(f, 1.0, xs, unroll=True))())
  assert loops.scan(f, 1.0, xs[:0], unroll=True)[1].shape == (0,)


def test_unroll_decisions():
  conv = lambda x: jax.lax.conv_general_dilated(x, jnp.ones((1, 1, 2, 2)), (1, 1), "VALID")
  x = jnp.ones((1, 1, 4, 4))
  convolving = loops.primitive_names(jax.make_jaxpr(jax.grad(lambda x: conv(x).sum()))(x))
  dense = loops.primitive_names(jax.make_jaxpr(lambda x: x @ x.T)(jnp.ones((3, 3))))
  looping = loops.primitive_names(jax.make_jaxpr(
      lambda x: jax.lax.fori_loop(0, 3, lambda i, z: conv(z[None, None, :4, :4])[0, 0].sum() + z,
                                  x[0, 0]))(x))
  assert jax.default_backend() == "cpu"
  assert loops.unroll_steps(convolving, 5)
  assert not loops.unroll_steps(convolving, loops.MAX_UNROLLED_STEPS + 1)
  assert not loops.unroll_steps(dense, 5)
  assert not loops.unroll_steps(looping, 5)      # a loop inside each step stays slow anyway
  assert loops.unroll_steps(convolving, 1)
  assert not loops.unroll_steps(dense, 1)


def test_conv_rounds_unrolled_or_not_give_the_same_numbers():
  data, loss, params = _conv_problem((4, 2, 3, 2))
  auto = fedavg(loss, 0.1, schedule=LocalSchedule(batch_size=2, epochs=1))
  fixed = fedavg(loss, 0.1, schedule=LocalSchedule(batch_size=2, epochs=1, unroll=False))
  # Conv rounds, 2 per call: one jitted round called from Python on the CPU, local
  # steps unrolled; against a scan of local steps, one round per call.
  opts = training.TrainOptions(rounds=3, clients_per_round=2, rounds_per_call=2,
                               eval_every=0, progress=False)
  loop = training.run_loop(auto, params, data, opts=opts)
  assert loop.traces == 1
  single = training.run_loop(fixed, params, data,
                             opts=dataclasses.replace(opts, rounds_per_call=1))
  for a, b in zip(jax.tree.leaves(loop.state.params), jax.tree.leaves(single.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([h["train_loss"] for h in loop.history],
                             [h["train_loss"] for h in single.history], rtol=1e-5)


def test_auto_chunk_rule():
  never = lambda: pytest.fail("the convolution check runs only for large cohorts")
  assert training.resolve_chunk_size("auto", training.AUTO_CHUNK_ABOVE, never) is None
  assert training.resolve_chunk_size(
      "auto", training.AUTO_CHUNK_ABOVE + 1, lambda: False) == training.AUTO_CHUNK_SIZE
  assert training.resolve_chunk_size("auto", 10_000, lambda: True) is None   # conv on the CPU
  assert training.resolve_chunk_size(None, 10_000, never) is None
  assert training.resolve_chunk_size(7, 3, never) == 7


def test_auto_chunked_rounds_match_unchunked_numpy_fedavg():
  from reference import linear_example_loss, linear_problem, local_sgd, to_numpy
  # 300 clients per round (> AUTO_CHUNK_ABOVE): chunks of 64, the last one overlapping.
  sizes = [2 + i % 3 for i in range(300)]
  data, params = linear_problem(sizes, seed=2)
  method = fedavg(linear_example_loss, 0.1, schedule=LocalSchedule(batch_size=2, epochs=1,
                                                                     shuffle=False))
  opts = training.TrainOptions(rounds=1, clients_per_round=300, eval_every=0, progress=False)
  assert opts.chunk_size == "auto"
  state, _ = training.train(method, params, data, opts=opts)
  # Every client trains (the cohort is the population), so the round is FedAvg in numpy.
  start, deltas, weights = to_numpy(params), [], []
  for i in range(300):
    x, y = (np.asarray(data.client(i)[k], np.float64) for k in ("x", "y"))
    local, _ = local_sgd(start, x, y, 0.1, 2, 1)
    deltas.append({k: local[k] - start[k] for k in start})
    weights.append(len(y))
  w = np.asarray(weights, np.float64) / np.sum(weights)
  for k in start:
    want = start[k] + sum(wi * d[k] for wi, d in zip(w, deltas))
    np.testing.assert_allclose(np.asarray(state.params[k]), want, rtol=2e-5, atol=2e-6)
