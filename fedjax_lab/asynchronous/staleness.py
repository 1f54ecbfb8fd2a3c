"""Staleness functions ``s(tau)``: the factor on an update computed ``tau`` versions ago.

Xie, Koyejo, Gupta. "Asynchronous Federated Optimization", 2019, Section 5.2:
constant ``s = 1``; polynomial ``s = (tau + 1)^(-a)``; hinge ``s = 1`` for ``tau <= b``,
else ``1 / (a (tau - b) + 1)``. FedBuff (Nguyen et al. 2022, Section 4) uses
``s = 1 / sqrt(1 + tau)``, the polynomial with ``a = 1/2``.
"""
from typing import Callable

import jax.numpy as jnp

from fedjax_lab import hyperparams

Staleness = Callable  # tau (int array) -> float32 array of the same shape


def constant() -> Staleness:
  return lambda tau: jnp.ones(jnp.shape(tau), jnp.float32)


def polynomial(a=0.5) -> Staleness:
  hyperparams.check(a, lambda v: v >= 0, f"polynomial staleness a must be >= 0, got {a}.")
  return lambda tau: (jnp.asarray(tau, jnp.float32) + 1.0) ** (-a)


def hinge(a=10.0, b=4) -> Staleness:
  hyperparams.check(a, lambda v: v >= 0, f"hinge staleness a must be >= 0, got {a}.")
  hyperparams.check(b, lambda v: v >= 0, f"hinge staleness b must be >= 0, got {b}.")

  def s(tau):
    tau = jnp.asarray(tau, jnp.float32)
    return jnp.where(tau <= b, 1.0, 1.0 / (a * (tau - b) + 1.0))

  return s


def fedbuff() -> Staleness:
  """``1 / sqrt(1 + tau)`` (FedBuff)."""
  return polynomial(0.5)


NAMES = ("constant", "polynomial", "hinge", "fedbuff")


def get(name: str, a=None, b=None) -> Staleness:
  """A staleness function by name; ``a``/``b`` None keep each function's default."""
  if name == "constant":
    return constant()
  if name == "polynomial":
    return polynomial(0.5 if a is None else a)
  if name == "hinge":
    return hinge(10.0 if a is None else a, 4 if b is None else b)
  if name == "fedbuff":
    return fedbuff()
  raise ValueError(f"Unknown staleness function {name!r}; choose one of {', '.join(NAMES)}.")
