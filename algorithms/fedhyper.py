"""FedHyper: hypergradient learning-rate schedules for federated learning.

Wang, Wang, Li. "FedHyper: A Universal and Robust Learning Rate Scheduler for Federated
Learning with Hypergradient Descent", ICLR 2024 (arXiv 2310.03156).

Hypergradient descent (Baydin et al. 2018) at the three rates of a federated round.
With Delta_t the averaged client update of round t (new minus old), the derivative of
the loss w.r.t. the rate used in round t-1 is about ``-<Delta_t, Delta_{t-1}>``: when
consecutive updates align the rate rises, when they oppose it falls. The rules below are
those of the authors' public code (its ``--function`` names); where the paper's text
differs, the paper's form is a parameter:

* G (server, global rate). Accumulator A_0 = 0; for t >= 1
  ``A <- clip(A + h <Delta_{t-1}, Delta_t>, -0.8, 4)`` and ``x_{t+1} = x_t + (1 + A) Delta_t``,
  so the global rate 1 + A stays in [0.2, 5]; round 0 is plain FedAvg. h = 1 in the
  code (``hyper_lr``). Paper form: alpha_t = alpha_{t-1} + h <Delta_t, Delta_{t-1}>
  clipped to [1/gamma_alpha, gamma_alpha] (``paper_bounds(3.0)``). From an initial
  global rate alpha_0 != 1 (``initial_rate``; ``server_lr`` in the configs) the rule
  holds the rate itself: alpha_0 + sum of hypergradients, bounds absolute, server step 1
  (``fedhyper_global_rate='paper'``, default). The project's earlier variant
  (``fedhyper_global_rate='scaled'``) steps with server_lr (1 + A): it scales the
  hypergradient step by server_lr and caps the rate at 5 server_lr.
* GM (G with momentum, the code's default). m_0 = Delta_0, m_t = Delta_t + 0.9 m_{t-1};
  ``A <- clip(A + <m_{t-1}, Delta_t>, -0.2, 4)``,
  ``x_{t+1} = x_t + (1 + A) Delta_t + 0.9 A m_{t-1}``.
* SL (server sets the local rate). ``A <- A + <Delta_{t-1}, Delta_t>`` (no clip) and the
  next round's local rate for every client is ``clip(eta_0 (1 + A), 1e-3, 0.1)``; the global
  step is that of the server optimizer (FedAvg: 1). (The public code assigns this rate and
  then resets the rates at the start of the next round; here it is used, as intended.)
* CL (each client, every local step k). beta = 1 at the start of every round; the local
  rate is eta_0 beta. With s_k the realised local step and s_{k-1} := Delta_{t-1} before
  the round's first update,
  ``gamma = min(1.1, 1 + <s_k, s_{k-1}> + (0.1 / m) <s_k, Delta_{t-1}>)``,
  ``beta <- clip(gamma beta, 0.1, 10)``, m = clients per round. The first step only
  initialises, and beta changes after the step that measured it (one step of lag, as
  the code's LambdaLR). Paper forms: inner products of gradients rather than realised
  steps (``hypergradient='direction'``), global weight 1/K (``global_weight``). The code
  resets beta every round; ``keep_client_rate=True`` keeps each client's beta across
  rounds in the per-client state instead. (The code also skips the first batch of every
  later local epoch; not reproduced.)

Scale-free option (ours, off by default). The inner products above scale with the square
of the updates, so from a rate 10x too small the rates hardly move: on digits with a local
rate of 0.1x the tuned one, G+CL with the code's rules ends where FedAvg does. With
``normalize=True`` (G, GM, SL) and ``hypergradient='cosine'`` (CL) every inner product is
replaced by the cosine of the same vectors, Baydin et al.'s normalised multiplicative
rule; with ``hyper_lr=0.1`` and kept client rates G+CL then ends 5.5 points above FedAvg
(docs/methods.md has the seed-averaged numbers).

As optax transforms (all act on the pseudo-gradient g_t = -Delta_t, the server's
"gradient", so the inner products are those of the Deltas):

    server_tx = optax.chain(fedhyper_global(), optax.sgd(server_lr))    # FedAvg + G
    server_tx = optax.chain(fedhyper_global(), optax.sgd(lr, momentum=0.9))  # FedAvgM + G
    server_tx = optax.chain(fedhyper_global(), optax.adam(lr))           # FedAdam + G

``fedhyper_global`` scales the pseudo-gradient by the global rate 1 + A, so any server
optimizer after it sees ``(1 + A) g``; with ``optax.sgd(1.0)`` that is exactly the code's
FedHyper-G. The server rules are server rules in the engine's sense
(``fedjax_lab.server_rules``): ``on_top(algorithm, rule)`` chains one after any method's
own rule (SCAFFOLD's control update, FOT's projection, ...) and before its replaceable
``server_tx`` (FedProx, SCAFFOLD, FAL, FedAdam, FOT, ...). The client rules are client transforms that take
the local direction (identity for SGD, ``optax.trace`` for momentum, ``optax.scale_by_adam``)
and apply the rate: ``optax.chain(optax.identity(), fedhyper_client(eta_0, m))``.

The paper's baselines are their own modules: ``algorithms.fedavgm`` (server momentum),
``algorithms.fedavg_decay`` (global and local rates times 0.995^t), ``algorithms.fedopt``
(FedAdam, FedAdagrad) and ``algorithms.fedexp``.
"""
import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from algorithms import fedopt
from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams, oracles
from fedjax_lab import server_rules
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import stateless_with_extra_args
from fedjax_lab.types import Params, PyTree

