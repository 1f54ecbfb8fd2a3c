"""FAL: federated adversarial learning, and its baselines FAT and FedDynAT.

Li, Song, Yang. "Federated Adversarial Learning: A Framework with Convergence
Analysis", ICML 2023 (arXiv 2208.03635). FedAvg around PGD adversarial training:

    objective  L(W) = (1/N) sum_c (1/n_c) sum_{(x,y) in S_c} max_{x' in B_p(x, rho)} l(f_W(x'), y)
    client c:  W <- W - eta_l grad_W mean l(f_W(x'), y),  x' = PGD_S(f_W, x, y)  (K local steps)
    server:    W_{t+1} = W_t + eta_g sum_c w_c (W_c - W_t),  w_c = 1/N (uniform, the paper's)

The paper averages the clients uniformly (its objective weights each client 1/N), so
FAL's default weighting is ``'uniform'``; example-count weighting (w_c = n_c / n, FedAvg's)
is the named option ``weighting='num_examples'`` (config: ``fal_weighting``). FAT and
FedDynAT keep their base method's weighting.

So FAL = any federated method + the ``adversarial`` gradient oracle
(``fedjax_lab.oracles.adversarial``); the server, aggregator and client optimizer are
the base method's (FedAvg by default; FedProx, FedAdam, ... compose unchanged).

Baselines (same oracle):
* FAT / FedPGD-AT (Zizzo et al. 2020, arXiv 2012.01791): the loss mixes clean and
  adversarial examples, ``(1 - r) l(x) + r l(x')``.
* FedDynAT (Shah et al. 2021, "Adversarial training in communication constrained
  federated learning"): the local work decays with the rounds. The paper decays local
  *epochs*; its exact schedule is not public, so this is a stand-in, not the paper's
  schedule: ``K_t = max(K_min, floor(K_0 * decay^t))`` local *steps* (a masked scan of
  static length K_0 through the engine's ``step_limit`` hook; the round number is
  broadcast). With K_0 a multiple of a client's steps per epoch it is an epoch count
  rounded to steps.
"""
import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from algorithms.fedavg import fedavg
from fedjax_lab import attacks, hyperparams, oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import GradientOracle


def adversarial_training(method: FederatedAlgorithm, example_loss, attack,
                         mix_ratio: float = 1.0, name: Optional[str] = None) -> FederatedAlgorithm:
  """``method`` with its clients training on ``attack``-ed inputs (mix ``mix_ratio``)."""
  return dataclasses.replace(method, oracle=oracles.adversarial(example_loss, attack, mix_ratio),
                             name=name or f"{method.name}_at")


def fal(example_loss, attack, client_lr: float, server_lr: float = 1.0,
        schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform"
        ) -> FederatedAlgorithm:
  """FAL: FedAvg whose clients run PGD adversarial training on all their examples.

  ``weighting='uniform'`` (default) is the paper's 1/N average; 'num_examples' weights by n_c.
  """
  return adversarial_training(fedavg(example_loss, client_lr, server_lr, schedule, weighting),
                              example_loss, attack, 1.0, "fal")


def fat(example_loss, attack, client_lr: float, mix_ratio: float = 0.5, server_lr: float = 1.0,
        schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
        ) -> FederatedAlgorithm:
  """FAT: FedAvg with the clean/adversarial mix ``(1 - r) l(x) + r l(x')``."""
  return adversarial_training(fedavg(example_loss, client_lr, server_lr, schedule, weighting),
                              example_loss, attack, mix_ratio, "fat")


def warmup_scale(warmup_rounds: int) -> Callable:
  """``round -> float32 min(1, (t + 1) / W)``, the radius factor of round t (W = 0: 1)."""
  if not isinstance(warmup_rounds, (int, np.integer)) or warmup_rounds < 0:
    raise ValueError(f"eps_warmup_rounds must be an int >= 0 (0: constant radius), "
                     f"got {warmup_rounds!r}.")
  w = max(int(warmup_rounds), 1)
  return lambda t: jnp.minimum(1.0, (jnp.asarray(t, jnp.float32) + 1.0) / w)


def with_eps_warmup(method: FederatedAlgorithm, example_loss, attack: attacks.PGD,
                    mix_ratio: float, warmup_rounds: int) -> FederatedAlgorithm:
  """``method`` whose clients attack with radius and step ``warmup_scale(W)(t)`` times
  ``attack``'s in round t (the round is broadcast; the factor is the oracle's state)."""
  scale_at = warmup_scale(warmup_rounds)
  if method.init_oracle_state is not None:
    raise ValueError(f"The eps warm-up replaces the oracle state; {method.name} already has "
                     "one (init_oracle_state).")

  def update(params, batch, rng, scale):
    scaled = dataclasses.replace(attack, eps=attack.eps * scale,
                                 step_size=attack.step_size * scale)
    grads, aux, _ = oracles.adversarial(example_loss, scaled, mix_ratio).update(
        params, batch, rng, ())
    return grads, aux, scale

  base_broadcast = method.broadcast

  def broadcast(state):
    return {**base_broadcast(state), "round": state.round}

  return dataclasses.replace(
      method, oracle=GradientOracle(init=lambda params: jnp.ones((), jnp.float32), update=update),
      broadcast=broadcast, init_oracle_state=lambda down, client_state: scale_at(down["round"]))


