"""FedKSeed's pieces: zeroth-order steps whose perturbations come from K shared seeds.

Qin, Chen, Yao, Ding, Li, Li, Deng. "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", ICML 2024 (Algorithm 1).
With K seeds s_1..s_K shared by server and clients, z_j = N(0, I) drawn from s_j:

    client step:  j ~ U{1..K};  g = (L(w + eps z_j) - L(w - eps z_j)) / (2 eps)
                  w <- w - eta g z_j                  upload (j, g): 8 bytes a step
    server:       w <- w - eta sum_{(j, g)} g z_j     replays every pair it received

In the engine's round (``algorithms/fedkseed.py``): ``oracle`` is the client step's
estimate ``g z_j`` (applied by ``optax.sgd(eta)``) and keeps ``a_j = sum of the g drawn
with seed j``, so a client's whole trajectory is ``w_tau - w_0 = -eta sum_j a_j z_j``
and its message is the K-vector ``c = -eta a`` (the tau pairs carry it); ``replay_rule``
is the server's ``sum_j c_j z_j`` from the weighted mean of the c's. FedKSeed-Pro:
``pro_oracle``, ``SeedHistory``, ``seed_log_probabilities``, ``history_rule``.
"""
from typing import NamedTuple

import jax
from jax import flatten_util
import jax.numpy as jnp
import optax

from fedjax_lab import hyperparams
from fedjax_lab import oracles
from fedjax_lab.transforms import GradientOracle
from fedjax_lab.types import Params

BYTES_PER_PAIR = 8   # int32 seed index + float32 scalar


def perturbation(seeds_key: jax.Array, index, params: Params) -> Params:
  """z_j, a standard normal tree like ``params`` from seed ``index`` of the pool.

  One draw of the flattened parameter vector, cut into the leaves (one random-number
  program per perturbation, not one per leaf: the round compiles several times faster).
  """
  key = jax.random.fold_in(seeds_key, index)
  flat, unravel = flatten_util.ravel_pytree(params)
  return unravel(jax.random.normal(key, flat.shape, flat.dtype))


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


def _check(num_seeds: int, eps) -> None:
  if int(num_seeds) < 1:
    raise ValueError(f"num_seeds (K) must be >= 1, got {num_seeds}")
  hyperparams.check(eps, lambda v: v > 0, f"eps must be > 0, got {eps}")


def _two_point(loss, params, batch, key, seeds_key, j, eps):
  """``(g z_j, (L+ + L-) / 2, g)`` at ``params`` on ``batch``."""
  z = perturbation(seeds_key, j, params)
  plus = loss(jax.tree.map(lambda a, b: a + eps * b, params, z), batch, key)
  minus = loss(jax.tree.map(lambda a, b: a - eps * b, params, z), batch, key)
  g = (plus - minus) / (2.0 * eps)
  return jax.tree.map(lambda b: (g * b).astype(b.dtype), z), 0.5 * (plus + minus), g


def oracle(example_loss, seeds_key: jax.Array, num_seeds: int, eps) -> GradientOracle:
  """FedKSeed's client step as a gradient oracle: ``g z_j`` with ``j ~ U{0..K-1}``.

  ``g`` is the two-point estimate on the step's masked mean loss; the state is the
  K-vector ``a`` of accumulated scalars (``a[j] += g``), started at zeros. The reported
  loss is ``(L(w + eps z) + L(w - eps z)) / 2`` (no third forward pass).
  """
  _check(num_seeds, eps)
  loss = oracles.batch_loss(example_loss)

  def update(params, batch, rng, acc):
    key_j, key_loss = jax.random.split(rng)
    j = jax.random.randint(key_j, (), 0, num_seeds)
    grads, value, g = _two_point(loss, params, batch, key_loss, seeds_key, j, eps)
    return grads, {"loss": value}, acc.at[j].add(g)

  return GradientOracle(init=lambda params: jnp.zeros((num_seeds,), jnp.float32), update=update)


