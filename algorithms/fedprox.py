"""FedProx: FedAvg whose clients minimise F_k(w) + mu/2 ||w - w_t||^2.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
Networks", MLSys 2020 (Algorithm 2, eq. 2). The proximal term is a client transform
(``fedjax_lab.transforms.proximal``) chained before SGD.
"""
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import proximal


def fedprox(example_loss, client_lr: float, mu: float, server_lr: float = 1.0,
            schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
            ) -> FederatedAlgorithm:
  return FederatedAlgorithm(
      name="fedprox", oracle=oracles.first_order(example_loss),
      client_tx=optax.chain(proximal(mu), optax.sgd(client_lr)),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting)


def from_config(config, example_loss):
  return fedprox(example_loss, config.client_lr, config.get("prox_mu", 0.01), config.server_lr,
                 schedule_from_config(config), config.get("weighting", "num_examples"))