SERVER_OPTIMIZERS = ("sgd", "momentum") + fedopt.SERVER_OPTIMIZERS


# ----------------------------------------------------------------------------- helpers

def tree_cosine(a: PyTree, b: PyTree) -> jax.Array:
  """``<a, b> / (|a| |b|)``, 0 where either is zero: the scale-free hypergradient."""
  norms = jnp.sqrt(optax.tree.vdot(a, a) * optax.tree.vdot(b, b))
  return jnp.where(norms > 0, optax.tree.vdot(a, b) / jnp.where(norms > 0, norms, 1.0), 0.0)


def _alignment(normalize: bool):
  return tree_cosine if normalize else optax.tree.vdot


def _where(flag: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.where(flag, x, y), new, old)


find_state = server_rules.find_state


def paper_bounds(gamma: float) -> tuple[float, float]:
  """Accumulator bounds keeping the rate 1 + A in [1/gamma, gamma] (the paper's clip)."""
  hyperparams.check(gamma, lambda g: not g < 1, f"gamma must be >= 1, got {gamma}.")
  return 1.0 / gamma - 1.0, gamma - 1.0


# ------------------------------------------------------------------ server: G and GM

class FedHyperGlobalState(NamedTuple):
  """State of G / GM.

  Attributes:
    accumulator: float32 [], A; the global rate is 1 + A.
    trace: like params, the previous direction m_{t-1} in pseudo-gradient sign
      (G: g_{t-1}; GM: g_{t-1} + momentum m_{t-2}).
    count: int32 [], rounds seen.
  """
  accumulator: jax.Array
  trace: Params
  count: jax.Array


