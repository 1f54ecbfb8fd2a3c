"""Random Fourier features and the weight-space GP mean that FZooS clients upload.

Rahimi & Recht, "Random Features for Large-Scale Kernel Machines", NeurIPS 2007:
``phi(x) = sqrt(2/M) cos(omega x + b)`` with frequencies drawn from the kernel's
spectral density, from a seed all clients share. The weight-space GP mean
``nu = (Phi^T Phi + s2 I)^{-1} Phi^T y`` (FZooS: Shu, Lin, Dai, Low, ICML 2024,
arXiv 2308.04077) is what clients upload, so that the server can average surrogates.
"""
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from fedjax_lab.zeroth_order.common import _check_choice
from fedjax_lab.zeroth_order.gp import KERNELS, normalize_values

RIDGE_FORMS = ("auto", "primal", "dual")



class RFF(NamedTuple):
  """Random Fourier features ``phi(x) = sqrt(2/M) cos(omega x + b)``.

  Attributes:
    omega: ``[M, d]`` frequencies; SE: rows ~ N(0, I / l^2).
    b: ``[M]`` phases ~ U[0, 2 pi].
  """
  omega: jax.Array
  b: jax.Array



def rff_init(key: jax.Array, dim: int, num_features: int, lengthscale: float = 1.0,
             kernel: str = "se") -> RFF:
  """Draws the features; all clients use the same ``key`` so their weights add up.

  For Matern-5/2 the spectral density is a multivariate Student-t with 5 degrees of
  freedom: ``omega = z / (l sqrt(u / 5))`` with z ~ N(0, I), u ~ chi^2_5.
  """
  _check_choice("kernel", kernel, KERNELS)
  k_omega, k_b, k_u = jax.random.split(key, 3)
  z = jax.random.normal(k_omega, (num_features, dim))
  if kernel == "matern52":
    u = jnp.sum(jax.random.normal(k_u, (num_features, 5)) ** 2, 1, keepdims=True)  # chi^2_5
    z = z / jnp.sqrt(u / 5.0)
  b = jax.random.uniform(k_b, (num_features,), maxval=2 * math.pi)
  return RFF(z / lengthscale, b)



def rff_features(rff: RFF, xs: jax.Array) -> jax.Array:
  """``[n, M]`` features of ``xs [n, d]`` (or ``[M]`` of one point ``[d]``)."""
  m = rff.b.shape[0]
  return math.sqrt(2.0 / m) * jnp.cos(xs @ rff.omega.T + rff.b)



def ridge_weights(phi: jax.Array, y: jax.Array, noise: float, form: str = "auto") -> jax.Array:
  """``nu = (Phi^T Phi + s2 I)^{-1} Phi^T y = Phi^T (Phi Phi^T + s2 I)^{-1} y``.

  ``form='auto'`` solves the smaller system: primal (M x M) when M <= n, dual (n x n)
  when M > n. Rows of zeros in ``phi`` (masked points) contribute nothing either way.
  """
  _check_choice("ridge form", form, RIDGE_FORMS)
  n, m = phi.shape
  if form == "auto":
    form = "primal" if m <= n else "dual"
  if form == "primal":
    a = phi.T @ phi + noise * jnp.eye(m, dtype=phi.dtype)
    return jax.scipy.linalg.solve(a, phi.T @ y, assume_a="pos")
  a = phi @ phi.T + noise * jnp.eye(n, dtype=phi.dtype)
  return phi.T @ jax.scipy.linalg.solve(a, y, assume_a="pos")



class RFFSurrogate(NamedTuple):
  """``f_hat(x) = offset + phi(x)^T nu`` (nu in the objective's units)."""
  nu: jax.Array        # [M]
  offset: jax.Array    # scalar



def rff_fit(rff: RFF, xs: jax.Array, ys: jax.Array, mask: jax.Array, noise: float = 1e-6,
            normalize: bool = True, form: str = "auto") -> RFFSurrogate:
  """Weight-space GP mean on the valid rows.

  As in FZooS's code, ys are min-max normalised, ``nu'`` fitted, and ``nu = scale * nu'``
  is returned so that surrogates of different clients can be averaged directly.
  """
  chex.assert_shape([ys, mask], (xs.shape[0],))
  chex.assert_shape(xs, (None, rff.omega.shape[1]))
  mask = mask.astype(bool)
  if normalize:
    y, offset, scale = normalize_values(ys, mask)
  else:
    y, offset, scale = jnp.where(mask, ys, 0.0), jnp.zeros((), ys.dtype), jnp.ones((), ys.dtype)
  phi = rff_features(rff, xs) * mask[:, None].astype(xs.dtype)
  return RFFSurrogate(scale * ridge_weights(phi, y, noise, form), offset)



def rff_mean(rff: RFF, nu: jax.Array, x: jax.Array) -> jax.Array:
  """``phi(x)^T nu`` (add the surrogate's offset for values)."""
  return rff_features(rff, x) @ nu



def rff_grad(rff: RFF, nu: jax.Array, x: jax.Array) -> jax.Array:
  """``grad_x phi(x)^T nu = -sqrt(2/M) omega^T (nu * sin(omega x + b))``."""
  m = rff.b.shape[0]
  return -math.sqrt(2.0 / m) * rff.omega.T @ (nu * jnp.sin(rff.omega @ x + rff.b))
