"""A fixed-capacity ring buffer of one client's queries ``(x, f(x))``.

Static shapes, so that the surrogates fitted to a client's query history (FZooS)
``jit`` and ``vmap`` over clients; ``buffer_nearest`` picks the stored queries a local
GP is fitted on.
"""
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp



class QueryBuffer(NamedTuple):
  """The last ``capacity`` queries of one client.

  Attributes:
    xs: ``[capacity, d]`` query points.
    ys: ``[capacity]`` observed values.
    count: int32, queries written so far (slot ``count % capacity`` is next).
  """
  xs: jax.Array
  ys: jax.Array
  count: jax.Array



def buffer_init(capacity: int, dim: int, dtype=jnp.float32) -> QueryBuffer:
  return QueryBuffer(jnp.zeros((capacity, dim), dtype), jnp.zeros((capacity,), dtype),
                     jnp.zeros((), jnp.int32))



def buffer_valid(buffer: QueryBuffer) -> jax.Array:
  """bool ``[capacity]``: which slots hold a query."""
  return jnp.arange(buffer.ys.shape[0]) < buffer.count



def buffer_add(buffer: QueryBuffer, xs: jax.Array, ys: jax.Array,
               mask: Optional[jax.Array] = None) -> QueryBuffer:
  """Appends the rows of ``xs [m, d]``, ``ys [m]`` whose ``mask [m]`` is set, in order.

  When full, the oldest queries are overwritten. ``m`` must not exceed the capacity.
  """
  capacity = buffer.ys.shape[0]
  m = ys.shape[0]
  chex.assert_shape(xs, (m, buffer.xs.shape[1]))
  if m > capacity:
    raise ValueError(f"Cannot add {m} queries at once to a buffer of capacity {capacity}.")
  mask = jnp.ones((m,), bool) if mask is None else mask.astype(bool)
  rank = jnp.cumsum(mask) - 1
  slots = jnp.where(mask, (buffer.count + rank) % capacity, capacity)   # capacity: dropped
  return QueryBuffer(buffer.xs.at[slots].set(xs.astype(buffer.xs.dtype), mode="drop"),
                     buffer.ys.at[slots].set(ys.astype(buffer.ys.dtype), mode="drop"),
                     buffer.count + jnp.sum(mask).astype(jnp.int32))



def buffer_nearest(buffer: QueryBuffer, x: jax.Array, k: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The ``k`` stored queries nearest to ``x`` (Euclidean).

  Returns:
    ``(X [k, d], y [k], mask [k])``; ``mask`` is False for the rows that had to be
    filled because fewer than ``k`` queries are stored.
  """
  capacity = buffer.ys.shape[0]
  k = min(k, capacity)
  valid = buffer_valid(buffer)
  dist = jnp.sum((buffer.xs - x[None, :]) ** 2, axis=1)
  _, idx = jax.lax.top_k(jnp.where(valid, -dist, -jnp.inf), k)
  return buffer.xs[idx], buffer.ys[idx], valid[idx]
