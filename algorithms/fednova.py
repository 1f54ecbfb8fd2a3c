"""FedNova: normalised averaging for clients that run different numbers of local steps.

Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020 (eqs. 6-7, Sec. 4; Appendix on
momentum). Client i runs tau_i local SGD steps (epochs of clients of different sizes,
or budgets that differ); with local momentum rho its step weights are
``a_i = [1 - rho^{tau-k}] / (1 - rho)`` and

    ||a_i||_1 = tau_i                                          (plain SGD)
    ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)   (momentum rho)

    d_i = Delta_i / ||a_i||_1,   tau_eff = sum_i p_i ||a_i||_1
    x  <- x + eta_g tau_eff sum_i p_i d_i                      (p_i = n_i / n over the cohort)

Clients upload ``d_i`` as ``delta`` and ``||a_i||_1`` as ``tau``; the weighted mean
gives ``sum p_i d_i`` and ``tau_eff``, and the server rule ``scale_by_effective_steps``
multiplies by ``tau_eff``. With equal tau_i it is FedAvg.
"""
import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams, oracles, server_rules
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule


def step_norm(num_steps, momentum=0.0):
  """``||a_i||_1`` of tau = ``num_steps`` local steps with momentum ``momentum``."""
  tau = num_steps.astype(jnp.float32)
  if hyperparams.static_value(momentum) == 0:
    return tau
  return (tau - momentum * (1.0 - momentum ** tau) / (1.0 - momentum)) / (1.0 - momentum)


def scale_by_effective_steps() -> server_rules.ServerRule:
  """``g <- tau_eff g`` with ``tau_eff = aggregate['tau']`` (FedNova's server step)."""
  def update_fn(updates, state, params=None, *, aggregate=None, **extra):
    del params, extra
    if aggregate is None:
      raise ValueError("scale_by_effective_steps needs the `aggregate` extra argument.")
    tau = aggregate["tau"]
    return jax.tree.map(lambda g: (tau * g).astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def fednova(example_loss, client_lr: float, server_lr: float = 1.0, momentum: float = 0.0,
            schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
            ) -> FederatedAlgorithm:
  """FedNova with local SGD (``momentum`` rho: local heavy ball, restarted every round)."""
  hyperparams.check(momentum, lambda v: 0.0 <= v < 1.0,
                    f"local momentum must be in [0, 1), got {momentum}.")
  trace = None if hyperparams.static_value(momentum) == 0 else momentum

  def client_final(local, message_down, client_state):
    norm = step_norm(local.num_steps, momentum)
    scale = 1.0 / jnp.maximum(norm, 1e-12)
    delta = jax.tree.map(lambda y, x: (y - x) * scale, local.params, message_down["params"])
    return {"delta": delta, "tau": norm}, client_state

  return FederatedAlgorithm(
      name="fednova", oracle=oracles.first_order(example_loss),
      client_tx=optax.sgd(client_lr, momentum=trace), server_tx=optax.sgd(server_lr),
      schedule=schedule, weighting=weighting, server_rule=scale_by_effective_steps(),
      client_final=client_final)


def from_config(config, example_loss):
  return fednova(example_loss, config.client_lr, config.server_lr,
                 config.get("local_momentum", 0.0), schedule_from_config(config),
                 config.get("weighting", "num_examples"))
