"""The optax-style interfaces of a federated algorithm and the transforms FL adds.

A federated algorithm composes four pieces:

* ``GradientOracle``: ``(params, batch, rng, state) -> (grads, aux, state)``; the
  first-order oracle differentiates a loss, others attack the inputs (PGD) or only
  query function values (zeroth order).
* client transform: an ``optax.GradientTransformationExtraArgs`` applied to the
  oracle's gradients at every local step. The round passes extra keyword arguments
  (``global_params`` always, plus whatever a method broadcasts, e.g. SCAFFOLD's
  ``control``); optax's ``chain`` forwards them to the transforms that take them.
* ``Aggregator``: stacked client messages ``[C, ...]`` and weights ``[C]`` -> one
  message. It does not know where the clients are placed: the backend hands it
  ``Collectives`` (``sum`` and ``gather`` over clients), which are the identity on one
  device and ``psum`` / ``all_gather`` over the clients' devices when they are
  sharded. Weighted sums also come as a ``SumStream``, which a chunked client map
  accumulates.
* server transform: any optax transform, applied to the pseudo-gradient
  ``-aggregated_delta``; ``optax.sgd(1.0)`` is FedAvg's server.

Where optax has a transform, use optax; this module only holds what FL adds.
"""
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.types import Batch, Params, PRNGKey, PyTree


class GradientOracle(NamedTuple):
  """Produces a gradient estimate at ``params`` from one batch.

  init: ``params -> state`` (per local run; ``()`` for stateless oracles).
  update: ``(params, batch, rng, state) -> (grads, aux, state)`` with ``aux`` a dict
    of scalars that contains at least ``'loss'``.
  """
  init: Callable[[Params], PyTree]
  update: Callable[[Params, Batch, PRNGKey, PyTree], tuple[Params, dict, PyTree]]


class Collectives(NamedTuple):
  """Reductions over the clients of a cohort, wherever the backend placed them.

  An aggregator sees the clients of its placement (all of them on one device, one
  device's share when they are sharded); these combine the placements, so the same
  aggregator runs on every backend (DrJAX's ``reduce_sum``, FedJAX's ``for_each_client``
  aggregation).

  sum: ``tree -> tree``, each leaf summed over the placements (a partial sum in, the
    total out); identity on one device, ``psum`` over the clients' devices.
  gather: ``tree [K, ...] -> tree [C, ...]``, the placements' stacked clients
    concatenated in cohort order, the same on every placement; identity on one
    device, ``all_gather(tiled=True)`` over the clients' devices.

  On the ``sharded`` backend the varying-axes check is on: an aggregate that still
  depends on one device's clients (a partial sum that never went through ``sum``)
  cannot leave the mapped region and fails when the round is traced.
  """
  sum: Callable[[PyTree], PyTree]
  gather: Callable[[PyTree], PyTree]


def _identity(tree):
  return tree


# All clients in one place (the ``vmap`` and ``loop`` backends, or a test).
LOCAL_COLLECTIVES = Collectives(sum=_identity, gather=_identity)


def as_collectives(collectives: Optional[Collectives]) -> Collectives:
  """``collectives``, or ``LOCAL_COLLECTIVES`` for None (an aggregator called directly)."""
  if collectives is None:
    return LOCAL_COLLECTIVES
  if not isinstance(collectives, Collectives):
    raise TypeError(f"Aggregators take transforms.Collectives (from the backend) or None, "
                    f"got {collectives!r}; they no longer take a mesh axis name.")
  return collectives


class SumStream(NamedTuple):
  """An aggregation that is a sum over clients, computed a chunk of clients at a time.

  zero: ``message_shapes -> acc``; ``message_shapes`` is one client's message as
    ``jax.ShapeDtypeStruct`` leaves (no clients axis).
  add: ``(acc, messages [K, ...], weights [K], state) -> acc`` for a chunk of ``K``
    clients; ``acc`` keeps its shapes and dtypes. A client of weight 0 must add
    nothing (padding, and clients a chunk recomputes, are passed with weight 0).
  finish: ``(acc, state, collectives) -> (aggregate, state)``: sums ``acc`` over the
    placements first (``collectives.sum``), then e.g. divides by the total weight.
    ``collectives`` None means all clients are here (``LOCAL_COLLECTIVES``).

  ``finish(add(zero(shapes), messages, weights, state), state, collectives)`` must be
  the aggregator's ``update``, up to the order of the floating-point sums.
  """
  zero: Callable[[PyTree], PyTree]
  add: Callable[[PyTree, PyTree, jax.Array, PyTree], PyTree]
  finish: Callable[[PyTree, PyTree, Optional[Collectives]], tuple[PyTree, PyTree]]


