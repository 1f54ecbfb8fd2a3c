"""One local SGD step per client, averaged: the cohort's round as one gradient.

When every client runs a single step of plain SGD from the broadcast params ``x`` and
the server takes the weighted mean of the deltas, the aggregate is one gradient of the
cohort's weighted loss (the gradient is linear):

    sum_i w_i (x - eta grad L_i(x) - x) / sum_i w_i  =  -eta grad_x sum_i (w_i / W) L_i(x)

Mapped client by client, each client holds its own gradient of the model: a batched
outer product per layer, then a weighted sum over the cohort. The right-hand side
contracts the clients' examples in one matmul per layer, as centralized SGD on the
cohort's examples does. Same numbers up to float rounding (``tests/test_one_step.py``
checks the round against the clients mapped one by one and against numpy).

``local_sgd(example_loss, client_lr)`` gives the pieces of a method whose clients run
plain SGD (FedAvg, FedOpt, FedAvg-M), with a ``OneStepSGD`` that names them. The round
(``algorithm._make_round_body``) computes the aggregate this way only when the method
still holds exactly those pieces and default hooks, the schedule is one local step,
and the backend runs the cohort as one vectorised program.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import aggregate as aggregate_lib
from fedjax_lab import client as client_lib
from fedjax_lab import oracles
from fedjax_lab.transforms import Aggregator, GradientOracle


@dataclasses.dataclass(frozen=True, eq=False)
class OneStepSGD:
  """What a method's clients are, for the one-gradient round.

  Attributes:
    example_loss: the per-example loss the oracle differentiates.
    oracle, client_tx, aggregator: the method's pieces this describes; the shortcut
      is taken only while the method holds these very objects.
  """
  example_loss: Callable
  oracle: GradientOracle
  client_tx: optax.GradientTransformation
  aggregator: Aggregator


def local_sgd(example_loss, client_lr) -> dict:
  """``oracle``, ``client_tx``, ``aggregator`` and ``one_step_sgd`` of a plain local-SGD
  method: first-order oracle, ``optax.sgd(client_lr)``, weighted mean."""
  pieces = {"oracle": oracles.first_order(example_loss), "client_tx": optax.sgd(client_lr),
            "aggregator": aggregate_lib.weighted_mean()}
  return {**pieces, "one_step_sgd": OneStepSGD(example_loss, **pieces)}


def fits_one_step(schedule: client_lib.LocalSchedule, max_examples: int) -> bool:
  """Whether every client's round is one local step (one epoch in one batch, or
  ``steps=1``: FedSGD)."""
  return schedule.num_steps(max_examples) == 1


def _reads_key(loss: Callable, params, batch, key) -> bool:
  """Whether ``loss(params, batch, key)`` uses its key (dropout does; most losses do not)."""
  jaxpr = jax.make_jaxpr(lambda b, k: loss(params, b, k))(batch, key).jaxpr
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  used |= {id(v) for v in jaxpr.outvars}
  key_vars = jaxpr.invars[len(jax.tree.leaves(batch)):]
  return any(id(v) in used for v in key_vars)


def make_mapper(spec: OneStepSGD, schedule: client_lib.LocalSchedule, weighting: str,
                max_examples: int) -> Callable:
  """A mapper with ``parallel.Backend.make_mapper``'s signature for the one-gradient round.

  A loss that does not read its key, over one epoch, is the mean over the client's
  examples in any order: the cohort's rows as gathered then go through the loss as one
  batch (flat: per-example losses, as padding already assumes). Otherwise each
  client's batch, mask and step key are those ``client.local_train`` draws for its
  first step, so a loss that reads its key (dropout) sees the same randomness.
  """
  loss = oracles.batch_loss(spec.example_loss)

  def first_batch(data, size, rng):
    shuffle_key, step_key = jax.random.split(rng)
    indices, mask = client_lib.batch_plan(schedule, size, max_examples, shuffle_key)
    batch = {name: jnp.take(array, indices[0], axis=0, mode="clip") for name, array in data.items()}
    return {**batch, "mask": mask[0]}, jax.random.fold_in(step_key, 0)

  def client_losses(params, data, sizes, keys, order_free):
    if order_free:
      # One batch of every client's rows: XLA keeps its matmuls' operands as they are,
      # where a vmap over clients makes it transpose them ([C, n, d] -> [d, C n]).
      count = sizes.shape[0]
      mask = jnp.arange(max_examples)[None, :] < sizes[:, None]
      flat = {name: a.reshape((count * max_examples,) + a.shape[2:])
              for name, a in {**data, "mask": mask}.items()}
      losses = spec.example_loss(params, flat, keys[0]).reshape(count, max_examples)
      return jax.vmap(oracles.masked_mean)(losses, mask)
    batches, step_keys = jax.vmap(first_batch)(data, sizes, keys)
    return jax.vmap(loss, in_axes=(None, 0, 0))(params, batches, step_keys)

  def mapper(message_down, per_client, agg_state, client_ids=None):
    del client_ids
    client_states, data, sizes, keys = per_client
    params = message_down["params"]
    one_batch = jax.eval_shape(lambda: {**jax.tree.map(lambda a: a[0], data),
                                        "mask": jnp.ones((max_examples,), bool)})
    order_free = schedule.steps is None and not _reads_key(loss, params, one_batch, keys[0])
    if weighting == "num_examples":
      weights = sizes.astype(jnp.float32)
    else:
      weights = (sizes > 0).astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), 1e-12)

    def cohort_loss(params):
      losses = client_losses(params, data, sizes, keys, order_free)
      return jnp.sum(weights * losses) / total, losses

    grads, losses = jax.grad(cohort_loss, has_aux=True)(params)
    updates, _ = spec.client_tx.update(grads, spec.client_tx.init(grads))
    outputs = {"client_state": client_states, "loss": losses,
               "num_steps": (sizes > 0).astype(jnp.int32), "weight": weights,
               "aux_totals": {}}
    return {"delta": updates}, outputs, agg_state

  return mapper