def fedhyper_global(clip_lo: float = -0.8, clip_hi: float = 4.0, hyper_lr: float = 1.0,
                    momentum: float = 0.0, normalize: bool = False,
                    initial_rate: float = 1.0) -> optax.GradientTransformation:
  """FedHyper-G: scales the pseudo-gradient by the global rate alpha = 1 + A.

  For round t >= 1 (g_t = -Delta_t, shapes of params):
      A_t = clip(A_{t-1} + hyper_lr <m_{t-1}, g_t>, clip_lo, clip_hi)
      out_t = (1 + A_t) g_t + momentum (A_t - A_0) m_{t-1}
      m_t = g_t + momentum m_{t-1}      (m_{-1} = 0, A_0 = initial_rate - 1, out_0 = initial_rate g_0)
  i.e. the paper's alpha_t = clip(alpha_{t-1} + <Delta_t, Delta_{t-1}>) from alpha_0 =
  ``initial_rate``, bounds absolute (the code's [0.2, 5]); the hypergradient step is not
  scaled by alpha_0. With momentum 0 this is G; ``fedhyper_global_momentum`` is GM.
  ``optax.chain(fedhyper_global(initial_rate=eta_g), optax.sgd(1.0))`` is FedHyper-G
  started at eta_g (eta_g = 1: the code's). The project's scaled variant is
  ``optax.chain(fedhyper_global(), optax.sgd(eta_g))``: rate eta_g (1 + A), so the
  hypergradient step is scaled by eta_g and the rate capped at 5 eta_g. From an
  ``initial_rate`` below ``1 + clip_lo`` the first clip lifts the rate to that floor.

  Args:
    clip_lo, clip_hi: bounds of the accumulator (code: -0.8, 4; the paper's
      [1/gamma, gamma] rate bounds are ``paper_bounds(gamma)``).
    hyper_lr: hypergradient step (1 in the code).
    momentum: 0 for G, 0.9 for GM.
    normalize: use the cosine of m_{t-1} and g_t instead of their inner product
      (Baydin et al.'s normalised rule). The inner product scales with the square of
      the update, so from a small rate (small updates) A barely moves; the cosine
      does not depend on the update's scale. Off in the code.

  The continuous arguments may be scalar arrays (``optax.inject_hyperparams``, sweeps);
  they are range-checked only when they are numbers.

  Returns:
    An optax transform with state ``FedHyperGlobalState``.
  """
  hyperparams.check_all((clip_lo, clip_hi), lambda lo, hi: lo < hi,
                        f"Need clip_lo < clip_hi, got {clip_lo}, {clip_hi}.")
  hyperparams.check(clip_lo, lambda lo: not lo <= -1.0,
                    f"clip_lo must be > -1 so the global rate 1 + A stays positive, got {clip_lo}.")
  hyperparams.check(momentum, lambda m: 0.0 <= m < 1.0,
                    f"momentum must be in [0, 1), got {momentum}.")
  align = _alignment(normalize)

  hyperparams.check(initial_rate, lambda r: r > 0,
                    f"initial_rate must be positive, got {initial_rate}.")

  def init_fn(params):
    return FedHyperGlobalState(jnp.asarray(initial_rate - 1.0, jnp.float32),
                               jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    accumulator = jnp.where(
        state.count > 0,
        jnp.clip(state.accumulator + hyper_lr * align(state.trace, updates), clip_lo, clip_hi),
        state.accumulator)
    # GM's momentum coefficient is the hypergradient sum A_t - A_0 (the code's agg, A_0 = 0).
    moved = accumulator - (initial_rate - 1.0)
    out = jax.tree.map(lambda g, m: ((1.0 + accumulator) * g + momentum * moved * m
                                     ).astype(g.dtype), updates, state.trace)
    trace = jax.tree.map(lambda g, m: (g + momentum * m).astype(m.dtype), updates, state.trace)
    return out, FedHyperGlobalState(accumulator, trace, state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def fedhyper_global_momentum(momentum: float = 0.9, clip_lo: float = -0.2, clip_hi: float = 4.0,
                             hyper_lr: float = 1.0, normalize: bool = False,
                             initial_rate: float = 1.0) -> optax.GradientTransformation:
  """FedHyper-GM: G whose hypergradient and step use the momentum m (code defaults)."""
  return fedhyper_global(clip_lo, clip_hi, hyper_lr, momentum, normalize, initial_rate)


def global_rate(state: PyTree) -> jax.Array:
  """The current global rate multiplier 1 + A of a state holding G/GM.

  ``state``: a ``ServerState`` (the rule lives in its ``rule_state``) or any
  (chained) transform state.
  """
  found = find_state(state, FedHyperGlobalState)
  if found is None:
    raise ValueError("The server state holds no fedhyper_global state.")
  return 1.0 + found.accumulator


def rate_metrics(state: ServerState) -> dict:
  """The adapted rates for the round's metrics: ``global_rate`` (G/GM), ``local_lr`` (SL)."""
  metrics = {}
  if find_state(state.rule_state, FedHyperGlobalState) is not None:
    metrics["global_rate"] = global_rate(state.rule_state)
  sl_rate = local_rate(state.rule_state)
  if sl_rate is not None:
    metrics["local_lr"] = sl_rate
  return metrics


# ------------------------------------------------------------------------- server: SL

class FedHyperServerLocalState(NamedTuple):
  """State of SL.

  Attributes:
    accumulator: float32 [], A (not clipped in the code).
    prev: like params, g_{t-1}.
    count: int32 [], rounds seen.
    local_lr: float32 [], the local rate the next round's clients use.
  """
  accumulator: jax.Array
  prev: Params
  count: jax.Array
  local_lr: jax.Array


def fedhyper_server_local(initial_lr: float, min_lr: float = 1e-3, max_lr: float = 0.1,
                          hyper_lr: float = 1.0, clip_lo: Optional[float] = None,
                          clip_hi: Optional[float] = None, normalize: bool = False
                          ) -> optax.GradientTransformation:
  """FedHyper-SL: the server sets the next round's local learning rate.

  For round t >= 1: ``A_t = A_{t-1} + hyper_lr <g_{t-1}, g_t>`` (optionally clipped) and
  ``local_lr = clip(initial_lr (1 + A_t), min_lr, max_lr)``; round 0's clients use
  ``initial_lr``. The pseudo-gradient passes through unchanged, so the server optimizer
  chained after it sets the global step. The rate reaches clients through the broadcast
  (``fedhyper`` reads ``local_lr`` from this state) and a client transform that takes a
  ``local_lr`` extra argument (``scale_by_local_lr`` or ``fedhyper_client``).

  Args:
    initial_lr: eta_0, the clients' initial rate.
    min_lr, max_lr: absolute bounds of the local rate (code: 1e-3, 0.1; the paper's
      form is eta_0 / gamma_beta, eta_0 gamma_beta).
    hyper_lr: hypergradient step (1 in the code).
    clip_lo, clip_hi: optional bounds of A (none in the code).
    normalize: accumulate the cosine of g_{t-1} and g_t (scale-free, see
      ``fedhyper_global``) instead of their inner product.

  The rates, bounds and ``hyper_lr`` may be scalar arrays (checked only when numbers).
  """
  hyperparams.check(min_lr, lambda lo: 0 < lo, f"Need 0 < min_lr <= max_lr, got {min_lr}, {max_lr}.")
  hyperparams.check_all((min_lr, max_lr), lambda lo, hi: lo <= hi,
                        f"Need 0 < min_lr <= max_lr, got {min_lr}, {max_lr}.")
  hyperparams.check(initial_lr, lambda lr: not lr <= 0,
                    f"initial_lr must be positive, got {initial_lr}.")
  align = _alignment(normalize)

  def init_fn(params):
    return FedHyperServerLocalState(
        jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params),
        jnp.zeros((), jnp.int32), jnp.asarray(initial_lr, jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    accumulator = state.accumulator + hyper_lr * align(state.prev, updates)
    if clip_lo is not None or clip_hi is not None:
      accumulator = jnp.clip(accumulator, clip_lo, clip_hi)
    first = state.count == 0
    accumulator = jnp.where(first, state.accumulator, accumulator)
    local_lr = jnp.where(first, state.local_lr,
                         jnp.clip(initial_lr * (1.0 + accumulator), min_lr, max_lr))
    return updates, FedHyperServerLocalState(accumulator, updates, state.count + 1, local_lr)

  return optax.GradientTransformation(init_fn, update_fn)


def local_rate(state: PyTree) -> Optional[jax.Array]:
  """The local rate an SL state emits for the next round (None without SL).

  ``state``: a ``ServerState`` or any (chained) transform state.
  """
  found = find_state(state, FedHyperServerLocalState)
  return None if found is None else found.local_lr


# ----------------------------------------------------------------------- client side

def scale_by_local_lr(default_lr: float) -> optax.GradientTransformationExtraArgs:
  """``u = -lr * direction`` with ``lr`` the ``local_lr`` extra argument if given.

  The client half of SL and of rate decay: the server broadcasts this round's local
  rate. Without the extra argument it is ``optax.scale(-default_lr)``.
  """
  def scale(updates, params, local_lr):
    lr = default_lr if local_lr is None else local_lr
    return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)

  return stateless_with_extra_args(scale, "scale_by_local_lr()", optional=("local_lr",))


class FedHyperClientState(NamedTuple):
  """State of CL during one round of local training.

  Attributes:
    scale: float32 [], beta; the local rate is eta_0 beta.
    prev_step: like params, the previous measured step s_{k-1} (Delta_{t-1} at first).
    count: int32 [], local steps taken this round.
  """
  scale: jax.Array
  prev_step: Params
  count: jax.Array


CL_HYPERGRADIENTS = ("step", "direction", "cosine")


def fedhyper_client(learning_rate: float, clients_per_round: Optional[int] = None,
                    global_weight: Optional[float] = None, max_growth: float = 1.1,
                    min_scale: float = 0.1, max_scale: float = 10.0,
                    hypergradient: str = "step", hyper_lr: float = 1.0
                    ) -> optax.GradientTransformationExtraArgs:
  """FedHyper-CL: a per-client multiplicative local rate, reset every round (as the code).

  Chain it after the local direction (identity for SGD). At local step k, with
  d_k the incoming direction and Delta_{t-1} the ``global_update`` extra argument:
      s_k = -eta_0 beta_k d_k                        (emitted: the realised step)
      gamma = min(max_growth, 1 + h (<s_k, s_{k-1}> + global_weight <s_k, Delta_{t-1}>))
      beta_{k+1} = clip(gamma beta_k, min_scale, max_scale)      for k >= 1
  with beta_0 = beta_1 = 1 and s_0 := Delta_{t-1} as the first "previous" step (step 0
  only initialises). beta is updated after emitting s_k: the rate lags one step.

  ``hypergradient='step'`` measures the realised steps s_k, as the code does; their
  inner products scale with (eta_0 beta)^2, so with plain SGD and a small rate gamma
  stays near 1. ``'direction'`` measures the descent directions -d_k instead (the paper's
  g_k . g_{k-1} form), which does not shrink with the rate but grows with the gradient:
  one opposed pair of large gradients sends beta to its floor. ``'cosine'`` replaces
  both inner products by cosines of the directions (Baydin et al.'s normalised,
  multiplicative rule), so gamma lies in [1 - h (1 + w), min(max_growth, 1 + h (1 + w))]
  whatever the scale of the rate or the gradients.

  Args:
    learning_rate: eta_0; a ``local_lr`` extra argument (SL) overrides it.
    clients_per_round: m, for the code's global weight 0.1 / m.
    global_weight: weight of the global term (default 0.1 / m; paper form 1 / K).
    max_growth: cap on gamma per step (1.1).
    min_scale, max_scale: bounds of beta (0.1, 10).
    hypergradient: ``'step'`` (code), ``'direction'`` (paper) or ``'cosine'``, see above.
    hyper_lr: h, the hypergradient step (1 in the code).

  The continuous arguments may be scalar arrays (checked only when numbers);
  ``clients_per_round`` is a Python int.

  Returns:
    A transform whose ``update(direction, state, params, *, global_update, local_lr=None,
    initial_scale=None)`` returns the local step; state ``FedHyperClientState``.
    ``initial_scale`` replaces beta_0 = 1 (a client's rate kept across rounds).
  """
  if global_weight is None:
    if not clients_per_round or clients_per_round <= 0:
      raise ValueError("fedhyper_client needs clients_per_round (> 0) or global_weight.")
    global_weight = 0.1 / clients_per_round
  scale_message = f"Need 0 < min_scale <= 1 <= max_scale, got {min_scale}, {max_scale}."
  hyperparams.check(min_scale, lambda lo: 0 < lo <= 1.0, scale_message)
  hyperparams.check(max_scale, lambda hi: 1.0 <= hi, scale_message)
  hyperparams.check(max_growth, lambda g: not g < 1.0, f"max_growth must be >= 1, got {max_growth}.")
  hyperparams.check(hyper_lr, lambda h: not h < 0, f"hyper_lr must be >= 0, got {hyper_lr}.")
  if hypergradient not in CL_HYPERGRADIENTS:
    raise ValueError(f"Unknown hypergradient {hypergradient!r}; choose one of {CL_HYPERGRADIENTS}.")

  def init_fn(params):
    return FedHyperClientState(jnp.ones((), jnp.float32), jax.tree.map(jnp.zeros_like, params),
                               jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, global_update=None, local_lr=None,
                initial_scale=None, **extra):
    del params, extra
    if global_update is None:
      raise ValueError("fedhyper_client needs the `global_update` extra argument "
                       "(the previous round's averaged update, from the broadcast).")
    lr = learning_rate if local_lr is None else local_lr
    first = state.count == 0
    if initial_scale is not None:   # a client's beta carried over from its last round
      state = state._replace(scale=jnp.where(first, initial_scale, state.scale))
    step = jax.tree.map(lambda u: (-lr * state.scale * u).astype(u.dtype), updates)
    measured = step if hypergradient == "step" else jax.tree.map(jnp.negative, updates)
    align = _alignment(hypergradient == "cosine")
    gamma = jnp.minimum(max_growth, 1.0 + hyper_lr * (
        align(measured, state.prev_step) + global_weight * align(measured, global_update)))
    scale = jnp.where(first, state.scale, jnp.clip(gamma * state.scale, min_scale, max_scale))
    prev_step = _where(first, global_update, measured)
    return step, FedHyperClientState(scale, prev_step, state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------- composition

class PreviousUpdateState(NamedTuple):
  """delta: the last round's averaged client update Delta_{t-1} (CL's global term)."""
  delta: Params


def previous_update() -> server_rules.ServerRule:
  """Keeps ``aggregate['delta']`` for the next round's broadcast; ``g`` passes unchanged."""
  return server_rules.keep_aggregate("delta", PreviousUpdateState)


def with_rate_metrics(round_metrics):
  """``round_metrics`` (or none) plus FedHyper's adapted rates."""
  if round_metrics is None:
    return rate_metrics

  def metrics(state):
    return {**round_metrics(state), **rate_metrics(state)}
  return metrics


def on_top(algorithm: FederatedAlgorithm, rule: optax.GradientTransformation,
           name: Optional[str] = None) -> FederatedAlgorithm:
  """``algorithm`` with ``rule`` (e.g. ``fedhyper_global()``) after its own server rule.

  The server step becomes ``server_tx(rule(method_rule(g)))``: the method's rule
  (SCAFFOLD's control update, FedExP's extrapolation, FOT's projection) runs first,
  FedHyper's rate scales what it emits, and the method's ``server_tx`` (replaceable)
  takes the step. Every other part of the method, its task-boundary step included,
  is kept.
  """
  return dataclasses.replace(
      algorithm, name=name or f"{algorithm.name}+fedhyper",
      server_rule=server_rules.chain(algorithm.server_rule, rule),
      round_metrics=with_rate_metrics(algorithm.round_metrics))


def fedhyper(example_loss, client_lr: float, server_lr: float = 1.0,
             schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples", *,
             server_rule: Optional[optax.GradientTransformation] = None,
             client_rule: Optional[optax.GradientTransformationExtraArgs] = None,
             server_optimizer: Optional[optax.GradientTransformation] = None,
             client_direction: Optional[optax.GradientTransformation] = None,
             keep_client_rate: bool = False,
             name: str = "fedhyper") -> FederatedAlgorithm:
  """A FedAvg-style method with FedHyper rules at the server and/or the clients.

  Args:
    example_loss: per-example loss for the first-order oracle.
    client_lr: local rate when there is no client rule (SL overrides it per round).
    server_lr: rate of the default server optimizer ``optax.sgd(server_lr)``.
    schedule, weighting: as for FedAvg.
    server_rule: ``fedhyper_global`` / ``fedhyper_global_momentum`` /
      ``fedhyper_server_local`` or None.
    client_rule: ``fedhyper_client(...)`` or None (constant local rate).
    server_optimizer: the method's ``server_tx`` after the rule (default SGD(server_lr)).
    client_direction: local direction before the rate (default identity: SGD; e.g.
      ``optax.trace(0.5)`` or ``optax.scale_by_adam()`` as in the code's options).
    keep_client_rate: with CL, each client starts a round from the beta it ended its
      last round with (kept in the per-client state ``[N]``) instead of 1. The code
      resets beta every round (default), although its server loop has a per-client
      rate table meant to keep it.
    name: registry name.

  The broadcast carries ``local_lr`` when the rule holds SL and the previous averaged
  update ``global_update`` (kept by the ``previous_update`` rule) with CL.
  """
  server_tx = server_optimizer if server_optimizer is not None else optax.sgd(server_lr)
  rate = client_rule if client_rule is not None else scale_by_local_lr(client_lr)
  client_tx = optax.chain(client_direction or optax.identity(), rate)
  with_cl = client_rule is not None
  if keep_client_rate and not with_cl:
    raise ValueError("keep_client_rate needs a client_rule (fedhyper_client).")
  rules = [r for r in (server_rule, previous_update() if with_cl else None) if r is not None]

  def broadcast(state):
    down = {"params": state.params}
    lr = local_rate(state.rule_state)
    if lr is not None:
      down["local_lr"] = lr
    if with_cl:
      down["global_update"] = server_rules.require_state(
          state.rule_state, PreviousUpdateState, "previous_update").delta
    return down

  def client_extra_args(message_down, client_state):
    extra = {"global_params": message_down["params"]}
    extra.update({k: message_down[k] for k in ("local_lr", "global_update") if k in message_down})
    if keep_client_rate:
      extra["initial_scale"] = client_state
    return extra

  def client_final(local, message_down, client_state):
    delta = jax.tree.map(jnp.subtract, local.params, message_down["params"])
    if keep_client_rate:
      scale = find_state(local.opt_state, FedHyperClientState).scale
      client_state = jnp.where(local.num_steps > 0, scale, client_state)
    return {"delta": delta}, client_state

  return FederatedAlgorithm(
      name=name, oracle=oracles.first_order(example_loss), client_tx=client_tx,
      server_tx=server_tx, schedule=schedule, weighting=weighting,
      server_rule=server_rules.chain(*rules) if rules else server_rules.identity(),
      init_client_state=(lambda params: jnp.ones((), jnp.float32)) if keep_client_rate else None,
      broadcast=broadcast, client_extra_args=client_extra_args, client_final=client_final,
      round_metrics=rate_metrics)


# ---------------------------------------------------------------------- from config

def server_optimizer_from_config(config) -> optax.GradientTransformation:
  """``config.server_optimizer`` in SERVER_OPTIMIZERS at ``config.server_lr``.

  'adam' / 'yogi' / 'adagrad' are ``fedopt.server_optimizer`` in the convention
  ``config.server_convention`` (default 'reddi': Reddi et al.'s Algorithm 2; 'optax').
  """
  kind = config.get("server_optimizer", "sgd")
  if kind == "sgd":
    return optax.sgd(config.server_lr)
  if kind == "momentum":
    return optax.sgd(config.server_lr, momentum=config.get("server_momentum", 0.9))
  if kind in fedopt.SERVER_OPTIMIZERS:
    return fedopt.server_optimizer(kind, config.server_lr, config.get("server_b1", 0.9),
                                   config.get("server_b2", 0.99), config.get("server_tau", 1e-3),
                                   config.get("server_convention", "reddi"))
  raise ValueError(f"Unknown server_optimizer {kind!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}.")


def _option(config, key, default):
  value = config.get(key)
  return default if value is None else value


GLOBAL_RATES = ("paper", "scaled")
_ADAPTIVE_BASES = ("fedadam", "fedyogi", "fedadagrad")


def rule_carries_rate(config, base_name: str = "fedavg") -> bool:
  """Whether G/GM hold the global rate (``fedhyper_global_rate='paper'``, the default).

  'paper': alpha_0 = ``server_lr``, alpha_t = clip(alpha_{t-1} + <Delta_t, Delta_{t-1}>,
  0.2, 5) and the server optimizer steps with rate 1. Only for a linear server step
  (``server_optimizer`` sgd / momentum on a non-adaptive base); before Adam-type servers
  the rule is the code's multiplier 1 + A (FedAdam+FedHyper), the optimizer keeps
  ``server_lr``. 'scaled' (the project's variant): the rate is server_lr (1 + A).
  """
  kind = config.get("fedhyper_global_rate", "paper")
  if kind not in GLOBAL_RATES:
    raise ValueError(f"Unknown fedhyper_global_rate {kind!r}; choose one of {GLOBAL_RATES}.")
  return (kind == "paper" and config.get("server_optimizer", "sgd") in ("sgd", "momentum")
          and base_name not in _ADAPTIVE_BASES)


def _rate_moved_to_rule(config):
  """``config`` with ``server_lr = 1``: the server step once the rule holds the rate."""
  moved = config.copy_and_resolve_references()
  moved.server_lr = 1.0
  return moved


def global_rule_from_config(config, momentum: bool, initial_rate: float = 1.0
                            ) -> optax.GradientTransformation:
  normalize = config.get("fedhyper_normalize", False)
  if momentum:
    return fedhyper_global_momentum(config.get("fedhyper_momentum", 0.9),
                                    _option(config, "fedhyper_clip_lo", -0.2),
                                    _option(config, "fedhyper_clip_hi", 4.0),
                                    config.get("fedhyper_hyper_lr", 1.0), normalize,
                                    initial_rate)
  return fedhyper_global(_option(config, "fedhyper_clip_lo", -0.8),
                         _option(config, "fedhyper_clip_hi", 4.0),
                         config.get("fedhyper_hyper_lr", 1.0), normalize=normalize,
                         initial_rate=initial_rate)


def client_rule_from_config(config) -> optax.GradientTransformationExtraArgs:
  return fedhyper_client(config.client_lr, config.clients_per_round,
                         config.get("cl_global_weight"), config.get("cl_max_growth", 1.1),
                         config.get("cl_min_scale", 0.1), config.get("cl_max_scale", 10.0),
                         config.get("cl_hypergradient", "step"), config.get("cl_hyper_lr", 1.0))


def _baseline(config, example_loss, name):
  """FedAvg with the config's server optimizer (the base G/GM are chained onto)."""
  return fedhyper(example_loss, config.client_lr, config.server_lr, schedule_from_config(config),
                  config.get("weighting", "num_examples"),
                  server_optimizer=server_optimizer_from_config(config), name=name)


def from_config_for(variant: str):
  """Registry constructor for ``variant`` in g, gm, sl, cl, g_cl, full."""
  if variant not in ("g", "gm", "sl", "cl", "g_cl", "full"):
    raise ValueError(f"Unknown FedHyper variant {variant!r}.")
  name = f"fedhyper_{variant}"

  def from_config(config, example_loss, model=None):
    if variant in ("g", "gm"):
      base_name = config.get("fedhyper_base", "fedavg")
      if base_name.startswith("fedhyper"):
        raise ValueError(f"fedhyper_base must be a method without FedHyper rules "
                         f"(fedavg, fedprox, scaffold, fedadam, fal, fot, ...), got "
                         f"{base_name!r}.")
      carries = rule_carries_rate(config, base_name)
      base_config = _rate_moved_to_rule(config) if carries else config
      if base_name == "fedavg":
        base = _baseline(base_config, example_loss, name)
      else:
        import algorithms   # the registry; imported here because it imports this module
        base = algorithms.build(base_name, base_config, example_loss, model=model)
      initial_rate = config.server_lr if carries else 1.0
      return on_top(base, global_rule_from_config(config, variant == "gm", initial_rate), name)
    server_rule = None
    if variant == "sl":
      server_rule = fedhyper_server_local(config.client_lr, config.get("sl_min_lr", 1e-3),
                                          config.get("sl_max_lr", 0.1),
                                          config.get("fedhyper_hyper_lr", 1.0),
                                          normalize=config.get("fedhyper_normalize", False))
    server_config = config
    if variant in ("g_cl", "full"):
      carries = rule_carries_rate(config)
      server_config = _rate_moved_to_rule(config) if carries else config
      server_rule = global_rule_from_config(config, variant == "full",
                                            config.server_lr if carries else 1.0)
    client_rule = client_rule_from_config(config) if variant in ("cl", "g_cl", "full") else None
    return fedhyper(example_loss, config.client_lr, server_config.server_lr,
                    schedule_from_config(config), config.get("weighting", "num_examples"),
                    server_rule=server_rule, client_rule=client_rule,
                    server_optimizer=server_optimizer_from_config(server_config),
                    keep_client_rate=client_rule is not None and not config.get("cl_reset", True),
                    name=name)

  return from_config
