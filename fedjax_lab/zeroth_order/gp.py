"""Zeroth-order gradient estimation: random directions, GP and random-Fourier surrogates.

Building blocks of federated zeroth-order optimisation, where a client can only
query values ``f_i(x)`` of its objective:

* ``two_point_estimate``: the random-direction finite difference of FedZO
  (Fang et al., "Communication-Efficient Stochastic Zeroth-Order Optimization for
  Federated Learning", IEEE TSP 2022), ``g = (c/q) sum_j [f(x + mu u_j) - f(x)]/mu u_j``.
* a Gaussian-process surrogate fitted to a client's query history (FZooS: Shu, Lin,
  Dai, Low, "Federated Zeroth-Order Optimization using Trajectory-Informed Surrogate
  Gradients", ICML 2024, arXiv 2308.04077): the posterior mean, its gradient (the
  gradient estimate) and the posterior variance of that gradient (the exploration
  criterion), for the squared-exponential and Matern-5/2 kernels;
* random Fourier features (Rahimi & Recht 2007) drawn from a seed all clients share,
  and the weight-space GP mean ``nu = (Phi^T Phi + s2 I)^{-1} Phi^T y`` that FZooS
  clients upload so that the server can average surrogates;
* a fixed-capacity query ring buffer, so that everything here is pure JAX with static
  shapes and ``jit``s / ``vmap``s over clients;
* the gradient oracles, the surrogate-correction client transform and the projection
  onto a box that ``algorithms/fedzo.py`` and ``algorithms/fzoos.py`` compose.

An objective is ``value(x [d], row) -> scalar``; ``row`` is one client's data row (a
dict of arrays without the batch axis), so the round's gather hands every client its
own objective. The optimisation variable ``x`` (the engine's params) is a 1-D array.
"""
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

from fedjax_lab.transforms import GradientOracle

DIRECTIONS = ("gaussian", "sphere", "orthonormal")
SCALES = ("1", "d")
KERNELS = ("se", "matern52")
RIDGE_FORMS = ("auto", "primal", "dual")
GAMMAS = ("decay", "constant")

ObjectiveFn = Callable[[jax.Array, dict], jax.Array]


def _check_choice(name: str, value, choices: Sequence) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}.")


def _check_vector(x) -> None:
  if jnp.ndim(x) != 1:
    raise ValueError(f"Zeroth-order methods optimise a 1-D vector x; got params of shape "
                     f"{jnp.shape(x)}. Flatten them (jax.flatten_util.ravel_pytree) first.")


def first_row(batch: dict) -> dict:
  """One client's data row: the first example of a batch, without ``'mask'``."""
  return {k: v[0] for k, v in batch.items() if k != "mask"}


# --------------------------------------------------------------------------------------
# Two-point random-direction estimator (FedZO).


def sample_directions(key: jax.Array, num: int, dim: int, kind: str = "gaussian") -> jax.Array:
  """``num`` random directions ``[num, dim]``.

  Args:
    key: PRNG key.
    num: number of directions q.
    dim: dimension d.
    kind: ``'gaussian'`` (u ~ N(0, I)), ``'sphere'`` (u uniform on the unit sphere) or
      ``'orthonormal'`` (q <= d orthonormal rows, Gram-Schmidt of Gaussians, i.e. a
      Haar-random q-frame; FZooS's code for its FedZO baseline).
  """
  _check_choice("direction kind", kind, DIRECTIONS)
  u = jax.random.normal(key, (num, dim))
  if kind == "gaussian":
    return u
  if kind == "sphere":
    return u / jnp.linalg.norm(u, axis=1, keepdims=True)
  if num > dim:
    raise ValueError(f"orthonormal directions need num_directions <= dim, got {num} > {dim}.")
  q, r = jnp.linalg.qr(u.T)                 # [dim, num]; sign fix makes it Gram-Schmidt's
  return (q * jnp.sign(jnp.diagonal(r))[None, :]).T


