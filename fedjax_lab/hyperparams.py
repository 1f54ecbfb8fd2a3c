"""Continuous hyper-parameters: numbers or JAX arrays, range-checked only when concrete.

A continuous hyper-parameter of a transform or method (a learning rate, a proximal
strength, a clip norm, an attack radius, ...) is ``ArrayLike``, as in optax: a Python
number, a numpy scalar, or a JAX array, possibly traced (under ``jit``, ``vmap`` over a
grid of values, ``grad`` with respect to it, or held in ``optax.inject_hyperparams``'
state). Its range can only be checked when it is a concrete number, so factories check

    hyperparams.check(lr, lambda v: v > 0, f"lr must be > 0, got {lr}.")

which raises for a bad Python or numpy number and lets arrays and tracers through.
A factory that makes a structural choice from a value (skip the attack when a mix
ratio is 0) takes it from ``static_value``, which is None for arrays, and then uses
the general form, which gives the same numbers.

Static choices (shapes, step counts, Krum's ``f``, which transform, string options)
stay Python values and are validated with plain ``if``s.
"""
import numbers
from typing import Any, Callable, Optional, Sequence

import numpy as np


def is_concrete(value: Any) -> bool:
  """True for a Python or numpy real number (or 0-d numpy array): a value to range-check.

  False for JAX arrays (concrete or traced), None and anything else.
  """
  if isinstance(value, np.ndarray):
    return value.ndim == 0 and (np.issubdtype(value.dtype, np.number)
                                or value.dtype == np.bool_)
  return isinstance(value, (numbers.Real, np.bool_))


def static_value(value: Any) -> Optional[Any]:
  """``value`` itself when it is a concrete number (``is_concrete``), else None."""
  return value if is_concrete(value) else None


def check(value: Any, predicate: Callable[[Any], Any], message: str) -> None:
  """Raises ``ValueError(message)`` if ``value`` is a concrete number failing ``predicate``.

  Args:
    value: a hyper-parameter (number, array, tracer or None).
    predicate: ``value -> bool``, the condition a valid value meets.
    message: the error's text.
  """
  if is_concrete(value) and not predicate(value):
    raise ValueError(message)


def check_all(values: Sequence[Any], predicate: Callable[..., Any], message: str) -> None:
  """``check`` of a condition on several values, tested only when all are concrete."""
  if all(is_concrete(v) for v in values) and not predicate(*values):
    raise ValueError(message)
