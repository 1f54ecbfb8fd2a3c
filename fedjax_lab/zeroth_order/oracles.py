"""The zeroth-order gradient oracles of FedZO and FZooS.

* ``two_point_oracle``: FedZO's two-point estimate of the client's objective at every
  local step (Fang et al., IEEE TSP 2022).
* ``surrogate_oracle``: FZooS's local gradient estimate, the gradient of a GP fitted
  to the client's query history, with exploration queries chosen by the largest
  posterior variance of the gradient (Shu, Lin, Dai, Low, "Federated Zeroth-Order
  Optimization using Trajectory-Informed Surrogate Gradients", ICML 2024,
  arXiv 2308.04077), and its ``SurrogateConfig``.

Both are ``GradientOracle``s, composed in ``algorithms/fedzo.py`` and
``algorithms/fzoos.py``.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_lab.transforms import GradientOracle
from fedjax_lab.zeroth_order.buffer import QueryBuffer, buffer_add, buffer_nearest
from fedjax_lab.zeroth_order.common import ObjectiveFn, _check_choice, _check_vector, first_row
from fedjax_lab.zeroth_order.gp import (KERNELS, GPPosterior, fit_best_lengthscale, gp_fit,
                                        gp_grad, gp_grad_variance_trace)
from fedjax_lab.zeroth_order.two_point import DIRECTIONS, SCALES, two_point_estimate


def uniform_box(key: jax.Array, center: jax.Array, radius, num: int) -> jax.Array:
  """``num`` points uniform in the box ``center + [-radius, radius]^d``."""
  return center[None, :] + radius * jax.random.uniform(
      key, (num, center.shape[-1]), minval=-1.0, maxval=1.0, dtype=center.dtype)



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
