"""FedAvg, then local fine-tuning: each client adapts the global model on its own data.

The personalization baseline of Wang, Mathews, Kiddon, Eichner, Beaufays, Ramage,
"Federated Evaluation of On-device Personalization", arXiv 1910.10252 (Sec. 2) and
Yu, Bagdasaryan, Shmatikov, "Salvaging Federated Learning by Local Adaptation",
arXiv 2002.04758: training is FedAvg (McMahan et al. 2017, Algorithm 1); client i
is evaluated with

    theta_i = theta^T - eta_ft sum_{steps} grad F_i(theta)     (``finetune_epochs`` epochs
                                                                of SGD on its train split)

No client state is kept: the fine-tuning runs at evaluation.
"""
import dataclasses

import optax

from algorithms import fedavg
from algorithms.fedavg import schedule_from_config
from fedjax_lab import oracles
from fedjax_lab import personalization as pers
from fedjax_lab.client import LocalSchedule


def local_finetune(example_loss, client_lr: float, finetune_lr: float, finetune_epochs: int,
                   finetune_batch_size=None, server_lr: float = 1.0,
                   schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"):
  if finetune_epochs < 1:
    raise ValueError(f"finetune_epochs must be >= 1, got {finetune_epochs}.")
  method = fedavg.fedavg(example_loss, client_lr, server_lr, schedule, weighting,
                         name="local_finetune")
  # Epochs, not steps: a padded client's batches then hold each example once.
  finetune = LocalSchedule(batch_size=finetune_batch_size, epochs=finetune_epochs)
  personalize = pers.local_finetuning(oracles.first_order(example_loss),
                                      optax.sgd(finetune_lr), finetune)
  return dataclasses.replace(method, personalize=personalize)


def from_config(config, example_loss):
  return local_finetune(
      example_loss, config.client_lr, config.get("finetune_lr") or config.client_lr,
      config.get("finetune_epochs", 5), config.get("batch_size") or None, config.server_lr,
      schedule_from_config(config), config.get("weighting", "num_examples"))
