"""Conventions shared by the zeroth-order modules: the objective, a client's row, checks.

An objective is ``value(x [d], row) -> scalar``; ``row`` is one client's data row (a
dict of arrays without the batch axis), so the round's gather hands every client its
own objective. The optimisation variable ``x`` (the engine's params) is a 1-D array.
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

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
