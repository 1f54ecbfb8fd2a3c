"""Decentralized methods: D-PSGD, DFedAvg(M), DFedSAM(-MGS), on any topology.

Node i holds x_i; W is the round's mixing matrix (``fedjax_lab.decentralized``).

* D-PSGD (Lian et al., NeurIPS 2017, Alg. 1):
      x_i^{t+1} = sum_j W_ij x_j^t - eta grad F_i(x_i^t; xi_i^t)
  one local step whose gradient is taken at the node's own model (``mix_and_train``).
* DFedAvgM (Sun, Li, Wang, "Decentralized Federated Averaging", TPAMI 2022, Alg. 1):
      y^{k+1} = y^k - eta g(y^k) + theta (y^k - y^{k-1}),  y^0 = y^{-1} = x_i^t,  K steps
      x_i^{t+1} = sum_j W_ij y_j^K
  heavy-ball momentum restarted every round, which is ``optax.sgd(eta, momentum=theta)``
  from a fresh state; theta = 0 is DFedAvg.
* DFedSAM (Shi et al., "Improving the Model Consistency of Decentralized Federated
  Learning", ICML 2023, Alg. 1):
      y^{k+1} = y^k - eta grad F_i(y^k + rho g/||g||),  g = grad F_i(y^k)  (same batch)
      x_i^{t+1} = sum_j (W^Q)_ij y_j^K
  SAM local steps (``oracles.sharpness_aware``); Q > 1 gossip steps is DFedSAM-MGS.

Every method takes ``variance_correction`` (Tian et al. 2024's variance-corrected
averaging in place of the plain gossip average) and any topology, MoDeST's
decentralized sampling included (``decentralized.modest``).
"""
from typing import Optional

import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import decentralized as dec
from fedjax_lab import hyperparams, oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule


def _local(name, oracle, client_lr, schedule, momentum=0.0) -> FederatedAlgorithm:
  hyperparams.check(momentum, lambda v: 0.0 <= v < 1.0,
                    f"local momentum must be in [0, 1), got {momentum}.")
  trace = None if hyperparams.static_value(momentum) == 0 else momentum
  # The server side is unused: nodes mix their models instead.
  return FederatedAlgorithm(name=name, oracle=oracle,
                            client_tx=optax.sgd(client_lr, momentum=trace),
                            server_tx=optax.identity(), schedule=schedule, weighting="uniform")


def dpsgd(example_loss, client_lr: float, topology: dec.Topology, batch_size: Optional[int] = 32,
          variance_correction: bool = False, shuffle: bool = True) -> dec.Decentralized:
  """D-PSGD: mix, plus one SGD step computed at the node's own model (on a fresh
  random batch each round; ``shuffle=False``: the node's first ``batch_size`` examples)."""
  local = _local("dpsgd", oracles.first_order(example_loss), client_lr,
                 LocalSchedule(batch_size=batch_size, steps=1, shuffle=shuffle))
  return dec.Decentralized("dpsgd", local, topology, order="mix_and_train",
                           variance_correction=variance_correction)


def dfedavgm(example_loss, client_lr: float, topology: dec.Topology,
             schedule: LocalSchedule = LocalSchedule(), momentum: float = 0.9,
             variance_correction: bool = False, name: str = "dfedavgm") -> dec.Decentralized:
  """DFedAvgM: K local momentum-SGD steps, then one gossip step (momentum 0: DFedAvg)."""
  local = _local(name, oracles.first_order(example_loss), client_lr, schedule, momentum)
  return dec.Decentralized(name, local, topology, variance_correction=variance_correction)


def dfedsam(example_loss, client_lr: float, topology: dec.Topology,
            schedule: LocalSchedule = LocalSchedule(), rho: float = 0.05,
            gossip_steps: int = 1, momentum: float = 0.0,
            variance_correction: bool = False) -> dec.Decentralized:
  """DFedSAM (``gossip_steps`` Q > 1: DFedSAM-MGS): K local SAM steps, then Q gossip steps."""
  local = _local("dfedsam", oracles.sharpness_aware(example_loss, rho), client_lr, schedule,
                 momentum)
  return dec.Decentralized("dfedsam", local, topology, gossip_steps=gossip_steps,
                           variance_correction=variance_correction)


def topology_from_config(config, num_nodes: int) -> dec.Topology:
  return dec.topology(config.topology, num_nodes,
                      edge_probability=config.get("edge_probability", 0.2),
                      sample_size=config.get("sample_size") or None,
                      seed=config.get("topology_seed", config.get("seed", 0)))


def from_config(config, example_loss, num_nodes: int) -> dec.Decentralized:
  """The method ``config.algorithm`` (one of ``METHODS``) on ``config.topology``."""
  topology = topology_from_config(config, num_nodes)
  corrected = config.get("variance_correction", False)
  schedule = schedule_from_config(config)
  name = config.algorithm
  if name == "dpsgd":
    batch = config.get("batch_size")
    return dpsgd(example_loss, config.client_lr, topology,
                 None if batch in (None, -1, 0) else batch, corrected,
                 config.get("shuffle", True))
  if name in ("dfedavg", "dfedavgm"):
    momentum = 0.0 if name == "dfedavg" else config.get("momentum", 0.9)
    return dfedavgm(example_loss, config.client_lr, topology, schedule, momentum, corrected,
                    name=name)
  if name == "dfedsam":
    return dfedsam(example_loss, config.client_lr, topology, schedule,
                   config.get("sam_rho", 0.05), config.get("gossip_steps", 1),
                   config.get("momentum", 0.0), corrected)
  raise ValueError(f"Unknown decentralized algorithm {name!r}; choose one of "
                   f"{', '.join(METHODS)}.")


METHODS = ("dpsgd", "dfedavg", "dfedavgm", "dfedsam")
