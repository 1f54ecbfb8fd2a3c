"""FedOpt: adaptive server optimizers on the pseudo-gradient (FedAdam, FedYogi, FedAdagrad).

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2). The server treats -Delta_t = -sum_k w_k Delta_k
as a gradient and applies optax's adam / yogi / adagrad to it; tau (their adaptivity
eps) defaults to 1e-3 as in the paper's experiments.
"""
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule

SERVER_OPTIMIZERS = ("adam", "yogi", "adagrad")


def server_optimizer(kind: str, lr: float, b1: float = 0.9, b2: float = 0.99,
                     tau: float = 1e-3) -> optax.GradientTransformation:
  if kind == "adam":
    return optax.adam(lr, b1=b1, b2=b2, eps=tau)
  if kind == "yogi":
    return optax.yogi(lr, b1=b1, b2=b2, eps=tau)
  if kind == "adagrad":
    return optax.adagrad(lr, initial_accumulator_value=0.0, eps=tau)
  raise ValueError(f"Unknown server optimizer {kind!r}; choose one of {SERVER_OPTIMIZERS}.")


def fedopt(example_loss, kind: str, client_lr: float, server_lr: float,
           schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples",
           b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> FederatedAlgorithm:
  return FederatedAlgorithm(
      name=f"fed{kind}", oracle=oracles.first_order(example_loss),
      client_tx=optax.sgd(client_lr), server_tx=server_optimizer(kind, server_lr, b1, b2, tau),
      schedule=schedule, weighting=weighting)


def from_config_for(kind: str):
  def from_config(config, example_loss):
    return fedopt(example_loss, kind, config.client_lr, config.server_lr,
                  schedule_from_config(config), config.get("weighting", "num_examples"),
                  config.get("server_b1", 0.9), config.get("server_b2", 0.99),
                  config.get("server_tau", 1e-3))
  return from_config
