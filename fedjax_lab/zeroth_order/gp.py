"""A Gaussian-process surrogate fitted to a client's queries, and its radial kernels.

FZooS (Shu, Lin, Dai, Low, "Federated Zeroth-Order Optimization using
Trajectory-Informed Surrogate Gradients", ICML 2024, arXiv 2308.04077): the posterior
mean, its gradient (the gradient estimate) and the posterior variance of that gradient
(the exploration criterion), for the squared-exponential and Matern-5/2 kernels; the
lengthscale is chosen by marginal likelihood over a grid.
"""
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from fedjax_lab.zeroth_order.common import _check_choice

KERNELS = ("se", "matern52")



# --------------------------------------------------------------------------------------
# Radial kernels: k(x, x') = k(r^2) and grad_x k(x, x') = -h(r^2) (x - x').



def kernel_and_slope(sqdist: jax.Array, lengthscale, kernel: str = "se"
                     ) -> tuple[jax.Array, jax.Array]:
  """``(k, h)`` at squared distances, with unit amplitude.

  SE:        k = exp(-r^2 / (2 l^2)),              h = k / l^2.
  Matern-5/2: a = sqrt(5) r / l, k = (1 + a + a^2/3) e^{-a},  h = 5/(3 l^2) (1 + a) e^{-a}.
  ``h(0)`` is the prior variance of each partial derivative of f.
  """
  _check_choice("kernel", kernel, KERNELS)
  l2 = jnp.asarray(lengthscale, sqdist.dtype) ** 2
  if kernel == "se":
    k = jnp.exp(-0.5 * sqdist / l2)
    return k, k / l2
  safe = jnp.maximum(sqdist, 0.0)
  a = jnp.sqrt(5.0 * jnp.where(safe > 0, safe, 1.0) / l2)
  a = jnp.where(safe > 0, a, 0.0)            # no NaN gradient of sqrt at r = 0
  e = jnp.exp(-a)
  return (1.0 + a + a * a / 3.0) * e, (5.0 / (3.0 * l2)) * (1.0 + a) * e



def sqdist_matrix(x1: jax.Array, x2: jax.Array) -> jax.Array:
  """``[n1, n2]`` squared distances.

  Computed as ``|a|^2 + |b|^2 - 2 a.b`` (a matmul) after shifting both sets by
  ``x2[0]``, so that close points far from the origin do not lose their distance
  to cancellation in float32.
  """
  center = x2[0]
  a, b = x1 - center, x2 - center
  sq = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
  return jnp.maximum(sq, 0.0)



def kernel_matrix(x1: jax.Array, x2: jax.Array, lengthscale, kernel: str = "se") -> jax.Array:
  return kernel_and_slope(sqdist_matrix(x1, x2), lengthscale, kernel)[0]



# --------------------------------------------------------------------------------------
# Gaussian-process surrogate.



class GPPosterior(NamedTuple):
  """A GP conditioned on (masked) data, in normalised units.

  With ``y' = (y - offset) / scale``, ``A = K + noise I`` (rows of invalid points
  replaced by the identity), ``alpha = A^{-1} y'`` and ``chol = cholesky(A)``:
  mean(x) = offset + scale * k(x, X) alpha.
  """
  xs: jax.Array           # [n, d]
  mask: jax.Array         # [n] bool
  alpha: jax.Array        # [n]
  chol: jax.Array         # [n, n] lower
  lengthscale: jax.Array  # scalar
  offset: jax.Array       # scalar
  scale: jax.Array        # scalar



