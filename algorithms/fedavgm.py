"""FedAvgM: FedAvg with server momentum.

Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019 (Sec. 3):

    v_{t+1} = beta v_t + Delta_t,      x_{t+1} = x_t + eta_g v_{t+1}

(Delta_t the averaged client update), which is ``optax.sgd(eta_g, momentum=beta)`` on
the pseudo-gradient -Delta_t. A baseline of FedHyper's comparisons.
"""
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams, one_step
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule


def fedavgm(example_loss, client_lr: float, server_lr: float = 1.0, momentum: float = 0.9,
            schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
            ) -> FederatedAlgorithm:
  """FedAvg with server SGD(``server_lr``, ``momentum``); momentum 0 is FedAvg."""
  hyperparams.check(momentum, lambda v: 0.0 <= v < 1.0,
                    f"server momentum must be in [0, 1), got {momentum}.")
  # A concrete 0 drops optax's trace (FedAvg exactly); an array keeps it.
  trace = None if hyperparams.static_value(momentum) == 0 else momentum
  return FederatedAlgorithm(
      name="fedavgm", **one_step.local_sgd(example_loss, client_lr),
      server_tx=optax.sgd(server_lr, momentum=trace), schedule=schedule, weighting=weighting)


def from_config(config, example_loss):
  return fedavgm(example_loss, config.client_lr, config.server_lr,
                 config.get("server_momentum", 0.9), schedule_from_config(config),
                 config.get("weighting", "num_examples"))
