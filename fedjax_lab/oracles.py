"""Gradient oracles: how a client turns (params, batch) into a gradient estimate.

A loss function here returns PER-EXAMPLE losses ``[B]``; the oracle takes the mean
over the examples whose ``batch['mask']`` is set, so padded examples contribute
exactly zero to both the loss and the gradient.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import hyperparams
from fedjax_lab.attacks import PGD, fgsm, pgd  # noqa: F401  (re-exported: oracles.pgd(...))
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


def adversarial(example_loss: ExampleLossFn, attack: Callable, mix_ratio: float = 1.0,
                input_key: str = "x") -> GradientOracle:
  """Gradient of the adversarial (min-max) training loss, PGD-AT style.

  At every local step the oracle attacks the current params, then differentiates

      L(w) = (1 - r) * mean_i l(w; x_i, y_i) + r * mean_i l(w; x'_i, y_i),
      x'_i = attack(x -> l(w; x, y_i), x_i)  (held constant: stop_gradient),

  the mix of Goodfellow et al. (2015, eq. 6); ``r = 1`` is Madry's PGD-AT (FAL, Li,
  Song & Yang 2023), ``0 < r < 1`` FAT's clean/adversarial mix (Zizzo et al. 2020),
  which in expectation equals replacing a fraction r of each batch by adversarial
  examples. Means are over the examples of ``batch['mask']``.

  Args:
    example_loss: ``(params, batch, rng) -> [B]``, the same per-example loss the
      first-order oracle takes; the attack perturbs ``batch[input_key]``.
    attack: ``(loss_on_inputs, x, rng) -> x_adv``, e.g. ``attacks.pgd(...)``.
    mix_ratio: r in [0, 1]; 0 skips the attack (clean training), 1 skips the clean loss.
      A JAX array (a traced hyper-parameter) always runs both, with the same numbers.
    input_key: the batch entry the attack perturbs.

  Returns:
    A stateless ``GradientOracle`` whose aux holds the trained ``'loss'`` (the mix).
  """
  hyperparams.check(mix_ratio, lambda r: 0.0 <= r <= 1.0,
                    f"mix_ratio must be in [0, 1] (0: clean, 1: all adversarial), "
                    f"got {mix_ratio}.")
  loss = batch_loss(example_loss)
  # A number picks the clean-only or adversarial-only form; an array the mix.
  static_ratio = hyperparams.static_value(mix_ratio)

  def update(params, batch, rng, state):
    if static_ratio == 0.0:
      value, grads = jax.value_and_grad(loss)(params, batch, rng)
      return grads, {"loss": value}, state
    # The attack's own key; the loss keeps ``rng`` so r = 0 / eps = 0 match first_order.
    attack_key = jax.random.fold_in(rng, 0x5EED)
    inputs_loss = lambda x: example_loss(params, {**batch, input_key: x}, rng)
    adv_batch = {**batch, input_key: attack(inputs_loss, batch[input_key], attack_key)}
    if static_ratio == 1.0:
      value, grads = jax.value_and_grad(loss)(params, adv_batch, rng)
      return grads, {"loss": value}, state

    def mixed(p):
      return (1.0 - mix_ratio) * loss(p, batch, rng) + mix_ratio * loss(p, adv_batch, rng)

    value, grads = jax.value_and_grad(mixed)(params)
    return grads, {"loss": value}, state

  return GradientOracle(init=lambda params: (), update=update)


def sharpness_aware(example_loss: ExampleLossFn, rho: jax.typing.ArrayLike,
                    normalize: bool = True, mix: jax.typing.ArrayLike = 1.0,
                    eps: float = 1e-12) -> GradientOracle:
  """The gradient at an ascent-perturbed point, on the same batch (SAM and FedSpeed).

      g1 = grad L(w),   e = rho g1 / ||g1||  (normalize)  or  rho g1  (not),
      g2 = grad L(w + e),   g = (1 - mix) g1 + mix g2

  ``normalize=True, mix=1`` is SAM (Foret et al., ICLR 2021, eq. 2; FedSAM, DFedSAM);
  ``normalize=False, mix=alpha`` is FedSpeed's merged gradient (Sun et al., ICLR 2023,
  Alg. 1: the extra ascent step ``w + rho g1`` and ``(1 - alpha) g1 + alpha g2``).
  ``||.||`` is the global l2 norm over all leaves. The aux ``'loss'`` is ``L(w)``.
  """
  hyperparams.check(rho, lambda r: r >= 0.0, f"rho must be >= 0, got {rho}.")
  hyperparams.check(mix, lambda m: 0.0 <= m <= 1.0, f"mix must be in [0, 1], got {mix}.")
  loss = batch_loss(example_loss)

  def update(params, batch, rng, state):
    value, g1 = jax.value_and_grad(loss)(params, batch, rng)
    scale = rho
    if normalize:
      scale = rho / jnp.maximum(optax.tree.norm(g1), eps)
    perturbed = jax.tree.map(lambda w, g: w + scale * g, params, g1)
    g2 = jax.grad(loss)(perturbed, batch, rng)
    grads = jax.tree.map(lambda a, b: (1.0 - mix) * a + mix * b, g1, g2)
    return grads, {"loss": value}, state

  return GradientOracle(init=lambda params: (), update=update)
