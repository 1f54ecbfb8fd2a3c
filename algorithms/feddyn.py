"""FedDyn: federated learning with dynamic regularisation.

Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on Dynamic
Regularization", ICLR 2021, Algorithm 1:

    client k in P_t:  theta_k^t = argmin L_k(theta) - <grad L_k(theta_k^{t-1}), theta>
                                          + alpha/2 ||theta - theta^{t-1}||^2
                      (local SGD on the gradient  grad L_k(theta) - g_k + alpha (theta - theta^{t-1}))
                      g_k <- g_k - alpha (theta_k^t - theta^{t-1})          (g_k = grad L_k(theta_k^t))
    server:           h^t = h^{t-1} - alpha (1/m) sum_{k in P_t} (theta_k^t - theta^{t-1})
                      theta^t = (1/|P_t|) sum_{k in P_t} theta_k^t - (1/alpha) h^t

m is the number of clients. ``g_k`` lives in the client states; the local gradient is
``chain(add_control_variate(), proximal(alpha), sgd)`` with control ``-g_k``; h is the
server rule ``dynamic_correction``'s state: with ``g = -mean Delta`` and
``|P_t| / m = cohort_fraction`` it emits ``g + h^t / alpha`` so that ``sgd(1)`` takes
``theta^{t-1} + mean Delta - h^t / alpha``.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams, oracles, server_rules
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import add_control_variate, proximal
from fedjax_lab.types import PyTree


class DynamicState(NamedTuple):
  """h: FedDyn's server state, like params."""
  h: PyTree


def dynamic_correction(alpha) -> server_rules.ServerRule:
  """``h <- h + alpha (|P|/m) g`` (g = -mean Delta), then ``g <- g + h / alpha``."""
  def init_fn(params):
    return DynamicState(jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, cohort_fraction=None, **extra):
    del params, extra
    if cohort_fraction is None:
      raise ValueError("dynamic_correction needs the `cohort_fraction` extra argument.")
    h = jax.tree.map(lambda h, g: h + alpha * cohort_fraction * g, state.h, updates)
    out = jax.tree.map(lambda g, h: g + h / alpha, updates, h)
    return out, DynamicState(h)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def feddyn(example_loss, client_lr: float, alpha: float = 0.01, server_lr: float = 1.0,
           schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform"
           ) -> FederatedAlgorithm:
  hyperparams.check(alpha, lambda a: a > 0, f"FedDyn's alpha must be positive, got {alpha}.")

  def zeros(params):
    return jax.tree.map(jnp.zeros_like, params)

  def client_extra_args(message_down, g_k):
    return {"global_params": message_down["params"], "control": jax.tree.map(jnp.negative, g_k)}

  def client_final(local, message_down, g_k):
    delta = jax.tree.map(jnp.subtract, local.params, message_down["params"])
    new = jax.tree.map(lambda g, d: jnp.where(local.num_steps > 0, g - alpha * d, g), g_k, delta)
    return {"delta": delta}, new

  return FederatedAlgorithm(
      name="feddyn", oracle=oracles.first_order(example_loss),
      client_tx=optax.chain(add_control_variate(), proximal(alpha), optax.sgd(client_lr)),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      server_rule=dynamic_correction(alpha), init_client_state=zeros,
      client_extra_args=client_extra_args, client_final=client_final)


def from_config(config, example_loss):
  return feddyn(example_loss, config.client_lr, config.get("feddyn_alpha", 0.01),
                config.server_lr, schedule_from_config(config),
                config.get("weighting", "uniform"))
