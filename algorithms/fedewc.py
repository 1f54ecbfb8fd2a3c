"""FedAvg + EWC: clients add an elastic penalty built from a server-aggregated Fisher.

Kirkpatrick et al. "Overcoming catastrophic forgetting in neural networks", PNAS 2017
(EWC, eq. 3), in its online form (Schwarz et al., "Progress & Compress", ICML 2018,
eq. 8), as the FL+EWC baseline of continual FL papers (e.g. FOT, ICLR 2024):

    client loss:   F_k(w) + lambda/2 sum_p Fisher_p (w_p - w*_p)^2
    its gradient:  g + lambda Fisher (w - w*)                            (ewc_penalty)
    task end t:    Fisher_t = sum_i (n_i / n) mean_{(x,y) in D_i} (grad log p(y|x; w*))^2
                   Fisher <- gamma Fisher + Fisher_t;   w* <- w (the model after task t)

The diagonal Fisher is the empirical one (true labels); each client computes it on its
own data and only the weighted mean reaches the server. ``gamma = 1`` sums the tasks'
Fishers (one quadratic per task with a shared anchor).
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import aggregate as aggregate_lib
from fedjax_lab import continual
from fedjax_lab import oracles
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState, default_client_extra_args
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import stateless_with_extra_args


def ewc_penalty(strength: float) -> optax.GradientTransformationExtraArgs:
  """Adds ``strength * fisher * (params - anchor)`` (extra argument ``ewc``)."""
  def add_penalty(updates, params, ewc):
    return jax.tree.map(lambda g, f, w, a: g + strength * f * (w - a),
                        updates, ewc["fisher"], params, ewc["anchor"])

  # ewc = {'fisher', 'anchor'}, broadcast by the server.
  return stateless_with_extra_args(add_penalty, "ewc_penalty()", ("ewc",), needs_params=True)


def fedavg_ewc(example_loss, client_lr: float, strength: float, server_lr: float = 1.0,
               schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform"
               ) -> FederatedAlgorithm:
  """FedAvg whose clients add the EWC penalty; pair with ``FisherUpdate`` at task ends."""
  def init_extra(params):
    return {"ewc": {"fisher": jax.tree.map(jnp.zeros_like, params),
                    "anchor": jax.tree.map(jnp.asarray, params)}}

  def broadcast(state):
    return {"params": state.params, "ewc": state.extra["ewc"]}

  def client_extra_args(message_down, client_state):
    return {**default_client_extra_args(message_down, client_state), "ewc": message_down["ewc"]}

  return FederatedAlgorithm(
      name="fedavg_ewc", oracle=oracles.first_order(example_loss),
      client_tx=optax.chain(ewc_penalty(strength), optax.sgd(client_lr)),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      init_extra=init_extra, broadcast=broadcast, client_extra_args=client_extra_args)


def diagonal_fisher(example_loss, params, data: dict, mask: jax.Array, rng) -> dict:
  """Mean over the masked examples of the squared per-example loss gradient."""
  def one(example):
    batch = jax.tree.map(lambda v: v[None], example)
    return jax.grad(lambda p: example_loss(p, batch, rng)[0])(params)

  grads = jax.vmap(one)(data)
  weights = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  return jax.tree.map(lambda g: jnp.tensordot(weights, g ** 2, axes=1) / count, grads)


@dataclasses.dataclass
class FisherUpdate:
  """Task-end hook: the clients' aggregated Fisher and the new anchor.

  Attributes:
    example_loss: per-example loss ``(params, batch, rng) -> [B]``.
    gamma: decay of the previous tasks' Fisher (1: sum).
    clients: clients that contribute (0: all).
    samples: examples per client (0: all).
    backend: ``loop``/``vmap``/``sharded``.
  """
  example_loss: Callable
  gamma: float = 1.0
  clients: int = 0
  samples: int = 0
  backend: str = "vmap"

  def __post_init__(self):
    self._stat = None

  def _client_fn(self, params, one_client):
    data, size, rng = one_client
    mask = jnp.arange(data["y"].shape[0]) < size
    fisher = diagonal_fisher(self.example_loss, params, data, mask, rng)
    return fisher, size.astype(jnp.float32), ()

  def __call__(self, state: ServerState, task, task_index: int, rng):
    del task_index
    if self._stat is None:
      self._stat = continual.make_client_statistic(
          self._client_fn, aggregate_lib.weighted_mean(), self.backend)
    fisher_t = continual.run_client_statistic(self._stat, state.params, task.train, rng,
                                              self.clients, self.samples, self.backend)
    old = state.extra["ewc"]["fisher"]
    fisher = jax.tree.map(lambda f, ft: self.gamma * f + ft, old, fisher_t)
    ewc = {"fisher": fisher, "anchor": state.params}
    total = sum(float(jnp.sum(f)) for f in jax.tree.leaves(fisher))
    return state._replace(extra={**state.extra, "ewc": ewc}), {"fisher_sum": total}


def from_config(config, example_loss, model=None) -> FederatedAlgorithm:
  """FedAvg-EWC from ``config``; the aggregated Fisher is its task-end step."""
  del model   # the Fisher needs only the loss
  method = fedavg_ewc(example_loss, config.client_lr, config.get("ewc_lambda", 100.0),
                      config.get("server_lr", 1.0), schedule_from_config(config),
                      config.get("weighting", "uniform"))
  return dataclasses.replace(method, task_boundary=fisher_from_config(
      config, example_loss, config.get("backend", "vmap")))


def fisher_from_config(config, example_loss, backend: str = "vmap") -> FisherUpdate:
  return FisherUpdate(example_loss, config.get("ewc_gamma", 1.0), config.get("ewc_clients", 0),
                      config.get("ewc_samples", 0), backend)
