"""FedZO's two-point random-direction gradient estimate.

Fang et al., "Communication-Efficient Stochastic Zeroth-Order Optimization for
Federated Learning", IEEE TSP 2022:
``g = (c/q) sum_j [f(x + mu u_j) - f(x)]/mu u_j`` with Gaussian, sphere or orthonormal
directions ``u_j``.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_lab.zeroth_order.common import _check_choice

DIRECTIONS = ("gaussian", "sphere", "orthonormal")
SCALES = ("1", "d")



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
