"""FedRep and FedPer: a shared body (representation) and a personal head per client.

FedRep: Collins, Hassani, Mokhtari, Shakkottai. "Exploiting Shared Representations
for Personalized Federated Learning", ICML 2021 (Algorithm 1). Client i, from the
global body phi^t and its own head h_i:

    h_i <- h_i - eta grad_h f_i(phi^t, h_i)          tau_h steps, body fixed   (line 6)
    phi <- phi - eta grad_phi f_i(phi, h_i)         tau_phi steps, head fixed  (line 9)
    server: phi^{t+1} = phi^t + sum_i p_i (phi_i - phi^t); h_i stays on the client.

The authors' code runs 10 head epochs then 1 body epoch; here the phases are counted
in local steps (``head_steps`` then the rest of the schedule's steps).

FedPer: Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with
Personalization Layers", arXiv 1912.00818: the same split, body and head trained
together at every local step; only the base (body) layers are averaged.

The head (``personal_layers``, default the model's last layer) is client i's row of
the client-state table; its part of the uploaded delta is zero, so the server's head
never moves and only the body is aggregated.
"""
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import oracles
from fedjax_lab import personalization as pers
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule


class PhaseState(NamedTuple):
  count: jax.Array   # local steps taken


def alternating_phases(personal_layers: Optional[Sequence[str]], head_steps: int
                       ) -> optax.GradientTransformation:
  """FedRep's two phases: the first ``head_steps`` steps update only the head, then only the body."""
  if head_steps < 0:
    raise ValueError(f"head_steps must be >= 0, got {head_steps}.")

  def update_fn(updates, state, params=None):
    del params
    names = personal_layers or (pers.last_layer(updates),)
    mask = pers.layer_mask(updates, names)
    in_head = state.count < head_steps
    updates = jax.tree.map(
        lambda m, u: jnp.where(in_head == m, u, jnp.zeros_like(u)), mask, updates)
    return updates, PhaseState(state.count + 1)

  return optax.GradientTransformation(lambda params: PhaseState(jnp.zeros((), jnp.int32)),
                                      update_fn)


def _split_model(name, example_loss, client_tx, personal_layers, server_lr, schedule, weighting):
  def layers(params):
    return tuple(personal_layers) if personal_layers else (pers.last_layer(params),)

  def init_client_state(params):
    return pers.take_layers(params, layers(params))

  def init_local_params(message_down, head):
    return pers.put_layers(message_down["params"], head)

  def client_final(local, message_down, head):
    names = layers(local.params)
    delta = jax.tree.map(jnp.subtract, local.params, message_down["params"])
    return {"delta": pers.zero_layers(delta, names)}, pers.take_layers(local.params, names)

  return FederatedAlgorithm(
      name=name, oracle=oracles.first_order(example_loss), client_tx=client_tx,
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      init_client_state=init_client_state, init_local_params=init_local_params,
      client_final=client_final,
      personalize=lambda global_params, head, data, size, rng: pers.put_layers(global_params, head))


def fedrep(example_loss, client_lr: float, head_steps: int,
           personal_layers: Optional[Sequence[str]] = None, server_lr: float = 1.0,
           schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
           ) -> FederatedAlgorithm:
  tx = optax.chain(alternating_phases(personal_layers, head_steps), optax.sgd(client_lr))
  return _split_model("fedrep", example_loss, tx, personal_layers, server_lr, schedule, weighting)


def fedper(example_loss, client_lr: float, personal_layers: Optional[Sequence[str]] = None,
           server_lr: float = 1.0, schedule: LocalSchedule = LocalSchedule(),
           weighting: str = "num_examples") -> FederatedAlgorithm:
  return _split_model("fedper", example_loss, optax.sgd(client_lr), personal_layers, server_lr,
                      schedule, weighting)


def _layers(config):
  layers = config.get("personal_layers")
  return tuple(layers) if layers else None


def from_config(config, example_loss):
  # With a fixed step count, the head phase leaves the body at least one step.
  head_steps = config.get("fedrep_head_steps", 10)
  if config.get("local_steps"):
    head_steps = min(head_steps, config.local_steps - 1)
  return fedrep(example_loss, config.client_lr, head_steps,
                _layers(config), config.server_lr, schedule_from_config(config),
                config.get("weighting", "num_examples"))


def fedper_from_config(config, example_loss):
  return fedper(example_loss, config.client_lr, _layers(config), config.server_lr,
                schedule_from_config(config), config.get("weighting", "num_examples"))
