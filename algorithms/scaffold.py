"""SCAFFOLD: local steps corrected by control variates.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020 (Algorithm 1, option II):

    client i:  y <- y - eta_l (g_i(y) - c_i + c)                       (eq. 3, K steps)
               c_i+ = c_i - c + (x - y) / (K eta_l)                     (option II)
               upload (Delta y_i, Delta c_i) = (y - x, c_i+ - c_i)
    server:    x <- x + eta_g * mean_S Delta y_i
               c <- c + (|S| / N) * mean_S Delta c_i

c_i lives in the per-client state ``[N, ...]``; c in the server rule's state
(``ControlState``, updated by ``control_update``), so any ``server_tx`` replaces the
``eta_g`` step and the control update stays. K is
the number of steps the client actually took (it varies with client size in epochs
mode). The means use the run's client weighting; with ``weighting='uniform'`` they are
exactly the paper's.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import oracles
from fedjax_lab import server_rules
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import add_control_variate
from fedjax_lab.types import PyTree


class ControlState(NamedTuple):
  """control: the global control variate c, shaped like params."""
  control: PyTree


def control_update() -> server_rules.ServerRule:
  """``c <- c + (|S| / N) mean_S Delta c_i``; the pseudo-gradient passes unchanged.

  Reads ``aggregate['control_delta']`` and ``cohort_fraction`` (extra arguments of the
  server step). Also FedZO's SCAFFOLD-type corrections.
  """
  def init_fn(params):
    return ControlState(jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, aggregate=None, cohort_fraction=None, **extra):
    del params, extra
    if aggregate is None or cohort_fraction is None:
      raise ValueError("control_update needs the `aggregate` and `cohort_fraction` extra "
                       "arguments of the server step.")
    control = jax.tree.map(lambda c, dc: c + cohort_fraction * dc, state.control,
                           aggregate["control_delta"])
    return updates, ControlState(control)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def global_control(state: ServerState) -> PyTree:
  """The global control variate c of a state whose rule holds ``control_update``."""
  return server_rules.require_state(state.rule_state, ControlState, "control_update").control


def scaffold(example_loss, client_lr: float, server_lr: float = 1.0,
             schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform"
             ) -> FederatedAlgorithm:
  def zeros(params):
    return jax.tree.map(jnp.zeros_like, params)

  def broadcast(state):
    return {"params": state.params, "control": global_control(state)}

  def client_extra_args(message_down, client_control):
    correction = jax.tree.map(jnp.subtract, message_down["control"], client_control)
    return {"global_params": message_down["params"], "control": correction}

  def client_final(local, message_down, client_control):
    x, c = message_down["params"], message_down["control"]
    scale = 1.0 / (jnp.maximum(local.num_steps, 1).astype(jnp.float32) * client_lr)
    new_control = jax.tree.map(lambda ci, cc, x0, y: ci - cc + (x0 - y) * scale,
                               client_control, c, x, local.params)
    # A client with no steps (padding) keeps its control variate.
    new_control = jax.tree.map(lambda new, old: jnp.where(local.num_steps > 0, new, old),
                               new_control, client_control)
    message_up = {"delta": jax.tree.map(jnp.subtract, local.params, x),
                  "control_delta": jax.tree.map(jnp.subtract, new_control, client_control)}
    return message_up, new_control

  return FederatedAlgorithm(
      name="scaffold", oracle=oracles.first_order(example_loss),
      client_tx=optax.chain(add_control_variate(), optax.sgd(client_lr)),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      server_rule=control_update(), init_client_state=zeros,
      broadcast=broadcast, client_extra_args=client_extra_args, client_final=client_final)


def from_config(config, example_loss):
  return scaffold(example_loss, config.client_lr, config.server_lr,
                  schedule_from_config(config), config.get("weighting", "uniform"))