def two_point_estimate(f: Callable[[jax.Array], jax.Array], x: jax.Array, key: jax.Array,
                       num_directions: int = 20, smoothing: float = 0.01,
                       directions: str = "orthonormal", scale: str = "1",
                       fx: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """FedZO's two-point estimate ``g = (c/q) sum_j [f(x + mu u_j) - f(x)] / mu * u_j``.

  ``c = 1`` (``scale='1'``, FZooS's code) or ``c = d`` (``scale='d'``, the FedZO paper,
  which makes sphere and orthonormal directions unbiased: E[u u^T] = I/d). For a
  quadratic f the estimate is exactly unbiased with Gaussian directions (c = 1) and
  with sphere or orthonormal ones (c = d); with q = d orthonormal directions and c = d
  it is the exact gradient of a linear f.

  Args:
    f: ``x -> scalar``.
    x: point ``[d]``.
    key: PRNG key for the directions.
    num_directions: q.
    smoothing: mu.
    directions: see ``sample_directions``.
    scale: ``'1'`` or ``'d'``.
    fx: ``f(x)`` if already known (it is then not queried again).

  Returns:
    ``(g [d], f(x))``; the estimate costs q queries, plus one if ``fx`` is None.
  """
  _check_choice("scale", scale, SCALES)
  dim = x.shape[-1]
  u = sample_directions(key, num_directions, dim, directions)
  if fx is None:
    fx = f(x)
  values = jax.vmap(f)(x[None, :] + smoothing * u)
  c = dim if scale == "d" else 1.0
  g = (c / num_directions) * ((values - fx) / smoothing) @ u
  return g, fx


# --------------------------------------------------------------------------------------
# Query ring buffer.


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


# --------------------------------------------------------------------------------------
# Random Fourier features and the weight-space GP mean.


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


def uniform_box(key: jax.Array, center: jax.Array, radius, num: int) -> jax.Array:
  """``num`` points uniform in the box ``center + [-radius, radius]^d``."""
  return center[None, :] + radius * jax.random.uniform(
      key, (num, center.shape[-1]), minval=-1.0, maxval=1.0, dtype=center.dtype)


# --------------------------------------------------------------------------------------
# Gradient oracles and the surrogate correction (composed in algorithms/fedzo.py, fzoos.py).


class TwoPointState(NamedTuple):
  """Raw estimates of the current round (for SCAFFOLD-type control variates).

  Attributes:
    grad_sum: sum of the raw estimates so far.
    first: the estimate of the first local step (at the broadcast point).
    step: local steps taken.
  """
  grad_sum: jax.Array
  first: jax.Array
  step: jax.Array


def two_point_oracle(value: ObjectiveFn, num_directions: int = 20, smoothing: float = 0.01,
                     directions: str = "orthonormal", scale: str = "1") -> GradientOracle:
  """FedZO's oracle: ``two_point_estimate`` of the client's objective at every local step.

  Each step queries ``f(x)`` and ``f(x + mu u_j)``, j = 1..q: ``aux['queries'] = q + 1``.
  ``aux['loss']`` is ``f(x)``.
  """
  _check_choice("direction kind", directions, DIRECTIONS)
  _check_choice("scale", scale, SCALES)
  if num_directions < 1 or smoothing <= 0:
    raise ValueError(f"two_point_oracle needs num_directions >= 1 and smoothing > 0, got "
                     f"{num_directions} and {smoothing}.")

  def init(params):
    _check_vector(params)
    zeros = jnp.zeros_like(params)
    return TwoPointState(zeros, zeros, jnp.zeros((), jnp.int32))

  def update(x, batch, rng, state):
    row = first_row(batch)
    g, fx = two_point_estimate(lambda z: value(z, row), x, rng, num_directions, smoothing,
                               directions, scale)
    state = TwoPointState(state.grad_sum + g, jnp.where(state.step == 0, g, state.first),
                          state.step + 1)
    return g, {"loss": fx, "queries": jnp.asarray(num_directions + 1, jnp.int32)}, state

  return GradientOracle(init, update)


class SurrogateConfig(NamedTuple):
  """Static settings of FZooS's local GP surrogate and its exploration (FZooS's code).

  Attributes:
    kernel: ``'se'`` or ``'matern52'`` (the code: Matern-5/2).
    lengthscale: a fixed lengthscale, or None to pick the best of ``lengthscale_grid``
      by marginal likelihood (the code fits it by marginal likelihood) at every fit.
    lengthscale_grid: candidates for that selection.
    noise: GP noise variance on min-max normalised values (the code: 1e-6 in float64;
      1e-4 keeps the float32 Cholesky of near-duplicate points stable).
    num_points: the GP is fitted on this many stored queries nearest to x (150).
    num_init: queries uniform in a box of radius ``init_radius`` around the start
      point, made on a client's first participation (10, radius 0.01).
    num_explore: exploration queries per local step after the first (5) ...
    num_candidates: ... chosen among this many uniform candidates (100) ...
    explore_radius: ... in a box of this radius (0.01) around the iterate, by the
      largest posterior variance of the gradient.
    buffer_size: capacity of the per-client query ring buffer.
  """
  kernel: str = "matern52"
  lengthscale: Optional[float] = None
  lengthscale_grid: tuple = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
  noise: float = 1e-4
  num_points: int = 150
  num_init: int = 10
  init_radius: float = 0.01
  num_explore: int = 5
  num_candidates: int = 100
  explore_radius: float = 0.01
  buffer_size: int = 1024

  def validate(self) -> None:
    _check_choice("kernel", self.kernel, KERNELS)
    for name in ("num_points", "num_candidates", "buffer_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"SurrogateConfig.{name} must be >= 1, got {getattr(self, name)}.")
    for name in ("num_init", "num_explore"):
      if getattr(self, name) < 0:
        raise ValueError(f"SurrogateConfig.{name} must be >= 0, got {getattr(self, name)}.")
    if self.num_explore > self.num_candidates:
      raise ValueError(f"num_explore={self.num_explore} exceeds num_candidates="
                       f"{self.num_candidates}.")
    if self.noise <= 0:
      raise ValueError(f"SurrogateConfig.noise must be > 0, got {self.noise}.")
    if self.lengthscale is not None and self.lengthscale <= 0:
      raise ValueError(f"lengthscale must be positive or None, got {self.lengthscale}.")


def fit_local_gp(buffer: QueryBuffer, x: jax.Array, config: SurrogateConfig,
                 lengthscale=None) -> GPPosterior:
  """GP on the ``config.num_points`` stored queries nearest to ``x``.

  The lengthscale is ``lengthscale`` if given, else ``config.lengthscale``, else the
  marginal-likelihood choice from ``config.lengthscale_grid``.
  """
  xs, ys, mask = buffer_nearest(buffer, x, config.num_points)
  if lengthscale is None:
    lengthscale = config.lengthscale
  if lengthscale is None:
    return fit_best_lengthscale(xs, ys, mask, jnp.asarray(config.lengthscale_grid),
                                config.noise, config.kernel)
  return gp_fit(xs, ys, mask, lengthscale, config.noise, config.kernel)


def most_uncertain(buffer: QueryBuffer, center: jax.Array, key: jax.Array, radius,
                   num_candidates: int, num_select: int, config: SurrogateConfig,
                   lengthscale=None) -> jax.Array:
  """The ``num_select`` of ``num_candidates`` uniform points in the box ``center +- radius``
  with the largest posterior gradient variance (trace) under the GP at ``center``.

  The variance does not depend on the values, only on where the queries are and the
  lengthscale; like FZooS's code, pass the one of the last fit (None: select it).
  """
  candidates = uniform_box(key, center, radius, num_candidates)
  if num_select == 0:
    return candidates[:0]
  post = fit_local_gp(buffer, center, config, lengthscale)
  score = gp_grad_variance_trace(post, candidates, config.kernel)
  _, idx = jax.lax.top_k(jnp.where(jnp.isfinite(score), score, -jnp.inf), num_select)
  return candidates[idx]


def _finite_or_zero(g):
  return jnp.where(jnp.all(jnp.isfinite(g)), g, jnp.zeros_like(g))


class SurrogateState(NamedTuple):
  """FZooS oracle state within one round.

  Attributes:
    buffer: the client's query history (persists across rounds via the client state).
    step: local steps taken this round.
    queries: queries made this round.
    row: the client's data row, kept for the round-end queries of ``client_final``
      (which the round does not hand the client's data).
    key: the last step's key, so the round-end exploration has its own randomness.
    lengthscale: the lengthscale of the last GP fit (the exploration GPs reuse it).
  """
  buffer: QueryBuffer
  step: jax.Array
  queries: jax.Array
  row: dict
  key: jax.Array
  lengthscale: jax.Array


def surrogate_oracle_state(buffer: QueryBuffer, row_template: dict, lengthscale=1.0
                           ) -> SurrogateState:
  """Starting oracle state for a round from a client's stored history."""
  row = jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.asarray(a).dtype), row_template)
  return SurrogateState(buffer, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), row,
                        jnp.zeros((2,), jnp.uint32), jnp.asarray(lengthscale, buffer.xs.dtype))


