"""Gradient oracles: how a client turns (params, batch) into a gradient estimate.

A loss function here returns PER-EXAMPLE losses ``[B]``; the oracle takes the mean
over the examples whose ``batch['mask']`` is set, so padded examples contribute
exactly zero to both the loss and the gradient.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_lab.transforms import GradientOracle
from fedjax_lab.types import Batch, Params, PRNGKey

ExampleLossFn = Callable[[Params, Batch, PRNGKey], jax.Array]   # -> [B]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values [B]`` over ``mask [B]``; 0 when nothing is valid."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def batch_loss(example_loss: ExampleLossFn) -> Callable[[Params, Batch, PRNGKey], jax.Array]:
  """Masked mean of a per-example loss."""
  def loss(params, batch, rng):
    return masked_mean(example_loss(params, batch, rng), batch["mask"])
  return loss


def first_order(example_loss: ExampleLossFn) -> GradientOracle:
  """Exact gradient of the masked mean loss (``jax.value_and_grad``)."""
  loss = batch_loss(example_loss)

  def update(params, batch, rng, state):
    value, grads = jax.value_and_grad(loss)(params, batch, rng)
    return grads, {"loss": value}, state

  return GradientOracle(init=lambda params: (), update=update)
