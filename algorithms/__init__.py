"""Federated methods by name: ``build(name, config, example_loss)``."""
from typing import Callable

from algorithms import fedavg, fedopt, fedprox, fedsgd, scaffold

REGISTRY: dict[str, Callable] = {
    "fedavg": fedavg.from_config,
    "fedsgd": fedsgd.from_config,
    "fedprox": fedprox.from_config,
    "fedadam": fedopt.from_config_for("adam"),
    "fedyogi": fedopt.from_config_for("yogi"),
    "fedadagrad": fedopt.from_config_for("adagrad"),
    "scaffold": scaffold.from_config,
}


def build(name: str, config, example_loss):
  """The method ``name`` configured from ``config`` (an ml_collections ConfigDict)."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown algorithm {name!r}; known algorithms: {', '.join(sorted(REGISTRY))}.")
  return REGISTRY[name](config, example_loss)
