"""FedKSeed's replay against applying the same perturbations directly (numpy)."""
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.zeroth_order import kseed


def test_replay_equals_the_clients_steps_and_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5, 3)).astype(np.float32)   # 4 steps, batches of 5
  y = rng.normal(size=(4, 5)).astype(np.float32)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.float32(0.2)}
  loss = lambda p, batch: jnp.mean((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2)
  seeds_key, lr, eps = jax.random.PRNGKey(3), 0.05, 1e-3
  final, (idx, g) = kseed.local_steps(loss, params, (jnp.asarray(x), jnp.asarray(y)), seeds_key,
                                      8, jax.random.PRNGKey(1), lr, eps)
  replayed = kseed.replay(params, idx, g, seeds_key, lr)
  for k in params:
    np.testing.assert_allclose(replayed[k], final[k], atol=1e-6)
  # Numpy: apply the same z_j and scalars directly; recompute each scalar too.
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  for t in range(4):
    z = {k: np.asarray(v, np.float64) for k, v in kseed.perturbation(seeds_key, idx[t], params).items()}
    f = lambda p: np.mean((x[t] @ p["w"] + p["b"] - y[t]) ** 2)
    scalar = (f({k: w[k] + eps * z[k] for k in w}) - f({k: w[k] - eps * z[k] for k in w})) / (2 * eps)
    np.testing.assert_allclose(float(g[t]), scalar, rtol=2e-2, atol=1e-3)
    w = {k: w[k] - lr * float(g[t]) * z[k] for k in w}
  for k in w:
    np.testing.assert_allclose(np.asarray(final[k], np.float64), w[k], atol=1e-5)
  assert kseed.uplink_bytes(idx.shape[0]) == 32