def surrogate_oracle(value: ObjectiveFn, config: SurrogateConfig = SurrogateConfig()
                     ) -> GradientOracle:
  """FZooS's local gradient estimate: the gradient of a GP fitted to the query history.

  At local step tau with iterate x (FZooS's code, with the queries it makes after an
  update moved to the start of the next step):
    1. query f(x) (the start point at tau = 0, the new iterate after);
    2. tau = 0 on a client's first participation: query ``num_init`` points uniform in
       the box ``x +- init_radius``; tau > 0: query the ``num_explore`` of
       ``num_candidates`` box points with the largest gradient posterior variance;
    3. fit the GP on the ``num_points`` queries nearest to x; return ``grad mu(x)``.
  The exploration GP of step 2 reuses the lengthscale of the previous fit, as FZooS's
  code does; the fit of step 3 selects it afresh. ``aux['local_queries']`` counts the
  queries of steps 1-2: 1, 1 + num_init or 1 + num_explore.
  """
  config.validate()
  e = max(config.num_init, config.num_explore)

  def init(params):
    raise ValueError("surrogate_oracle's state comes from the client's query history: "
                     "give the algorithm init_oracle_state (see algorithms/fzoos.py).")

  def update(x, batch, rng, state):
    _check_vector(x)
    row = first_row(batch)
    k_init, k_explore = jax.random.split(rng)
    fx = value(x, row)
    first = (state.buffer.count == 0) & (state.step == 0)
    buffer = buffer_add(state.buffer, x[None, :], fx[None])

    slots = jnp.arange(e)
    init_pts = uniform_box(k_init, x, config.init_radius, e)
    explore_pts = most_uncertain(buffer, x, k_explore, config.explore_radius,
                                 config.num_candidates, config.num_explore, config,
                                 state.lengthscale)
    explore_pts = jnp.concatenate([explore_pts, init_pts[config.num_explore:]])
    points = jnp.where(first, init_pts, explore_pts)
    mask = jnp.where(first, slots < config.num_init,
                     (state.step > 0) & (slots < config.num_explore))
    values = jax.vmap(value, in_axes=(0, None))(points, row)
    buffer = buffer_add(buffer, points, values, mask)

    post = fit_local_gp(buffer, x, config)
    g = _finite_or_zero(gp_grad(post, x, config.kernel))
    queries = 1 + jnp.sum(mask).astype(jnp.int32)
    state = SurrogateState(buffer, state.step + 1, state.queries + queries, row,
                           rng.astype(jnp.uint32), post.lengthscale)
    return g, {"loss": fx, "local_queries": queries}, state

  return GradientOracle(init, update)