class Aggregator(NamedTuple):
  """Reduces stacked client messages to one.

  init: ``() -> state``.
  update: ``(messages [K, ...], weights [K], state, collectives) -> (aggregate, state)``
    for the ``K`` clients of this placement (the whole cohort on one device);
    the reduction goes through ``collectives`` (``Collectives``: ``sum`` for sums,
    ``gather`` for statistics of the whole cohort), None meaning all clients are here.
  stream: the same aggregation as a running sum (``SumStream``), or None when it
    needs all messages at once (median, Krum, ...). With it, a chunked client map
    (``parallel.make_mapper(chunk_size=...)``) adds each chunk's messages to an
    accumulator instead of stacking all ``C`` of them. A wrapper that changes
    ``update`` builds a new ``Aggregator(init, update)`` (no stream) rather than
    ``_replace(update=...)``, which would keep a stream that bypasses it.
  """
  init: Callable[[], PyTree]
  update: Callable[[PyTree, jax.Array, PyTree, Optional[Collectives]], tuple[PyTree, PyTree]]
  stream: Optional[SumStream] = None


def stateless_with_extra_args(fn: Callable, name: str, required: Sequence[str] = (),
                              optional: Sequence[str] = (), needs_params: bool = False
                              ) -> optax.GradientTransformationExtraArgs:
  """A stateless transform ``updates' = fn(updates, params, **extras)`` that reads extra
  arguments of the round (``global_params``, ``control``, ``bases``, ...).

  What ``optax.stateless`` is for transforms that take extra arguments: ``fn``
  receives the ``required`` ones (an absent one raises a ValueError naming ``name``
  and the argument) and the ``optional`` ones (None when absent); other extra
  arguments are ignored, so the transform chains with any other.
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra):
    if needs_params and params is None:
      raise ValueError(f"{name} needs params.")
    missing = [k for k in required if extra.get(k) is None]
    if missing:
      raise ValueError(f"{name} needs the `{missing[0]}` extra argument.")
    kwargs = {k: extra.get(k) for k in (*required, *optional)}
    return fn(updates, params, **kwargs), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def proximal(mu: jax.typing.ArrayLike) -> optax.GradientTransformationExtraArgs:
  """FedProx's proximal term as a gradient transform (Li et al. 2020, eq. 2).

  The local objective ``F_k(w) + mu/2 ||w - w_t||^2`` has gradient
  ``g + mu (w - w_t)``; chain this before ``optax.sgd``.

  Args:
    mu: proximal strength, a number or a scalar array (``optax.inject_hyperparams``,
      vmapped or differentiated runs); 0 gives FedAvg.

  Returns:
    A transform whose ``update(grads, state, params, *, global_params)`` adds
    ``mu * (params - global_params)`` to ``grads``.
  """
  def add_proximal(updates, params, global_params):
    return jax.tree.map(lambda g, w, w0: g + mu * (w - w0), updates, params, global_params)

  return stateless_with_extra_args(add_proximal, "proximal()", ("global_params",),
                                   needs_params=True)


def add_control_variate() -> optax.GradientTransformationExtraArgs:
  """SCAFFOLD's corrected local gradient ``g - c_i + c`` (Karimireddy et al. 2020, eq. 3).

  The round passes ``control = c - c_i`` as an extra argument.
  """
  return stateless_with_extra_args(lambda u, params, control: jax.tree.map(jnp.add, u, control),
                                   "add_control_variate()", ("control",))


def as_extra_args(tx: Any) -> optax.GradientTransformationExtraArgs:
  """Lets plain optax transforms ignore the round's extra keyword arguments."""
  return optax.with_extra_args_support(tx)
