"""Unrolled loops (XLA:CPU convolutions are slow inside loops): same numbers, right decisions."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from fedjax_lab import loops, models, training
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import FederatedData


def _conv_problem(sizes=(6, 3, 5, 4), seed=0):
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
  y = rng.integers(0, 3, size=n).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  model = models.cnn((2,), 4, 3)
  return FederatedData({"x": x, "y": y}, offsets), model, model.init(jax.random.PRNGKey(0), x[:1])


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


@pytest.mark.parametrize("unroll", [True, False])
def test_conv_rounds_unrolled_or_not_give_the_same_numbers(unroll):
  data, model, params = _conv_problem()
  loss = models.classification_loss(model)
  auto = fedavg(loss, 0.1, schedule=LocalSchedule(batch_size=2, epochs=1))
  fixed = fedavg(loss, 0.1, schedule=LocalSchedule(batch_size=2, epochs=1, unroll=unroll))
  # Conv rounds, 4 per call: one jitted round called from Python on the CPU.
  opts = training.TrainOptions(rounds=5, clients_per_round=2, rounds_per_call=4,
                               eval_every=0, progress=False)
  loop = training.run_loop(auto, params, data, opts=opts)
  assert loop.traces == 1
  single = training.run_loop(fixed, params, data,
                             opts=dataclasses.replace(opts, rounds_per_call=1))
  for a, b in zip(jax.tree.leaves(loop.state.params), jax.tree.leaves(single.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([h["train_loss"] for h in loop.history],
                             [h["train_loss"] for h in single.history], rtol=1e-5)
