"""Client optax transforms of FZooS: the surrogate correction and projection onto a box.

``surrogate_correction`` adds ``gamma_tau (grad F_hat(x) - grad f_hat_i(x))`` (FZooS:
Shu, Lin, Dai, Low, ICML 2024, arXiv 2308.04077), a SCAFFOLD-type correction whose
control variates are the global and local surrogates; ``project_to_box`` keeps the
iterates in the box an objective is defined on.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.zeroth_order.common import _check_choice

GAMMAS = ("decay", "constant")


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
