"""Federated methods by name: ``build(name, config, example_loss)`` and ``example_config``.

Each registry entry is a constructor ``(config, example_loss) -> FederatedAlgorithm``
(``(config, problem)`` for the zeroth-order methods, which query a black-box
objective) and the name of a ready config under ``launch/configs`` that the method
runs on. Methods with a task-boundary step (FOT's FedProject, GPM, EWC) or built on
one (FedHyper on FOT) also take the ``model``, whose layers the step reads.
"""
import dataclasses
import importlib
from typing import Callable, Optional

from algorithms import fedavg, fedavg_decay, fedavgm, fedopt, fedprox, fedsgd, scaffold
from algorithms import fal
from algorithms import fedexp, fedhyper
from algorithms import fedewc, fot
from algorithms import fedzo, fzoos
from algorithms import rffl
from algorithms import feddyn, fednova, momentum, sharpness
from algorithms import apfl, ditto, fedbn, fedrep, local_finetune, pfedgate
from algorithms import fedkseed, pfedpg


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered method.

  Attributes:
    build: ``(config, example_loss[, model]) -> FederatedAlgorithm``.
    example: ``(module, argument)``: ``launch.configs.<module>.get_config(argument)``
      (no argument when None) is a config the method runs on.
    takes_model: ``build`` also takes ``model=`` (task-boundary steps).
  """
  build: Callable
  example: tuple[str, Optional[str]]
  takes_model: bool = False


_DIGITS = ("fedavg_digits", None)
_FAL = ("fal_digits", None)
_HYPER = ("fedhyper_digits", None)
_ZO = ("fzoos_synthetic", None)
_PERSONAL = ("personal_digits", None)

REGISTRY: dict[str, Entry] = {
    "fedavg": Entry(fedavg.from_config, _DIGITS),
    "fedsgd": Entry(fedsgd.from_config, _DIGITS),
    "fedprox": Entry(fedprox.from_config, _DIGITS),
    "fedadam": Entry(fedopt.from_config_for("adam"), _DIGITS),
    "fedyogi": Entry(fedopt.from_config_for("yogi"), _DIGITS),
    "fedadagrad": Entry(fedopt.from_config_for("adagrad"), _DIGITS),
    "scaffold": Entry(scaffold.from_config, _DIGITS),
    "fal": Entry(fal.fal_from_config, _FAL),
    "fat": Entry(fal.fat_from_config, _FAL),
    "feddynat": Entry(fal.feddynat_from_config, _FAL),
    "fedhyper_g": Entry(fedhyper.from_config_for("g"), _HYPER, takes_model=True),
    "fedhyper_gm": Entry(fedhyper.from_config_for("gm"), _HYPER, takes_model=True),
    "fedhyper_sl": Entry(fedhyper.from_config_for("sl"), _HYPER),
    "fedhyper_cl": Entry(fedhyper.from_config_for("cl"), _HYPER),
    "fedhyper_g_cl": Entry(fedhyper.from_config_for("g_cl"), _HYPER),
    "fedhyper_full": Entry(fedhyper.from_config_for("full"), _HYPER),
    "fedexp": Entry(fedexp.from_config, _HYPER),
    "fedavg_decay": Entry(fedavg_decay.from_config, _HYPER),
    "fedavgm": Entry(fedavgm.from_config, _HYPER),
    "fot": Entry(fot.from_config, ("fot_permuted_digits", "fot"), takes_model=True),
    "gpm": Entry(fot.gpm_from_config, ("fot_permuted_digits", "gpm"), takes_model=True),
    "fedavg_ewc": Entry(fedewc.from_config, ("fot_permuted_digits", "fedavg_ewc"),
                        takes_model=True),
    "fzoos": Entry(fzoos.from_config, _ZO),
    "fedzo": Entry(fedzo.from_config_for("none"), _ZO),
    "fedzo_prox": Entry(fedzo.from_config_for("prox"), _ZO),
    "fedzo_scaf": Entry(fedzo.from_config_for("scaf"), _ZO),
    "fedzo_diff": Entry(fedzo.from_config_for("diff"), _ZO),
    "rffl": Entry(rffl.from_config, _DIGITS),
    "fedavg_cm": Entry(momentum.fedavg_cm_from_config, ("momentum_sam_digits", "fedavg_cm")),
    "scaffold_m": Entry(momentum.scaffold_m_from_config, ("momentum_sam_digits", "scaffold_m")),
    "mimelite": Entry(momentum.mimelite_from_config, ("momentum_sam_digits", "mimelite")),
    "fedsam": Entry(sharpness.fedsam_from_config, ("momentum_sam_digits", "fedsam")),
    "fedspeed": Entry(sharpness.fedspeed_from_config, ("momentum_sam_digits", "fedspeed")),
    "fednova": Entry(fednova.from_config, ("momentum_sam_digits", "fednova")),
    "feddyn": Entry(feddyn.from_config, ("momentum_sam_digits", "feddyn")),
    "local_finetune": Entry(local_finetune.from_config, _PERSONAL),
    "ditto": Entry(ditto.from_config, _PERSONAL),
    "apfl": Entry(apfl.from_config, _PERSONAL),
    "fedrep": Entry(fedrep.from_config, _PERSONAL),
    "fedper": Entry(fedrep.fedper_from_config, _PERSONAL),
    "fedbn": Entry(fedbn.from_config, ("personal_digits", "fedbn"), takes_model=True),
    "pfedgate": Entry(pfedgate.from_config, _PERSONAL),
    "fedkseed": Entry(fedkseed.from_config, ("fedkseed_text", "tiny")),
    "pfedpg": Entry(pfedpg.from_config, ("fedkseed_text", "pfedpg_tiny")),
}


def _entry(name: str) -> Entry:
  if name not in REGISTRY:
    raise ValueError(f"Unknown algorithm {name!r}; known algorithms: {', '.join(sorted(REGISTRY))}.")
  return REGISTRY[name]


def build(name: str, config, example_loss, model=None):
  """The method ``name`` configured from ``config`` (an ml_collections ConfigDict).

  ``model`` (a ``fedjax_lab.models.Model``) lets continual methods attach their
  task-boundary step; without it they train without one.
  """
  entry = _entry(name)
  if entry.takes_model:
    return entry.build(config, example_loss, model=model)
  return entry.build(config, example_loss)


def example_config(name: str):
  """A ready ``ml_collections.ConfigDict`` that method ``name`` runs on (its launch config).

  ``config.algorithm == name``; the launcher it belongs to follows from its keys
  (``stream``: ``launch.continual``; ``problem``: ``launch.zeroth_order``; else
  ``launch.train``), which ``launch.common.build_any`` dispatches on.
  """
  module, argument = _entry(name).example
  get_config = importlib.import_module(f"launch.configs.{module}").get_config
  config = get_config() if argument is None else get_config(argument)
  config.algorithm = name
  return config
