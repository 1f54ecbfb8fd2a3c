"""Federated methods by name: ``build(name, config, example_loss)``."""
from typing import Callable

from algorithms import fedavg, fedopt, fedprox, fedsgd, scaffold
from algorithms import fal
from algorithms import fedexp, fedhyper
from algorithms import fedewc, fot
from algorithms import fedzo, fzoos
from algorithms import rffl

REGISTRY: dict[str, Callable] = {
    "fedavg": fedavg.from_config,
    "fedsgd": fedsgd.from_config,
    "fedprox": fedprox.from_config,
    "fedadam": fedopt.from_config_for("adam"),
    "fedyogi": fedopt.from_config_for("yogi"),
    "fedadagrad": fedopt.from_config_for("adagrad"),
    "scaffold": scaffold.from_config,
    "fal": fal.fal_from_config,
    "fat": fal.fat_from_config,
    "feddynat": fal.feddynat_from_config,
    "fedhyper_g": fedhyper.from_config_for("g"),
    "fedhyper_gm": fedhyper.from_config_for("gm"),
    "fedhyper_sl": fedhyper.from_config_for("sl"),
    "fedhyper_cl": fedhyper.from_config_for("cl"),
    "fedhyper_g_cl": fedhyper.from_config_for("g_cl"),
    "fedhyper_full": fedhyper.from_config_for("full"),
    "fedexp": fedexp.from_config,
    "fedavg_decay": fedhyper.fedavg_decay_from_config,
    "fedavgm": fedhyper.fedavgm_from_config,
    "fot": fot.from_config,
    "gpm": fot.gpm_from_config,
    "fedavg_ewc": fedewc.from_config,
    "fzoos": fzoos.from_config,
    "fedzo": fedzo.from_config_for("none"),
    "fedzo_prox": fedzo.from_config_for("prox"),
    "fedzo_scaf": fedzo.from_config_for("scaf"),
    "fedzo_diff": fedzo.from_config_for("diff"),
    "rffl": rffl.from_config,
}


def build(name: str, config, example_loss):
  """The method ``name`` configured from ``config`` (an ml_collections ConfigDict)."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown algorithm {name!r}; known algorithms: {', '.join(sorted(REGISTRY))}.")
  return REGISTRY[name](config, example_loss)
