"""Momentum that the clients apply: FedAvg-M and SCAFFOLD-M (Cheng et al.), MimeLite.

``fedavgm`` is the server momentum of Hsu et al.; these put a server-kept momentum
into every local step.

* ``fedavg_cm`` -- Cheng, Huang, Wu, Yuan, "Momentum Benefits Non-IID Federated
  Learning Simply and Provably", ICLR 2024, Algorithm 1 (FedAvg-M):
      client i, k = 0..K-1:  g_i^{r,k} = beta grad F(x_i^{r,k}; xi) + (1 - beta) g^r
                              x_i^{r,k+1} = x_i^{r,k} - eta g_i^{r,k}
      server:  g^{r+1} = (1 / (eta K |S|)) sum_{i in S} (x^r - x_i^{r,K})
               x^{r+1} = x^r - gamma g^{r+1}
* ``scaffold_m`` -- the same paper, Algorithm 2 (SCAFFOLD-M):
      g_i^{r,k} = beta (grad F(x_i^{r,k}; xi) - c_i^r + c^r) + (1 - beta) g^r
      c_i^{r+1} = (1/K) sum_k grad F(x_i^{r,k}; xi_i^{r,k})      (i in S; others keep c_i)
      c^{r+1}   = c^r + (1/N) sum_{i in S} (c_i^{r+1} - c_i^r)
      g^{r+1}, x^{r+1} as FedAvg-M.
* ``mimelite`` -- Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich, Suresh, "Breaking the
  centralized barrier for cross-device federated learning" (Mime), NeurIPS 2021,
  Algorithm 1 (MimeLite) with SGD with momentum as the base optimizer:
      client:  y <- y - eta ((1 - beta) grad f_i(y; zeta) + beta m)     (m fixed)
               upload y_i and grad f_i(x)
      server:  m <- (1 - beta) mean_S grad f_i(x) + beta m,   x <- mean_S y_i
  ``grad f_i(x)`` is the mean over the round's local batches of the gradient at the
  round's x (weighted by each batch's examples): over whole epochs, the full-batch
  gradient the paper uses, at twice the gradient evaluations.

The momentum is a server rule's state (``MomentumState``), broadcast to the clients;
the local direction is the client transform ``blend_with_momentum``. K is each
client's own number of steps (it varies in epochs mode). The means are over the
cohort with the run's weighting; ``weighting='uniform'`` (default) is the papers'.
g^0 = 0 and m_0 = 0.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from algorithms.scaffold import ControlState, control_update
from fedjax_lab import hyperparams, oracles, server_rules
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import GradientOracle, add_control_variate, stateless_with_extra_args
from fedjax_lab.types import PyTree


class MomentumState(NamedTuple):
  """momentum: the server-kept momentum (FedAvg-M's g^r, MimeLite's m), like params."""
  momentum: PyTree


def server_momentum(state: ServerState) -> PyTree:
  return server_rules.require_state(state.rule_state, MomentumState, "momentum").momentum


def blend_with_momentum(fresh_weight) -> optax.GradientTransformationExtraArgs:
  """``u = w g + (1 - w) m`` with the broadcast momentum ``m`` (extra argument ``momentum``).

  FedAvg-M / SCAFFOLD-M: ``w = beta``; MimeLite: ``w = 1 - beta``.
  """
  hyperparams.check(fresh_weight, lambda w: 0.0 <= w <= 1.0,
                    f"the fresh gradient's weight must be in [0, 1], got {fresh_weight}.")

  def blend(updates, params, momentum):
    del params
    return jax.tree.map(lambda g, m: fresh_weight * g + (1.0 - fresh_weight) * m, updates,
                        momentum)

  return stateless_with_extra_args(blend, "blend_with_momentum()", ("momentum",))


class GradientSumState(NamedTuple):
  """total: the sum of the raw local gradients; count: how many steps added to it."""
  total: PyTree
  count: jax.Array


def sum_gradients() -> optax.GradientTransformation:
  """Passes gradients unchanged and sums them in its state (SCAFFOLD-M's c_i^{r+1}).

  First in a client chain it sees the oracle's raw gradients; local training keeps
  the state of steps without real examples, so ``total / count`` is their mean.
  """
  def init_fn(params):
    return GradientSumState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    return updates, GradientSumState(jax.tree.map(jnp.add, state.total, updates),
                                     state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def momentum_from_clients() -> server_rules.ServerRule:
  """FedAvg-M's server step: ``g^{r+1} = mean_S aggregate['momentum']``, emitted as the
  pseudo-gradient (``server_tx = sgd(gamma)`` then takes ``x - gamma g^{r+1}``) and kept."""
  def init_fn(params):
    return MomentumState(jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, aggregate=None, **extra):
    del updates, state, params, extra
    if aggregate is None:
      raise ValueError("momentum_from_clients needs the `aggregate` extra argument.")
    momentum = aggregate["momentum"]
    return momentum, MomentumState(momentum)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def momentum_of_gradients(beta) -> server_rules.ServerRule:
  """MimeLite's server optimizer state: ``m <- (1 - beta) aggregate['anchor_grad'] + beta m``;
  the pseudo-gradient passes unchanged (``x <- x + mean Delta`` with ``sgd(1)``)."""
  def init_fn(params):
    return MomentumState(jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, aggregate=None, **extra):
    del params, extra
    if aggregate is None:
      raise ValueError("momentum_of_gradients needs the `aggregate` extra argument.")
    momentum = jax.tree.map(lambda g, m: (1.0 - beta) * g + beta * m, aggregate["anchor_grad"],
                            state.momentum)
    return updates, MomentumState(momentum)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _zeros(params):
  return jax.tree.map(jnp.zeros_like, params)


def _steps(local):
  return jnp.maximum(local.num_steps, 1).astype(jnp.float32)


def _broadcast_momentum(state):
  """The server's params and the momentum buffer its clients step with."""
  return {"params": state.params, "momentum": server_momentum(state)}


def _momentum_extra_args(message_down, client_state):
  del client_state
  return {"global_params": message_down["params"], "momentum": message_down["momentum"]}


def fedavg_cm(example_loss, client_lr: float, global_lr: float, beta: float = 0.1,
              schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform",
              name: str = "fedavg_cm") -> FederatedAlgorithm:
  """FedAvg-M (Algorithm 1). ``global_lr`` is gamma; ``gamma = eta K`` makes the server
  step FedAvg's ``x + mean Delta``. beta = 1 is FedAvg with that server step."""
  hyperparams.check(beta, lambda b: 0.0 < b <= 1.0, f"beta must be in (0, 1], got {beta}.")

  def client_final(local, message_down, client_state):
    delta = jax.tree.map(jnp.subtract, local.params, message_down["params"])
    # (1 / (eta K)) (x^r - x_i^{r,K}): the client's mean local direction.
    mean_direction = jax.tree.map(lambda d: -d / (client_lr * _steps(local)), delta)
    return {"delta": delta, "momentum": mean_direction}, client_state

  return FederatedAlgorithm(
      name=name, oracle=oracles.first_order(example_loss),
      client_tx=optax.chain(blend_with_momentum(beta), optax.sgd(client_lr)),
      server_tx=optax.sgd(global_lr), schedule=schedule, weighting=weighting,
      server_rule=momentum_from_clients(), broadcast=_broadcast_momentum,
      client_extra_args=_momentum_extra_args, client_final=client_final)


def scaffold_m(example_loss, client_lr: float, global_lr: float, beta: float = 0.1,
               schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform"
               ) -> FederatedAlgorithm:
  """SCAFFOLD-M (Algorithm 2): c_i in the client states, c and g^r in the server rules."""
  hyperparams.check(beta, lambda b: 0.0 < b <= 1.0, f"beta must be in (0, 1], got {beta}.")

  def broadcast(state):
    control = server_rules.require_state(state.rule_state, ControlState, "control").control
    return {"params": state.params, "momentum": server_momentum(state), "control": control}

  def client_extra_args(message_down, client_control):
    return {"global_params": message_down["params"], "momentum": message_down["momentum"],
            "control": jax.tree.map(jnp.subtract, message_down["control"], client_control)}

  def client_final(local, message_down, client_control):
    delta = jax.tree.map(jnp.subtract, local.params, message_down["params"])
    sums = server_rules.find_state(local.opt_state, GradientSumState)
    count = jnp.maximum(sums.count, 1).astype(jnp.float32)
    new_control = jax.tree.map(lambda t, old: jnp.where(local.num_steps > 0, t / count, old),
                               sums.total, client_control)
    mean_direction = jax.tree.map(lambda d: -d / (client_lr * _steps(local)), delta)
    message = {"delta": delta, "momentum": mean_direction,
               "control_delta": jax.tree.map(jnp.subtract, new_control, client_control)}
    return message, new_control

  return FederatedAlgorithm(
      name="scaffold_m", oracle=oracles.first_order(example_loss),
      client_tx=optax.chain(sum_gradients(), add_control_variate(), blend_with_momentum(beta),
                            optax.sgd(client_lr)),
      server_tx=optax.sgd(global_lr), schedule=schedule, weighting=weighting,
      server_rule=server_rules.chain(control_update(), momentum_from_clients()),
      init_client_state=_zeros, broadcast=broadcast, client_extra_args=client_extra_args,
      client_final=client_final)


class AnchorGradientState(NamedTuple):
  """anchor: the round's x; total: sum of n_b grad f(x; b) over the batches; count: sum n_b."""
  anchor: PyTree
  total: PyTree
  count: jax.Array


def with_anchor_gradient(example_loss) -> GradientOracle:
  """The first-order oracle that also accumulates the gradient at the anchor x (MimeLite's
  ``grad f_i(x)``) on every batch, weighted by the batch's real examples."""
  base = oracles.first_order(example_loss)
  loss = oracles.batch_loss(example_loss)

  def update(params, batch, rng, state):
    grads, aux, _ = base.update(params, batch, rng, ())
    at_anchor = jax.grad(loss)(state.anchor, batch, rng)
    n = jnp.sum(batch["mask"]).astype(jnp.float32)
    total = jax.tree.map(lambda t, g: t + n * g, state.total, at_anchor)
    return grads, aux, AnchorGradientState(state.anchor, total, state.count + n)

  def init(params):
    # Local training starts the oracle at the broadcast x: the anchor.
    return AnchorGradientState(params, _zeros(params), jnp.zeros((), jnp.float32))

  return GradientOracle(init=init, update=update)


def mimelite(example_loss, client_lr: float, beta: float = 0.9, server_lr: float = 1.0,
             schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform"
             ) -> FederatedAlgorithm:
  """MimeLite with SGD-momentum (beta); ``server_lr`` 1 is the paper's ``x <- mean y_i``."""
  hyperparams.check(beta, lambda b: 0.0 <= b < 1.0, f"beta must be in [0, 1), got {beta}.")
  oracle = with_anchor_gradient(example_loss)

  def client_final(local, message_down, client_state):
    delta = jax.tree.map(jnp.subtract, local.params, message_down["params"])
    anchor = local.oracle_state
    grad = jax.tree.map(lambda t: t / jnp.maximum(anchor.count, 1.0), anchor.total)
    return {"delta": delta, "anchor_grad": grad}, client_state

  return FederatedAlgorithm(
      name="mimelite", oracle=oracle,
      client_tx=optax.chain(blend_with_momentum(1.0 - beta), optax.sgd(client_lr)),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      server_rule=momentum_of_gradients(beta), broadcast=_broadcast_momentum,
      client_extra_args=_momentum_extra_args, client_final=client_final)


def _global_lr(config):
  """``config.global_lr``, or ``server_lr * client_lr * K`` (FedAvg's step) with K the
  fixed ``local_steps``."""
  if config.get("global_lr"):
    return config.global_lr
  if not config.get("local_steps"):
    raise ValueError("fedavg_cm / scaffold_m need config.global_lr (gamma) or a fixed "
                     "config.local_steps K (gamma = server_lr * client_lr * K).")
  return config.server_lr * config.client_lr * config.local_steps


def fedavg_cm_from_config(config, example_loss):
  return fedavg_cm(example_loss, config.client_lr, _global_lr(config),
                   config.get("momentum_beta", 0.1), schedule_from_config(config),
                   config.get("weighting", "uniform"))


def scaffold_m_from_config(config, example_loss):
  return scaffold_m(example_loss, config.client_lr, _global_lr(config),
                    config.get("momentum_beta", 0.1), schedule_from_config(config),
                    config.get("weighting", "uniform"))


def mimelite_from_config(config, example_loss):
  return mimelite(example_loss, config.client_lr, config.get("mime_beta", 0.9),
                  config.server_lr, schedule_from_config(config),
                  config.get("weighting", "uniform"))