def decaying_steps(initial_steps: int, decay, min_steps: int = 1) -> Callable:
  """``round -> int32 K_t = max(K_min, floor(K_0 * decay^t))`` (optax's exponential decay).

  ``decay`` is a number or a scalar array (checked only when a number); the step
  counts are Python ints.
  """
  if not 1 <= min_steps <= initial_steps:
    raise ValueError(f"FedDynAT needs 1 <= min_steps <= initial_steps, got min_steps={min_steps}, "
                     f"initial_steps={initial_steps}.")
  hyperparams.check(decay, lambda d: 0.0 < d <= 1.0,
                    f"FedDynAT decay must be in (0, 1], got {decay}.")
  initial = float(initial_steps)

  def curve(t):
    # optax.exponential_decay(initial, transition_steps=1, decay_rate=decay), whose
    # factory branches on the value of decay_rate: the same operations, array-safe.
    return jnp.where(t <= 0, initial, initial * jnp.power(decay, t / 1))

  return lambda t: jnp.maximum(jnp.floor(curve(t)).astype(jnp.int32), min_steps)


def with_decaying_steps(method: FederatedAlgorithm, initial_steps: int, decay: float,
                        min_steps: int = 1, name: Optional[str] = None) -> FederatedAlgorithm:
  """Runs ``K_t`` of the schedule's ``initial_steps`` local steps in round t (the rest masked)."""
  steps_at = decaying_steps(initial_steps, decay, min_steps)
  base_broadcast = method.broadcast

  def broadcast(state):
    return {**base_broadcast(state), "round": state.round}

  schedule = dataclasses.replace(method.schedule, epochs=None, steps=initial_steps)
  return dataclasses.replace(method, schedule=schedule, broadcast=broadcast,
                             step_limit=lambda down: steps_at(down["round"]),
                             name=name or method.name)


def feddynat(example_loss, attack, client_lr: float, initial_steps: int, decay: float,
             min_steps: int = 1, batch_size: int = 32, mix_ratio: float = 1.0,
             server_lr: float = 1.0, weighting: str = "num_examples") -> FederatedAlgorithm:
  """FedDynAT: FAT/FAL with ``K_t = max(K_min, floor(K_0 decay^t))`` local steps in round t."""
  method = fat(example_loss, attack, client_lr, mix_ratio, server_lr,
               LocalSchedule(batch_size=batch_size, steps=initial_steps), weighting)
  return with_decaying_steps(method, initial_steps, decay, min_steps, "feddynat")


# ---- configs ---------------------------------------------------------------------------------

def attack_from_config(config) -> attacks.PGD:
  """The training attack from ``config.adversarial_training``.

  Its keys: norm, eps, step_size, steps, rand_init, clip_min, clip_max. (``config.attack``
  names byzantine clients, see launch/robust.py.)
  """
  cfg = config.get("adversarial_training")
  if cfg is None:
    raise ValueError("Adversarial training needs config.adversarial_training (norm, eps, "
                     "step_size, steps, rand_init, clip_min, clip_max); see "
                     "launch/configs/fal_digits.py.")
  return attacks.PGD(eps=cfg.eps, step_size=cfg.get("step_size", cfg.eps / 4),
                     steps=cfg.get("steps", 10), norm=cfg.get("norm", "linf"),
                     rand_init=cfg.get("rand_init", True), clip_min=cfg.get("clip_min", 0.0),
                     clip_max=cfg.get("clip_max", 1.0))


def _base_method(config, example_loss) -> FederatedAlgorithm:
  import algorithms   # the registry imports this module
  base = config.get("adversarial_base", "fedavg")
  if base in ("fal", "fat", "feddynat"):
    raise ValueError(f"adversarial_base must be a non-adversarial method, got {base!r}.")
  return algorithms.build(base, config, example_loss)


def _adversarial_from_config(config, method, example_loss, mix_ratio, name):
  """``adversarial_training(...)`` with the config's attack, warmed up over
  ``adversarial_training.eps_warmup_rounds`` rounds when that is > 0."""
  attack = attack_from_config(config)
  method = adversarial_training(method, example_loss, attack, mix_ratio, name)
  warmup = config.adversarial_training.get("eps_warmup_rounds", 0)
  if warmup:
    method = with_eps_warmup(method, example_loss, attack, mix_ratio, warmup)
  return method


def fal_from_config(config, example_loss) -> FederatedAlgorithm:
  """FAL on ``config.adversarial_base`` (default FedAvg), all examples adversarial.

  Clients are averaged by ``config.fal_weighting`` (default 'uniform', the paper's 1/N;
  'num_examples' is the option), which replaces the base method's ``weighting``.
  """
  method = _adversarial_from_config(config, _base_method(config, example_loss), example_loss,
                                    1.0, "fal")
  return dataclasses.replace(method, weighting=config.get("fal_weighting", "uniform"))


def fat_from_config(config, example_loss) -> FederatedAlgorithm:
  return _adversarial_from_config(config, _base_method(config, example_loss), example_loss,
                                  config.get("mix_ratio", 0.5), "fat")


def feddynat_from_config(config, example_loss) -> FederatedAlgorithm:
  """FedDynAT from ``config.feddynat.{initial_steps, decay, min_steps, mix_ratio}``.

  ``initial_steps`` defaults to ``config.local_steps`` (if > 0, else 50); the batch size is
  ``config.batch_size``; ``mix_ratio`` defaults to 1 (all examples adversarial).
  """
  cfg = config.get("feddynat") or {}
  initial = cfg.get("initial_steps") or config.get("local_steps") or 50
  method = _adversarial_from_config(config, _base_method(config, example_loss), example_loss,
                                    cfg.get("mix_ratio", 1.0), None)
  return with_decaying_steps(method, initial, cfg.get("decay", 0.95), cfg.get("min_steps", 1),
                             "feddynat")

