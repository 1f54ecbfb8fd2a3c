"""FedAvg with exponentially decayed global and local learning rates.

The Decay-G and Decay-SL baselines of FedHyper (Wang, Wang, Li, ICLR 2024, Sec. 5): in
round t the global rate is ``eta_g rate^t`` and every client's local rate is
``eta_l rate^t`` (0.995 per round in the authors' code).
"""
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from algorithms.fedhyper import scale_by_local_lr
from fedjax_lab import hyperparams, oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule


def fedavg_decay(example_loss, client_lr: float, server_lr: float = 1.0, rate: float = 0.995,
                 decay_global: bool = True, decay_local: bool = True,
                 schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
                 ) -> FederatedAlgorithm:
  """FedAvg whose global and/or local rates are multiplied by ``rate ** t`` in round t."""
  hyperparams.check(rate, lambda v: 0.0 < v <= 1.0, f"decay rate must be in (0, 1], got {rate}.")
  # server_lr rate^t, written out: optax.exponential_decay branches on a Python rate.
  server_tx = optax.sgd((lambda count: server_lr * jnp.power(rate, count.astype(jnp.float32)))
                        if decay_global else server_lr)

  def broadcast(state):
    down = {"params": state.params}
    if decay_local:
      down["local_lr"] = client_lr * jnp.power(jnp.float32(rate), state.round.astype(jnp.float32))
    return down

  def client_extra_args(message_down, client_state):
    del client_state
    extra = {"global_params": message_down["params"]}
    if "local_lr" in message_down:
      extra["local_lr"] = message_down["local_lr"]
    return extra

  return FederatedAlgorithm(
      name="fedavg_decay", oracle=oracles.first_order(example_loss),
      client_tx=scale_by_local_lr(client_lr), server_tx=server_tx, schedule=schedule,
      weighting=weighting, broadcast=broadcast, client_extra_args=client_extra_args)


def from_config(config, example_loss):
  return fedavg_decay(example_loss, config.client_lr, config.server_lr,
                      config.get("decay_rate", 0.995), config.get("decay_global", True),
                      config.get("decay_local", True), schedule_from_config(config),
                      config.get("weighting", "num_examples"))