class CorrectionState(NamedTuple):
  """Local steps taken this round (tau)."""
  count: jax.Array


def surrogate_correction(grad_fn: Callable[[Any, Any], Any], gamma: str = "decay"
                         ) -> optax.GradientTransformationExtraArgs:
  """FZooS's adaptive correction ``g + gamma_tau (grad F_hat(x) - grad f_hat_i(x))``.

  A SCAFFOLD-type correction whose control variates are functions of x: the global
  and local surrogates of the previous round, evaluated at the current iterate.

  Args:
    grad_fn: ``(surrogate, x) -> gradient`` (e.g. ``rff_grad`` on ``(rff, nu)``).
    gamma: ``'decay'``: gamma_tau = 1/(tau+1) (FZooS's code); ``'constant'``: 1.

  Returns:
    A transform whose ``update(g, state, params, *, global_surrogate, local_surrogate,
    correction_scale=1.0)`` adds the correction; ``correction_scale`` (0 or 1) switches
    it off before a client or the server has a surrogate.
  """
  _check_choice("gamma", gamma, GAMMAS)

  def init(params):
    del params
    return CorrectionState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, *, global_surrogate=None, local_surrogate=None,
             correction_scale=1.0, **extra):
    del extra
    if params is None or global_surrogate is None or local_surrogate is None:
      raise ValueError("surrogate_correction needs params and the global_surrogate and "
                       "local_surrogate extra arguments.")
    weight = 1.0 / (state.count + 1.0) if gamma == "decay" else 1.0
    weight = weight * correction_scale
    correction = jax.tree.map(jnp.subtract, grad_fn(global_surrogate, params),
                              grad_fn(local_surrogate, params))
    updates = jax.tree.map(lambda g, c: g + (weight * c).astype(g.dtype), updates, correction)
    return updates, CorrectionState(state.count + 1)

  return optax.GradientTransformationExtraArgs(init, update)


def project_to_box(lower, upper) -> optax.GradientTransformation:
  """Projected steps: turns ``u`` into ``clip(x + u, lower, upper) - x``.

  Chain it last on a client whose objective is defined on a box (FZooS's problems
  live on [0, 1]^d and clip outside it, where they are flat: an iterate that leaves
  the box sees no gradient in that coordinate and a surrogate fitted to its trajectory
  can keep pushing it away).
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("project_to_box needs params.")
    new = optax.projections.projection_box(optax.apply_updates(params, updates), lower, upper)
    return jax.tree.map(jnp.subtract, new, params), state

  return optax.GradientTransformation(init, update)

