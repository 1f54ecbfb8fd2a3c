"""When to unroll a loop: XLA:CPU keeps a slow convolution layout inside loop bodies.

Measured on the 28x28 CNN (batch 100, one SGD step): 0.15 s as a jitted step, 2.8 s
per step inside a ``lax.scan`` (partial unrolling does not help: the loop body keeps
the slow weight-gradient layout), 0.26 s per step fully unrolled. So loops of a few
convolution steps are unrolled on the CPU; elsewhere, and for loops that hold loops
of their own (their bodies stay slow whatever the outer loop does), they stay loops.
"""
from typing import Callable

import jax
import jax.numpy as jnp

# Beyond this many steps an unrolled loop's compile time (about 0.6 s per CNN step)
# outweighs what it saves in a round.
MAX_UNROLLED_STEPS = 32

_CONVOLUTIONS = ("conv_general_dilated",)
_LOOPS = ("while", "scan")


def _primitives(jaxpr, found: set) -> set:
  for eqn in jaxpr.eqns:
    found.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)   # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          _primitives(inner, found)
  return found


def primitive_names(closed_jaxpr) -> set:
  """Names of every primitive in a (closed) jaxpr, nested calls and loops included."""
  return _primitives(getattr(closed_jaxpr, "jaxpr", closed_jaxpr), set())


def convolves(closed_jaxpr) -> bool:
  """Whether a (closed) jaxpr holds a convolution anywhere."""
  return any(c in primitive_names(closed_jaxpr) for c in _CONVOLUTIONS)


def unroll_steps(step_primitives: set, num_steps: int) -> bool:
  """Whether a loop of ``num_steps`` steps made of ``step_primitives`` should be
  unrolled: on the CPU, when a step convolves and holds no loop of its own, up to
  ``MAX_UNROLLED_STEPS`` steps. Other loops stay loops: their buffers are reused from
  step to step."""
  if jax.default_backend() != "cpu" or not 1 <= num_steps <= MAX_UNROLLED_STEPS:
    return False
  names = step_primitives
  return any(c in names for c in _CONVOLUTIONS) and not any(l in names for l in _LOOPS)


def scan(f: Callable, init, xs=None, length=None, unroll: bool = False):
  """``jax.lax.scan``, or with ``unroll`` the same steps traced one after another.

  ``lax.scan(..., unroll=True)`` still leaves a loop of one trip, in which XLA:CPU
  keeps its slow convolution layout; a traced Python loop leaves none.
  """
  if not unroll:
    return jax.lax.scan(f, init, xs, length=length)
  count = length if xs is None else jax.tree.leaves(xs)[0].shape[0]
  if length is not None and length != count:
    raise ValueError(f"scan got length={length} and xs with {count} rows.")
  carry, ys = init, []
  for i in range(count):
    carry, y = f(carry, None if xs is None else jax.tree.map(lambda x: x[i], xs))
    ys.append(y)
  if not ys:
    return jax.lax.scan(f, init, xs, length=0)
  return carry, jax.tree.map(lambda *rows: jnp.stack(rows), *ys)
