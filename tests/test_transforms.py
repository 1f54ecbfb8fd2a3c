"""FL client transforms against their closed forms, with and without jit."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import aggregate
from fedjax_lab.transforms import add_control_variate, proximal


class TransformsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_proximal_adds_mu_times_drift(self):
    grads = {"w": jnp.array([1.0, -2.0])}
    params = {"w": jnp.array([0.5, 0.5])}
    global_params = {"w": jnp.array([0.0, 1.0])}
    tx = proximal(0.3)
    update = self.variant(lambda g, s, p, gp: tx.update(g, s, p, global_params=gp))
    out, _ = update(grads, tx.init(params), params, global_params)
    np.testing.assert_allclose(out["w"], [1.0 + 0.3 * 0.5, -2.0 + 0.3 * -0.5], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_control_variate_chain_is_sgd_on_corrected_gradient(self):
    tx = optax.chain(add_control_variate(), optax.sgd(0.1))
    grads, control = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.5, -1.0])}
    update = self.variant(lambda g, s, c: tx.update(g, s, None, control=c))
    out, _ = update(grads, tx.init(grads), control)
    np.testing.assert_allclose(out["w"], [-0.15, -0.1], rtol=1e-6)

  def test_missing_extra_argument_is_named(self):
    tx = proximal(0.1)
    with pytest.raises(ValueError, match="global_params"):
      tx.update({"w": jnp.ones(2)}, tx.init(None), {"w": jnp.ones(2)})


def test_weighted_mean_matches_numpy_and_ignores_zero_weights():
  rng = np.random.default_rng(0)
  messages = {"a": rng.normal(size=(5, 3)).astype(np.float32)}
  weights = np.array([1.0, 2.0, 0.0, 4.0, 0.0], np.float32)
  mean, _ = aggregate.weighted_mean().update(messages, jnp.asarray(weights), (), None)
  expected = (weights[:, None] * messages["a"]).sum(0) / weights.sum()
  np.testing.assert_allclose(mean["a"], expected, rtol=1e-6)


def test_weighted_mean_rejects_mismatched_weights():
  with pytest.raises(AssertionError):
    aggregate.weighted_mean().update({"a": jnp.ones((4, 2))}, jnp.ones(3), (), None)
