"""Server rules: a method's own server step, applied before the replaceable ``server_tx``.

The server side of every method is

    g      = -aggregate['delta']                          # the pseudo-gradient
    g, s   = server_rule.update(g, s, params, aggregate=aggregate,
                                cohort_fraction=C / N)    # the method's rule
    u, o   = server_tx.update(g, o, params)               # any optax transform
    params = params + u

A rule is an ``optax.GradientTransformationExtraArgs`` whose state lives in
``ServerState.rule_state``: SCAFFOLD's control update, FedExP's extrapolation, FOT's
projection and FedHyper's rates are rules, so ``server_tx`` can be replaced on every
method and rules compose with ``optax.chain`` (a plain optax transform in a chain
ignores the extra arguments). A rule that only keeps server state (SCAFFOLD's c)
returns ``g`` unchanged; hooks such as a method's broadcast read the state by its
type with ``find_state``.
"""
from typing import Any, Optional

import jax
import optax

ServerRule = optax.GradientTransformationExtraArgs


def identity() -> ServerRule:
  """The rule of methods without one (FedAvg, FedOpt, ...): ``g`` unchanged."""
  return optax.with_extra_args_support(optax.identity())


def chain(*rules) -> ServerRule:
  """``rules`` one after the other (``optax.chain``), each seeing the extra arguments."""
  return optax.chain(*rules)


def find_state(tree: Any, cls: type) -> Optional[Any]:
  """The one ``cls`` state inside a (chained) rule or optimizer state, or None.

  Raises:
    ValueError: if the tree holds more than one.
  """
  nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls))
  found = [x for x in nodes if isinstance(x, cls)]
  if len(found) > 1:
    raise ValueError(f"The state holds {len(found)} {cls.__name__}; expected one.")
  return found[0] if found else None


def require_state(tree: Any, cls: type, what: str) -> Any:
  """``find_state`` that names the missing rule instead of returning None."""
  state = find_state(tree, cls)
  if state is None:
    raise ValueError(f"The server state holds no {cls.__name__}: the method has no {what} "
                     f"rule.")
  return state


def replace_state(tree: Any, new: Any) -> Any:
  """``tree`` with its one state of ``type(new)`` replaced by ``new``."""
  cls = type(new)
  require_state(tree, cls, cls.__name__)
  return jax.tree.map(lambda x: new if isinstance(x, cls) else x, tree,
                      is_leaf=lambda x: isinstance(x, cls))


def keep_aggregate(key: str, state_cls: type) -> ServerRule:
  """A rule that keeps ``aggregate[key]`` as ``state_cls(value)``; ``g`` passes unchanged.

  ``state_cls`` is a one-field NamedTuple naming what is kept (FedHyper-CL's previous
  update, RFFL's reward), so hooks find it by type; it starts as zeros like params.
  """
  def init_fn(params):
    return state_cls(jax.tree.map(jax.numpy.zeros_like, params))

  def update_fn(updates, state, params=None, *, aggregate=None, **extra):
    del state, params, extra
    if aggregate is None:
      raise ValueError(f"keep_aggregate({key!r}) needs the `aggregate` extra argument.")
    return updates, state_cls(aggregate[key])

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
