"""FedKSeed's pieces: zeroth-order steps whose perturbations come from K shared seeds.

Qin, Chen, Yao, Ding, Li, Li, Deng. "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", ICML 2024 (Algorithm 1).
With K seeds s_1..s_K shared by server and clients, z_j = N(0, I) drawn from s_j:

    client step:  j ~ U{1..K};  g = (L(w + eps z_j) - L(w - eps z_j)) / (2 eps)
                  w <- w - eta g z_j                  upload (j, g): 8 bytes a step
    server:       w <- w - eta sum_{(j, g)} g z_j     replays every pair it received

Only the library pieces (perturbations, local steps, replay, bytes): the round and
launch config are not built yet.
"""
import jax
import jax.numpy as jnp

from fedjax_lab.types import Params

BYTES_PER_PAIR = 8   # int32 seed index + float32 scalar


def perturbation(seeds_key: jax.Array, index, params: Params) -> Params:
  """z_j, a standard normal tree like ``params`` from seed ``index`` of the pool."""
  key = jax.random.fold_in(seeds_key, index)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                                      for k, x in zip(keys, leaves)])


def local_steps(loss, params: Params, batches, seeds_key: jax.Array, num_seeds: int,
                rng: jax.Array, lr, eps):
  """Zeroth-order steps over ``batches`` (leading axis = steps); returns ``(params, (idx, g))``."""
  def step(w, inputs):
    batch, key = inputs
    j = jax.random.randint(key, (), 0, num_seeds)
    z = perturbation(seeds_key, j, w)
    plus = jax.tree.map(lambda a, b: a + eps * b, w, z)
    minus = jax.tree.map(lambda a, b: a - eps * b, w, z)
    g = (loss(plus, batch) - loss(minus, batch)) / (2.0 * eps)
    return jax.tree.map(lambda a, b: a - lr * g * b, w, z), (j.astype(jnp.int32), g)

  steps = jax.tree.leaves(batches)[0].shape[0]
  keys = jax.random.split(rng, steps)
  return jax.lax.scan(step, params, (batches, keys))


def replay(params: Params, indices, scalars, seeds_key: jax.Array, lr) -> Params:
  """``w - lr sum_t scalars[t] z_{indices[t]}``: the server's step from the uploaded pairs."""
  def one(w, pair):
    j, g = pair
    z = perturbation(seeds_key, j, w)
    return jax.tree.map(lambda a, b: a - lr * g * b, w, z), None
  return jax.lax.scan(one, params, (indices, scalars))[0]


def uplink_bytes(num_pairs: int) -> int:
  """Bytes a client uploads for ``num_pairs`` (seed index, scalar) pairs."""
  return BYTES_PER_PAIR * int(num_pairs)
