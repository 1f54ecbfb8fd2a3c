"""FedAvg: local SGD on each client, weighted averaging on the server.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017 (Algorithm 1).

    client: w <- w - eta_l * grad F_k(w; b)  for E epochs of batches b
    server: w_{t+1} = w_t + eta_g * sum_k (n_k / n) (w_k - w_t)      (eta_g = 1 in the paper)
"""
import optax

from fedjax_lab import one_step
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule


def fedavg(example_loss, client_lr: float, server_lr: float = 1.0,
           schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples",
           name: str = "fedavg") -> FederatedAlgorithm:
  """FedAvg with client SGD(``client_lr``) and server SGD(``server_lr``)."""
  # local_sgd: with one local step the round is one gradient (fedjax_lab.one_step).
  return FederatedAlgorithm(
      name=name, **one_step.local_sgd(example_loss, client_lr),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting)


def schedule_from_config(config) -> LocalSchedule:
  """Local schedule from the shared config keys (``local_steps`` wins if set > 0)."""
  steps = config.get("local_steps") or None
  batch = config.get("batch_size")
  return LocalSchedule(batch_size=None if batch in (None, -1, 0) else batch,
                       epochs=None if steps else config.get("local_epochs", 1), steps=steps,
                       shuffle=config.get("shuffle", True))


def from_config(config, example_loss) -> FederatedAlgorithm:
  return fedavg(example_loss, config.client_lr, config.server_lr,
                schedule_from_config(config), config.get("weighting", "num_examples"))
