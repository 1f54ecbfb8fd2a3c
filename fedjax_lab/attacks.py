"""Input attacks: projected gradient descent (PGD) and FGSM, in l_inf and l_2 balls.

PGD (Madry, Makelov, Schmidt, Tsipras, Vladu. "Towards Deep Learning Models Resistant
to Adversarial Attacks", ICLR 2018, eq. 2) maximises a loss over ``x'`` in the ball
``B_p(x, eps)`` intersected with the input range ``[clip_min, clip_max]``:

    x'_0     = x + U(B_p(0, eps))          (random start; x itself without one)
    x'_{s+1} = clip(Proj_{B_p(x, eps)}(x'_s + alpha * step_p(grad_x l(x'_s))))
    step_inf(g) = sign(g),   step_2(g) = g / ||g||_2   (per example)
    Proj_inf(x') = x + clip(x' - x, -eps, eps),   Proj_2(x') = x + d min(1, eps / ||d||_2)

FGSM (Goodfellow, Shlens, Szegedy, ICLR 2015) is one step of size eps without random
start. All functions are pure and jit-able; the loop is a ``lax.fori_loop`` and the
result is wrapped in ``lax.stop_gradient``, so a gradient w.r.t. the model parameters
taken around an attack treats the adversarial inputs as constants.

Shapes: ``x [B, ...]``; ``loss_fn(x) -> [B]`` per-example losses. Each example's
perturbation only depends on its own loss (the attack ascends the sum of the losses).
"""
import dataclasses
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_lab import hyperparams
from fedjax_lab.types import PRNGKey

InputLossFn = Callable[[jax.Array], jax.Array]   # x [B, ...] -> per-example loss [B]

NORMS = ("linf", "l2")
_TINY = 1e-12


def _feature_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def _l2_norm(x: jax.Array) -> jax.Array:
  """Per-example l_2 norm ``[B, 1, ..., 1]`` (broadcastable against ``x``)."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=_feature_axes(x), keepdims=True))


def project(x_adv: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """Projects ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x`` (per example)."""
  delta = x_adv - x
  if norm == "linf":
    return x + jnp.clip(delta, -eps, eps)
  length = _l2_norm(delta)
  return x + delta * jnp.minimum(1.0, eps / jnp.maximum(length, _TINY))


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """The steepest-ascent unit step: ``sign(g)`` (l_inf) or ``g / ||g||_2`` per example (l_2)."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(_l2_norm(grad), _TINY)


