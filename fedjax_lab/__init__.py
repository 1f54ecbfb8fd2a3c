"""fedjax_lab: federated learning research in JAX, the library layer.

Importing ``fedjax_lab`` is cheap: the submodules (which import jax, flax and optax)
are imported on first use, so ``import fedjax_lab; fedjax_lab.training`` and
``from fedjax_lab import training`` both work and load only what they name.
"""
import importlib

__version__ = "0.1.0"   # keep equal to [project] version in pyproject.toml

__all__ = [
    "activations",
    "aggregate",
    "algorithm",
    "attacks",
    "byzantine",
    "checkpoint",
    "client",
    "continual",
    "data",
    "distributed",
    "host_states",
    "hyperparams",
    "metrics",
    "models",
    "objectives",
    "oracles",
    "parallel",
    "plotting",
    "privacy",
    "sampling",
    "server_rules",
    "training",
    "transforms",
    "types",
    "zeroth_order",
]


def __getattr__(name):
  if name in __all__:
    return importlib.import_module(f"{__name__}.{name}")   # binds it on the package too
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