def apply_coefficients(params: Params, coefficients, seeds_key: jax.Array) -> Params:
  """``params + sum_j coefficients[j] z_j``: one z_j generated at a time, zeros skipped."""
  def one(w, inputs):
    j, c = inputs
    add = lambda w: jax.tree.map(lambda a, b: a + (c * b).astype(a.dtype), w,
                                 perturbation(seeds_key, j, w))
    return jax.lax.cond(c != 0, add, lambda w: w, w), None
  indices = jnp.arange(coefficients.shape[0], dtype=jnp.int32)
  return jax.lax.scan(one, params, (indices, coefficients))[0]


def replay_rule(seeds_key: jax.Array) -> optax.GradientTransformationExtraArgs:
  """Server rule: the seed-space pseudo-gradient ``-c [K]`` to ``-sum_j c_j z_j`` (a params tree).

  Linear in ``c``, so replaying the weighted mean of the clients' vectors equals the
  weighted mean of their replayed updates.
  """
  def update(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError("replay_rule needs params (the shapes of the perturbations)")
    zeros = jax.tree.map(jnp.zeros_like, params)
    return apply_coefficients(zeros, updates, seeds_key), state
  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


# FedKSeed-Pro: probability-differentiated seed sampling (the paper's Sec. 3.3, the
# authors' ``--bias_sampling``). Seed j's history is every scalar drawn with it, from
# every client, after an initial 0; its amplitude is the mean |clip(g, +-clip)| over the
# history; p = softmax((amp - min amp) / (max amp - min amp + 1e-10)).


class SeedHistory(NamedTuple):
  """Per seed: the sum of the clipped |g| and the number of g in its history (without
  the initial 0)."""
  abs_total: jax.Array    # [K]
  count: jax.Array        # [K]


def seed_log_probabilities(history: SeedHistory) -> jax.Array:
  """log p [K] of FedKSeed-Pro from a history (uniform when nothing was drawn yet)."""
  amp = history.abs_total / (history.count + 1.0)           # + 1: the initial 0
  amp = (amp - jnp.min(amp)) / (jnp.max(amp) - jnp.min(amp) + 1e-10)
  return jax.nn.log_softmax(amp)


def pro_oracle(example_loss, seeds_key: jax.Array, num_seeds: int, eps, clip) -> GradientOracle:
  """``oracle`` with j ~ Categorical(exp(state['log_p'])); the state also sums, per seed,
  ``|clip(g)|`` (``'abs'``) and the number of draws (``'count'``). ``init_oracle_state``
  must put the broadcast ``log_p`` in."""
  _check(num_seeds, eps)
  hyperparams.check(clip, lambda v: v > 0, f"clip must be > 0, got {clip}")
  loss = oracles.batch_loss(example_loss)

  def init(params):
    del params
    zeros = jnp.zeros((num_seeds,), jnp.float32)
    return {"acc": zeros, "abs": zeros, "count": zeros, "log_p": zeros - jnp.log(num_seeds)}

  def update(params, batch, rng, state):
    key_j, key_loss = jax.random.split(rng)
    j = jax.random.categorical(key_j, state["log_p"])
    grads, value, g = _two_point(loss, params, batch, key_loss, seeds_key, j, eps)
    state = {"acc": state["acc"].at[j].add(g),
             "abs": state["abs"].at[j].add(jnp.abs(jnp.clip(g, -clip, clip))),
             "count": state["count"].at[j].add(1.0), "log_p": state["log_p"]}
    return grads, {"loss": value}, state

  return GradientOracle(init=init, update=update)


def history_rule(num_seeds: int) -> optax.GradientTransformationExtraArgs:
  """Server rule keeping ``SeedHistory``: adds the cohort's summed ``aggregate['abs']`` and
  ``aggregate['count']``; the pseudo-gradient passes unchanged."""
  def init(params):
    del params
    return SeedHistory(jnp.zeros((num_seeds,), jnp.float32), jnp.zeros((num_seeds,), jnp.float32))

  def update(updates, state, params=None, *, aggregate, **extra):
    del params, extra
    return updates, SeedHistory(state.abs_total + aggregate["abs"], state.count + aggregate["count"])
  return optax.GradientTransformationExtraArgs(init, update)