def random_start(rng: PRNGKey, x: jax.Array, eps, norm: str) -> jax.Array:
  """``x`` plus a point drawn uniformly from the ``norm`` ball of radius ``eps``."""
  if norm == "linf":
    return x + jax.random.uniform(rng, x.shape, x.dtype, -1.0, 1.0) * eps
  direction_key, radius_key = jax.random.split(rng)
  direction = jax.random.normal(direction_key, x.shape, x.dtype)
  direction = direction / jnp.maximum(_l2_norm(direction), _TINY)
  dim = x[0].size
  radius = jax.random.uniform(radius_key, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
  return x + direction * eps * radius ** (1.0 / dim)


def _clip_range(x: jax.Array, clip_min, clip_max) -> jax.Array:
  if clip_min is None and clip_max is None:
    return x
  return jnp.clip(x, clip_min, clip_max)


def _ascend(loss_fn: InputLossFn, x: jax.Array, rng: PRNGKey, *, eps, step_size, steps: int,
            norm: str, rand_init: bool, clip_min, clip_max) -> jax.Array:
  """The PGD iterations WITHOUT the final stop_gradient (use ``pgd_perturb``)."""
  grad_x = jax.grad(lambda z: jnp.sum(loss_fn(z)))
  start = random_start(rng, x, eps, norm) if rand_init else x
  start = _clip_range(project(start, x, eps, norm), clip_min, clip_max)

  def body(_, x_adv):
    moved = x_adv + step_size * ascent_direction(grad_x(x_adv), norm)
    return _clip_range(project(moved, x, eps, norm), clip_min, clip_max)

  return jax.lax.fori_loop(0, steps, body, start)


def pgd_perturb(loss_fn: InputLossFn, x: jax.Array, rng: PRNGKey, *, eps, step_size,
                steps: int, norm: str = "linf", rand_init: bool = True,
                clip_min: Optional[float] = 0.0, clip_max: Optional[float] = 1.0) -> jax.Array:
  """Adversarial inputs by PGD (see module docstring for the update).

  Args:
    loss_fn: ``x [B, ...] -> [B]``, the per-example loss to maximise; it closes over
      the model parameters and labels.
    x: clean inputs ``[B, ...]``.
    rng: key for the random start (unused without one).
    eps: ball radius (float or scalar array, so it can be a traced hyper-parameter).
    step_size: alpha, the length of each step in the ``norm``.
    steps: number of ascent steps (static int); 0 returns the (random) start.
    norm: ``'linf'`` or ``'l2'``.
    rand_init: start from a uniform point of the ball instead of ``x``.
    clip_min, clip_max: valid input range (None: unbounded).

  Returns:
    ``x_adv [B, ...]`` with ``||x_adv - x||_p <= eps`` per example and inside the
    input range, wrapped in ``lax.stop_gradient``.
  """
  if norm not in NORMS:
    raise ValueError(f"Unknown attack norm {norm!r}; choose one of {', '.join(NORMS)}.")
  if not isinstance(steps, numbers.Integral) or steps < 0:
    raise ValueError(f"Attack steps must be an int >= 0, got {steps!r}.")
  x_adv = _ascend(loss_fn, jax.lax.stop_gradient(x), rng, eps=eps, step_size=step_size,
                  steps=steps, norm=norm, rand_init=rand_init, clip_min=clip_min,
                  clip_max=clip_max)
  return jax.lax.stop_gradient(x_adv)


@dataclasses.dataclass(frozen=True)
class PGD:
  """A configured PGD attack: ``attack(loss_fn, x, rng) -> x_adv``.

  Attributes mirror ``pgd_perturb``; ``steps=1, step_size=eps, rand_init=False`` is FGSM.
  ``eps``, ``step_size``, ``clip_min`` and ``clip_max`` may be JAX arrays (traced
  hyper-parameters); they are range-checked only when they are numbers.
  """
  eps: float
  step_size: float
  steps: int = 10
  norm: str = "linf"
  rand_init: bool = True
  clip_min: Optional[float] = 0.0
  clip_max: Optional[float] = 1.0

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"Unknown attack norm {self.norm!r}; choose one of {', '.join(NORMS)}.")
    if not isinstance(self.steps, numbers.Integral) or self.steps < 0:
      raise ValueError(f"Attack steps must be an int >= 0, got {self.steps!r}.")
    for name in ("eps", "step_size"):
      value = getattr(self, name)
      hyperparams.check(value, lambda v: not v < 0, f"Attack {name} must be >= 0, got {value}.")
    hyperparams.check_all(
        (self.clip_min, self.clip_max), lambda lo, hi: not lo > hi,
        f"Attack clip_min={self.clip_min} is above clip_max={self.clip_max}.")

  def __call__(self, loss_fn: InputLossFn, x: jax.Array, rng: PRNGKey) -> jax.Array:
    return pgd_perturb(loss_fn, x, rng, eps=self.eps, step_size=self.step_size,
                       steps=self.steps, norm=self.norm, rand_init=self.rand_init,
                       clip_min=self.clip_min, clip_max=self.clip_max)


def pgd(eps: float, step_size: Optional[float] = None, steps: int = 10, norm: str = "linf",
        rand_init: bool = True, clip_min: Optional[float] = 0.0,
        clip_max: Optional[float] = 1.0) -> PGD:
  """PGD-``steps`` attack; ``step_size`` defaults to ``2.5 * eps / steps`` (Madry et al.)."""
  if step_size is None:
    step_size = 2.5 * eps / max(steps, 1)
  return PGD(eps, step_size, steps, norm, rand_init, clip_min, clip_max)


def fgsm(eps: float, norm: str = "linf", clip_min: Optional[float] = 0.0,
         clip_max: Optional[float] = 1.0) -> PGD:
  """FGSM: one step of length ``eps`` from ``x`` (the l_2 form is the fast gradient method)."""
  return PGD(eps, eps, 1, norm, False, clip_min, clip_max)