def normalize_values(ys: jax.Array, mask: jax.Array, eps: float = 1e-12
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Min-max normalisation of the valid ``ys`` to [0, 1] (FZooS's code): ``(y', offset, scale)``."""
  lo = jnp.min(jnp.where(mask, ys, jnp.inf))
  hi = jnp.max(jnp.where(mask, ys, -jnp.inf))
  any_valid = jnp.any(mask)
  lo = jnp.where(any_valid, lo, 0.0)
  scale = jnp.where(any_valid, hi - lo, 0.0) + eps
  return jnp.where(mask, (ys - lo) / scale, 0.0), lo, scale



def _masked_gram(xs, mask, lengthscale, noise, kernel):
  m = mask.astype(xs.dtype)
  k = kernel_matrix(xs, xs, lengthscale, kernel) * (m[:, None] * m[None, :])
  return k + jnp.diag(noise * m + (1.0 - m))



def gp_fit(xs: jax.Array, ys: jax.Array, mask: jax.Array, lengthscale, noise: float = 1e-6,
           kernel: str = "se", normalize: bool = True) -> GPPosterior:
  """GP posterior with unit amplitude, fixed lengthscale and noise variance ``noise``.

  Args:
    xs: ``[n, d]`` inputs; ``ys``: ``[n]`` values; ``mask``: ``[n]`` which rows are data.
    lengthscale: scalar l.
    noise: observation noise variance s^2 (in normalised units); also the jitter.
    kernel: ``'se'`` or ``'matern52'``.
    normalize: min-max normalise ys to [0, 1] first (FZooS's code), else use them as is.
  """
  chex.assert_rank(xs, 2)
  chex.assert_shape([ys, mask], (xs.shape[0],))
  mask = mask.astype(bool)
  if normalize:
    y, offset, scale = normalize_values(ys, mask)
  else:
    y = jnp.where(mask, ys, 0.0)
    offset, scale = jnp.zeros((), ys.dtype), jnp.ones((), ys.dtype)
  chol = jnp.linalg.cholesky(_masked_gram(xs, mask, lengthscale, noise, kernel))
  alpha = jax.scipy.linalg.cho_solve((chol, True), y)
  return GPPosterior(xs, mask, alpha, chol, jnp.asarray(lengthscale, xs.dtype), offset, scale)



def _cross(post: GPPosterior, x: jax.Array, kernel: str):
  sq = jnp.sum((post.xs - x[None, :]) ** 2, axis=1)
  k, h = kernel_and_slope(sq, post.lengthscale, kernel)
  m = post.mask.astype(x.dtype)
  return k * m, h * m



def gp_mean(post: GPPosterior, x: jax.Array, kernel: str = "se") -> jax.Array:
  """Posterior mean ``mu(x) = offset + scale * k(x, X)^T (K + s^2 I)^{-1} y'``."""
  k, _ = _cross(post, x, kernel)
  return post.offset + post.scale * k @ post.alpha



def gp_grad(post: GPPosterior, x: jax.Array, kernel: str = "se") -> jax.Array:
  """Gradient of the posterior mean, ``[d k(x, X)/dx]^T alpha`` (analytic).

  With ``grad_x k(x, x_j) = -h_j (x - x_j)`` (SE: h_j = k_j / l^2):
  ``grad mu(x) = -scale * sum_j alpha_j h_j (x - x_j)``.
  """
  _, h = _cross(post, x, kernel)
  w = post.alpha * h
  return -post.scale * (jnp.sum(w) * x - w @ post.xs)



def gp_grad_variance(post: GPPosterior, x: jax.Array, kernel: str = "se") -> jax.Array:
  """Posterior variance of each partial derivative of f at x, ``[d]`` (original units^2).

  ``Var[d_k f(x)] = h(0) - v_k^T (K + s^2 I)^{-1} v_k`` with ``v_k = d k(x, X) / d x_k``.
  """
  _, h = _cross(post, x, kernel)
  v = -h[:, None] * (x[None, :] - post.xs)                     # [n, d]
  w = jax.scipy.linalg.solve_triangular(post.chol, v, lower=True)
  prior = kernel_and_slope(jnp.zeros((), x.dtype), post.lengthscale, kernel)[1]
  return post.scale ** 2 * (prior - jnp.sum(w * w, axis=0))



def gp_grad_variance_trace(post: GPPosterior, xs: jax.Array, kernel: str = "se") -> jax.Array:
  """``sum_k Var[d_k f(x)]`` at each of ``xs [m, d]``, ``[m]``, in O(n^2 + n d) per point.

  With ``B = diag(h) A^{-1} diag(h)``, ``sum_k v_k^T A^{-1} v_k = sum_{jj'} B_jj' <x - x_j, x - x_j'>``
  and ``<x - x_j, x - x_j'> = |x|^2 - x.x_j - x.x_j' + x_j.x_j'``, so nothing of size
  ``n x d`` is solved per point. This is the exploration score of FZooS (its code scores
  the first coordinate only; the trace weighs all of them).
  """
  n, dim = post.xs.shape
  a_inv = jax.scipy.linalg.cho_solve((post.chol, True), jnp.eye(n, dtype=xs.dtype))
  center = post.xs[0]                       # shift: float32 cancellation, see sqdist_matrix
  data, points = post.xs - center, xs - center
  _, h = kernel_and_slope(sqdist_matrix(points, data), post.lengthscale, kernel)   # [m, n]
  h = h * post.mask.astype(xs.dtype)[None, :]
  p = points @ data.T                                                              # x.x_j
  ah = h @ a_inv
  quad = (jnp.sum(points * points, 1) * jnp.sum(h * ah, 1) - 2.0 * jnp.sum(h * p * ah, 1)
          + jnp.sum((h @ (a_inv * (data @ data.T))) * h, 1))
  prior = kernel_and_slope(jnp.zeros((), xs.dtype), post.lengthscale, kernel)[1]
  return post.scale ** 2 * (dim * prior - quad)



def gp_log_marginal_likelihood(xs: jax.Array, ys: jax.Array, mask: jax.Array, lengthscale,
                               noise: float = 1e-6, kernel: str = "se",
                               normalize: bool = True) -> jax.Array:
  """``log p(y' | X, l)`` of the valid rows (normalised ys, unit amplitude)."""
  post = gp_fit(xs, ys, mask, lengthscale, noise, kernel, normalize)
  y = (jnp.where(post.mask, (ys - post.offset) / post.scale, 0.0) if normalize
       else jnp.where(post.mask, ys, 0.0))
  n_valid = jnp.sum(post.mask)
  return (-0.5 * y @ post.alpha - jnp.sum(jnp.log(jnp.diagonal(post.chol)))
          - 0.5 * n_valid * math.log(2 * math.pi))



def fit_best_lengthscale(xs: jax.Array, ys: jax.Array, mask: jax.Array, grid: jax.Array,
                         noise: float = 1e-6, kernel: str = "se", normalize: bool = True
                         ) -> GPPosterior:
  """The GP whose lengthscale in ``grid`` has the largest marginal likelihood.

  FZooS's code maximises the marginal likelihood with L-BFGS and 20 restarts; a fixed
  grid gives static shapes and vectorises (one Cholesky per grid value, all kept, the
  best one returned). A non-finite likelihood (failed Cholesky) never wins.
  """
  grid = jnp.asarray(grid, xs.dtype)
  posts = jax.vmap(lambda l: gp_fit(xs, ys, mask, l, noise, kernel, normalize))(grid)
  y = jnp.where(mask, (ys - posts.offset[0]) / posts.scale[0], 0.0) if normalize else \
      jnp.where(mask, ys, 0.0)
  lml = (-0.5 * posts.alpha @ y - jnp.sum(jnp.log(jnp.diagonal(posts.chol, axis1=1, axis2=2)), 1)
         - 0.5 * jnp.sum(mask) * math.log(2 * math.pi))
  best = jnp.argmax(jnp.where(jnp.isfinite(lml), lml, -jnp.inf))
  return jax.tree.map(lambda a: a[best], posts)



def select_lengthscale(xs: jax.Array, ys: jax.Array, mask: jax.Array, grid: jax.Array,
                       noise: float = 1e-6, kernel: str = "se", normalize: bool = True
                       ) -> jax.Array:
  """The lengthscale in ``grid`` with the largest marginal likelihood (grid search)."""
  return fit_best_lengthscale(xs, ys, mask, grid, noise, kernel, normalize).lengthscale
