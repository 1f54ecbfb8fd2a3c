"""FedOpt: adaptive server optimizers on the pseudo-gradient (FedAdam, FedYogi, FedAdagrad).

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2. Clients run SGD; the server treats the averaged
client update Delta_t = sum_k w_k Delta_t^k as a step direction and keeps two moments:

    m_t = b1 m_{t-1} + (1 - b1) Delta_t
    FedAdagrad: v_t = v_{t-1} + Delta_t^2
    FedAdam:    v_t = b2 v_{t-1} + (1 - b2) Delta_t^2
    FedYogi:    v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

with m_{-1} = 0 and v_{-1} = tau^2 (Algorithm 2 asks for v_{-1} >= tau^2; this is the
smallest value it allows). There is no bias correction, tau (the "degree of
adaptivity") is added outside the root, and FedAdagrad keeps the momentum b1 too.
tau defaults to 1e-3, b1 to 0.9 and b2 to 0.99, the paper's experimental settings.

The engine applies ``server_tx`` to the pseudo-gradient g = -Delta_t. The moments are
linear in their input (m) or see only its square (v), so ``scale_by_reddi`` keeps
m^g = -m_t and v_t, emits m^g / (sqrt(v_t) + tau), and ``optax.scale_by_learning_rate``
multiplies by -eta: the update is +eta m_t / (sqrt(v_t) + tau), Algorithm 2's step.

Two conventions, chosen by ``server_optimizer(..., convention=)`` (config key
``server_convention``); the registry names are the same for both:

    convention  "reddi" (default): Algorithm 2     "optax": optax.adam / yogi / adagrad
    moments     m_0 = 0, v_0 = tau^2                adam m_0 = v_0 = 0; yogi m_0 = v_0 = 1e-6;
                                                    adagrad v_0 = 0, no first moment
    bias corr.  none                                adam, yogi: m / (1 - b1^t), v / (1 - b2^t)
    step        eta m / (sqrt(v) + tau)             adam, yogi: eta m_hat / (sqrt(v_hat) + tau);
                                                    adagrad: eta Delta / sqrt(v + tau)
    b1, b2      all three use b1; adam, yogi b2     adagrad ignores b1 and b2

Flower's FedAdam / FedYogi / FedAdagrad strategies also put tau outside the root with no
bias correction on the moments, but start from v = 0, not tau^2; their newer FedAdam
multiplies eta by sqrt(1 - b2^t) / (1 - b1^t), and their FedAdagrad fixes b1 = 0.
``initial_v=0.0`` gives Flower's start.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams, one_step
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule

SERVER_OPTIMIZERS = ("adam", "yogi", "adagrad")
CONVENTIONS = ("reddi", "optax")


class ScaleByReddiState(NamedTuple):
  """mu: the first moment of the input (m^g = -m_t); nu: the second moment v_t."""
  mu: optax.Updates
  nu: optax.Updates


def _check_kind(kind: str) -> None:
  if kind not in SERVER_OPTIMIZERS:
    raise ValueError(f"Unknown server optimizer {kind!r}; choose one of {SERVER_OPTIMIZERS}.")


def _check_moments(b1, b2, tau) -> None:
  hyperparams.check(b1, lambda v: 0.0 <= v < 1.0, f"b1 must be in [0, 1), got {b1}.")
  hyperparams.check(b2, lambda v: 0.0 <= v < 1.0, f"b2 must be in [0, 1), got {b2}.")
  hyperparams.check(tau, lambda v: v > 0, f"tau must be > 0, got {tau}.")


def scale_by_reddi(kind: str, b1=0.9, b2=0.99, tau=1e-3,
                   initial_v=None) -> optax.GradientTransformation:
  """Algorithm 2's preconditioning of Reddi et al. (2021): g -> m / (sqrt(v) + tau).

  With g the input (the pseudo-gradient -Delta_t on the server):

      m_t = b1 m_{t-1} + (1 - b1) g_t
      adagrad: v_t = v_{t-1} + g_t^2
      adam:    v_t = b2 v_{t-1} + (1 - b2) g_t^2
      yogi:    v_t = v_{t-1} - (1 - b2) g_t^2 sign(v_{t-1} - g_t^2)
      output   m_t / (sqrt(v_t) + tau)

  with m_0 = 0 and v_0 = ``initial_v`` (default tau^2); no bias correction. Chain a
  negative learning rate after it (``reddi_server``) for the server step.

  Args:
    kind: ``"adam"``, ``"yogi"`` or ``"adagrad"`` (static).
    b1: the first moment's decay, in [0, 1) (0.9 in the paper's experiments).
    b2: the second moment's decay for adam and yogi, in [0, 1) (0.99); adagrad ignores it.
    tau: the adaptivity constant, > 0 (1e-3).
    initial_v: v_0, >= 0; None (default) is tau^2, Algorithm 2's smallest allowed value.
      0.0 is Flower's start.
    All four continuous arguments may be JAX arrays (``optax.inject_hyperparams``).

  Returns:
    An ``optax.GradientTransformation`` with state ``ScaleByReddiState(mu, nu)``.

  References:
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2.
  """
  _check_kind(kind)
  _check_moments(b1, b2, tau)
  hyperparams.check(initial_v, lambda v: v >= 0, f"initial_v must be >= 0, got {initial_v}.")

  def init_fn(params):
    v0 = tau ** 2 if initial_v is None else initial_v
    return ScaleByReddiState(mu=optax.tree.zeros_like(params),
                             nu=optax.tree.full_like(params, v0))

  def second_moment(g, v):
    g2 = jnp.square(g)
    if kind == "adagrad":
      return v + g2
    if kind == "adam":
      return b2 * v + (1 - b2) * g2
    return v - (1 - b2) * g2 * jnp.sign(v - g2)   # yogi

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = jax.tree.map(lambda g, v: second_moment(g, v).astype(v.dtype), updates, state.nu)
    out = jax.tree.map(lambda m, v: (m / (jnp.sqrt(v) + tau)).astype(m.dtype), mu, nu)
    return out, ScaleByReddiState(mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def reddi_server(kind: str, lr, b1=0.9, b2=0.99, tau=1e-3,
                 initial_v=None) -> optax.GradientTransformation:
  """FedAdam / FedYogi / FedAdagrad's server optimizer, Algorithm 2 of Reddi et al.

  ``chain(scale_by_reddi(kind, b1, b2, tau, initial_v), scale_by_learning_rate(lr))``:
  on the pseudo-gradient g = -Delta_t it emits eta m_t / (sqrt(v_t) + tau) in terms of
  Delta_t, so x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau).

  Args:
    kind: ``"adam"``, ``"yogi"`` or ``"adagrad"``.
    lr: the server rate eta, > 0 (a number, array or optax schedule).
    b1, b2, tau, initial_v: as in ``scale_by_reddi``.
  """
  hyperparams.check(lr, lambda v: v > 0, f"server lr must be > 0, got {lr}.")
  return optax.chain(scale_by_reddi(kind, b1, b2, tau, initial_v),
                     optax.scale_by_learning_rate(lr))


def server_optimizer(kind: str, lr, b1=0.9, b2=0.99, tau=1e-3,
                     convention: str = "reddi") -> optax.GradientTransformation:
  """The server optimizer of FedAdam / FedYogi / FedAdagrad in one of two conventions.

  Args:
    kind: ``"adam"``, ``"yogi"`` or ``"adagrad"``.
    lr: the server rate eta (number, array or schedule).
    b1, b2: moment decays (the optax adagrad uses neither).
    tau: the adaptivity constant (optax's ``eps``).
    convention: ``"reddi"`` (default): Algorithm 2 (``reddi_server``); ``"optax"``:
      ``optax.adam(lr, b1, b2, eps=tau)``, ``optax.yogi(lr, b1, b2, eps=tau)`` or
      ``optax.adagrad(lr, initial_accumulator_value=0, eps=tau)``. The module
      docstring sets the two side by side.
  """
  _check_kind(kind)
  if convention not in CONVENTIONS:
    raise ValueError(f"Unknown FedOpt convention {convention!r}; choose one of {CONVENTIONS}.")
  if convention == "reddi":
    return reddi_server(kind, lr, b1, b2, tau)
  _check_moments(b1, b2, tau)
  if kind == "adam":
    return optax.adam(lr, b1=b1, b2=b2, eps=tau)
  if kind == "yogi":
    return optax.yogi(lr, b1=b1, b2=b2, eps=tau)
  return optax.adagrad(lr, initial_accumulator_value=0.0, eps=tau)


def fedopt(example_loss, kind: str, client_lr: float, server_lr: float,
           schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples",
           b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
           convention: str = "reddi") -> FederatedAlgorithm:
  """FedAdam / FedYogi / FedAdagrad (``kind``): client SGD(``client_lr``), the server
  optimizer ``server_optimizer(kind, server_lr, b1, b2, tau, convention)``."""
  return FederatedAlgorithm(
      name=f"fed{kind}", **one_step.local_sgd(example_loss, client_lr),
      server_tx=server_optimizer(kind, server_lr, b1, b2, tau, convention),
      schedule=schedule, weighting=weighting)


def from_config_for(kind: str):
  def from_config(config, example_loss):
    return fedopt(example_loss, kind, config.client_lr, config.server_lr,
                  schedule_from_config(config), config.get("weighting", "num_examples"),
                  config.get("server_b1", 0.9), config.get("server_b2", 0.99),
                  config.get("server_tau", 1e-3), config.get("server_convention", "reddi"))
  return from_config
