"""Aggregators: stacked client messages ``[C, ...]`` + weights ``[C]`` -> one message.

Each runs inside the mapped region: with ``axis_name`` set, the clients axis is split
over devices and the partial sums are combined with ``psum``.
"""
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from fedjax_lab.transforms import Aggregator


def weighted_sum(messages, weights: jax.Array, axis_name: Optional[str] = None):
  """``(sum_i w_i m_i, sum_i w_i)`` over the (possibly sharded) clients axis."""
  chex.assert_rank(weights, 1)
  chex.assert_tree_shape_prefix(messages, weights.shape)
  total = jax.tree.map(lambda m: jnp.tensordot(weights.astype(m.dtype), m, axes=1), messages)
  weight = jnp.sum(weights)
  if axis_name is not None:
    total, weight = jax.lax.psum((total, weight), axis_name)
  return total, weight


def weighted_mean() -> Aggregator:
  """``sum_i w_i m_i / sum_i w_i`` (FedAvg's aggregation, McMahan et al. 2017).

  Zero-weight (padding) clients do not contribute; an all-zero cohort gives zeros.
  """
  def update(messages, weights, state, axis_name=None):
    total, weight = weighted_sum(messages, weights, axis_name)
    mean = jax.tree.map(lambda t: t / jnp.maximum(weight, 1e-12).astype(t.dtype), total)
    return mean, state

  return Aggregator(init=lambda: (), update=update)
