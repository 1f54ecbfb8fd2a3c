"""FedSGD: one full-batch gradient per client per round.

McMahan et al., AISTATS 2017 (the FedSGD baseline): each client computes
g_k = grad F_k(w_t) on all its data; the server steps w_{t+1} = w_t - eta sum_k (n_k/n) g_k.
Here the client takes one full-batch SGD step of size ``client_lr`` (so its delta is
-client_lr * g_k) and the server applies SGD(``server_lr``) to the averaged delta:
the effective rate is client_lr * server_lr.
"""
from algorithms.fedavg import fedavg
from fedjax_lab.client import LocalSchedule


def fedsgd(example_loss, client_lr: float, server_lr: float = 1.0,
           weighting: str = "num_examples"):
  return fedavg(example_loss, client_lr, server_lr,
                LocalSchedule(batch_size=None, epochs=1, shuffle=False), weighting, name="fedsgd")


def from_config(config, example_loss):
  return fedsgd(example_loss, config.client_lr, config.server_lr,
                config.get("weighting", "num_examples"))
