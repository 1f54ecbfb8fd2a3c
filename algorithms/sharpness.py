"""Sharpness-aware local training: FedSAM and FedSpeed.

* ``fedsam`` -- Qu, Li, Duan, Liu, Tang, Lu, "Generalized Federated Learning via
  Sharpness Aware Minimization", ICML 2022, Algorithm 1 (also Caldarola, Caputo,
  Ciccone, ECCV 2022): FedAvg whose local step is SAM's (Foret et al., ICLR 2021, eq. 2):
      e = rho g / ||g||,  g = grad F_i(y; b);    y <- y - eta grad F_i(y + e; b)
  (``oracles.sharpness_aware``); the server averages as FedAvg.
* ``fedspeed`` -- Sun, Shen, Chen, Ding, Tao, "FedSpeed: Larger Local Interval, Less
  Communication Round, and Higher Generalization Accuracy", ICLR 2023, Algorithm 1:
      g1 = grad f_i(x^{t,k}; b),  g2 = grad f_i(x^{t,k} + rho g1; b)
      g  = (1 - alpha) g1 + alpha g2                                   (merged gradient)
      x^{t,k+1} = x^{t,k} - eta (g - ghat_i + (1/lambda)(x^{t,k} - x^t))
      ghat_i <- ghat_i - (1/lambda)(x^{t,K} - x^t)                      (prox-correction)
      upload xhat_i = x^{t,K} - lambda ghat_i;   server: x^{t+1} = mean_S xhat_i
  The merged gradient is the oracle (``sharpness_aware(normalize=False, mix=alpha)``),
  the correction and proximal terms the client chain
  ``chain(add_control_variate(), proximal(1/lambda), sgd)`` with control ``-ghat_i``;
  ``ghat_i`` lives in the client states. The message's delta is ``xhat_i - x^t``.
"""
import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams, oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import add_control_variate, proximal


def fedsam(example_loss, client_lr: float, rho: float = 0.05, server_lr: float = 1.0,
           schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
           ) -> FederatedAlgorithm:
  """FedAvg with SAM local steps of radius ``rho`` (rho = 0 is FedAvg)."""
  return FederatedAlgorithm(
      name="fedsam", oracle=oracles.sharpness_aware(example_loss, rho),
      client_tx=optax.sgd(client_lr), server_tx=optax.sgd(server_lr), schedule=schedule,
      weighting=weighting)


def fedspeed(example_loss, client_lr: float, lam: float = 10.0, alpha: float = 0.5,
             rho: float = 0.05, server_lr: float = 1.0,
             schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform"
             ) -> FederatedAlgorithm:
  """FedSpeed (Algorithm 1) with penalty ``lam`` (lambda), merge ``alpha``, ascent ``rho``."""
  hyperparams.check(lam, lambda v: v > 0, f"FedSpeed's lambda must be positive, got {lam}.")

  def zeros(params):
    return jax.tree.map(jnp.zeros_like, params)

  def client_extra_args(message_down, ghat):
    return {"global_params": message_down["params"], "control": jax.tree.map(jnp.negative, ghat)}

  def client_final(local, message_down, ghat):
    x = message_down["params"]
    new = jax.tree.map(lambda g, y, x0: g - (y - x0) / lam, ghat, local.params, x)
    # A client without steps (padding) keeps its correction.
    new = jax.tree.map(lambda n, o: jnp.where(local.num_steps > 0, n, o), new, ghat)
    xhat = jax.tree.map(lambda y, g: y - lam * g, local.params, new)
    return {"delta": jax.tree.map(jnp.subtract, xhat, x)}, new

  return FederatedAlgorithm(
      name="fedspeed",
      oracle=oracles.sharpness_aware(example_loss, rho, normalize=False, mix=alpha),
      client_tx=optax.chain(add_control_variate(), proximal(1.0 / lam), optax.sgd(client_lr)),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      init_client_state=zeros, client_extra_args=client_extra_args, client_final=client_final)


def fedsam_from_config(config, example_loss):
  return fedsam(example_loss, config.client_lr, config.get("sam_rho", 0.05), config.server_lr,
                schedule_from_config(config), config.get("weighting", "num_examples"))


def fedspeed_from_config(config, example_loss):
  return fedspeed(example_loss, config.client_lr, config.get("fedspeed_lambda", 10.0),
                  config.get("fedspeed_alpha", 0.5), config.get("sam_rho", 0.05),
                  config.server_lr, schedule_from_config(config),
                  config.get("weighting", "uniform"))
