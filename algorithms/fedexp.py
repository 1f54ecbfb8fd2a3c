"""FedExP: FedAvg with a server step extrapolated from the client-update norms.

Jhunjhunwala, Wang, Joshi. "FedExP: Speeding Up Federated Averaging via
Extrapolation", ICLR 2023 (Algorithm 1, the POCS-inspired step size):

    eta_g^t = max(1, sum_i ||Delta_i^t||^2 / (2 M (||Delta^t||^2 + eps)))
    x_{t+1} = x_t + eta_g^t Delta^t,           Delta^t = mean_i Delta_i^t

The extrapolation is the method's server rule (``scale_by_fedexp``), so ``server_tx``
(default ``optax.sgd(server_lr)``) can be replaced. Each client uploads
``||Delta_i||^2`` next to its delta (``client_final``), so the
aggregator's weighted mean gives ``sum_i w_i ||Delta_i||^2`` with the same weights as
Delta (uniform weights give the paper's 1/M). eps defaults to the paper's 1e-3; the
FedHyper code's baseline uses eps = 0 (and M = 10). The paper's optional averaging of
the last two iterates for evaluation is not done here.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams, oracles
from fedjax_lab import server_rules
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.client import LocalSchedule


class FedExpState(NamedTuple):
  """step_size: float32 [], the last eta_g (1 before the first round)."""
  step_size: jax.Array


def scale_by_fedexp(eps=1e-3) -> optax.GradientTransformationExtraArgs:
  """Scales the pseudo-gradient g = -Delta by ``max(1, mean_sq_norm / (2 (||g||^2 + eps)))``.

  ``update(g, state, params, *, aggregate)`` reads ``mean_sq_norm =
  aggregate['sq_norm']``, the weighted mean of the clients' ``||Delta_i||^2``
  (``mean_sq_norm=`` may be passed directly instead). FedExP's server rule; the
  server transform after it sets the rate (``optax.sgd(server_lr)``).

  Args:
    eps: the denominator's offset (1e-3 in the paper); a JAX array is accepted.
  """
  hyperparams.check(eps, lambda v: v >= 0, f"eps must be >= 0, got {eps}.")

  def init_fn(params):
    del params
    return FedExpState(jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None, *, mean_sq_norm=None, aggregate=None, **extra):
    del params, extra, state
    if mean_sq_norm is None and aggregate is not None:
      mean_sq_norm = aggregate.get("sq_norm")
    if mean_sq_norm is None:
      raise ValueError("scale_by_fedexp needs the clients' mean squared update norm: the "
                       "`aggregate['sq_norm']` or `mean_sq_norm` extra argument.")
    # A zero update with eps = 0 would divide 0 by 0; the floor keeps eta_g = 1 then.
    denom = jnp.maximum(2.0 * (optax.tree.norm(updates, squared=True) + eps), 1e-30)
    step = jnp.maximum(1.0, mean_sq_norm / denom)
    return jax.tree.map(lambda g: (step * g).astype(g.dtype), updates), FedExpState(step)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fedexp(example_loss, client_lr: float, server_lr: float = 1.0,
           schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples",
           eps: float = 1e-3) -> FederatedAlgorithm:
  """FedExP with client SGD(``client_lr``); the server step is ``server_lr * eta_g``."""
  def client_final(local, message_down, client_state):
    delta = jax.tree.map(jnp.subtract, local.params, message_down["params"])
    return {"delta": delta, "sq_norm": optax.tree.norm(delta, squared=True)}, client_state

  return FederatedAlgorithm(
      name="fedexp", oracle=oracles.first_order(example_loss), client_tx=optax.sgd(client_lr),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      server_rule=scale_by_fedexp(eps), client_final=client_final)


def server_step_size(state: ServerState) -> jax.Array:
  """The last eta_g of a run whose server rule holds ``scale_by_fedexp``."""
  return server_rules.require_state(state.rule_state, FedExpState, "scale_by_fedexp").step_size


def from_config(config, example_loss):
  return fedexp(example_loss, config.client_lr, config.server_lr, schedule_from_config(config),
                config.get("weighting", "num_examples"), config.get("fedexp_eps", 1e-3))
