"""Asynchronous and semi-synchronous methods as ``(algorithm, AsyncSpec)`` pairs.

Each takes a ``FederatedAlgorithm`` -- its client update, aggregator, server rule and
server_tx are used unchanged -- and says how the clock runs it (``clock.AsyncSpec``):

* ``fedavg_sync``: synchronous FedAvg under the clock (McMahan et al. 2017): M clients
  start together; the server waits for the slowest, or drops the clients still running
  ``deadline_s`` after the round started.
* ``fedasync``: Xie, Koyejo, Gupta, "Asynchronous Federated Optimization" (2019),
  Algorithm 1: every arrival is applied at once,
  ``x_t = (1 - a_t) x_{t-1} + a_t x_new``, ``a_t = a * s(t - tau)``, i.e.
  ``x <- x + a s(t - tau) (x_new - x_{t-1})``: mix ``'current'`` with server SGD(a)
  (``s`` constant, polynomial or hinge, ``staleness.py``).
* ``fedbuff``: Nguyen et al., "Federated Learning with Buffered Asynchronous
  Aggregation" (AISTATS 2022), Algorithm 1: ``Delta_bar = sum_k s(tau_k) Delta_k / K``
  over a buffer of ``K`` arrivals, ``s(tau) = 1/sqrt(1+tau)``, then the server step
  ``x <- x - eta_g Delta_bar`` (any server_tx: FedAdam's gives FedBuff-Adam).
* ``fedfix``: Fraboni, Vidal, Kameni, Lorenzi, "A General Theory for Federated
  Optimization with Asynchronous and Heterogeneous Clients Updates" (JMLR 2023): the
  server updates every ``window_s`` seconds with the clients that finished in the
  window; they get the new model, the others keep training on their old one.
* ``fedcompass``: a computing-power-aware scheduler after Li et al., "FedCompass"
  (ICLR 2024): local steps per client from its estimated speed so that the clients of
  a group arrive together (``compass_scheduler`` for the exact rule).
* ``fedau``: Wang and Ji, "A Lightweight Method for Tackling Unknown Participation
  Statistics in Federated Averaging" (ICLR 2024), Algorithm 1: each client's weight
  ``omega_n`` is the online mean of its participation intervals, cut off at ``K``;
  ``x <- x + (eta / N) sum_{n in S} omega_n Delta_n``.
* ``fedamd``: Wu et al., "Anchor Sampling for Federated Learning with Partial Client
  Participation" (ICML 2023), Algorithm 1, on synchronous rounds: each sampled client
  is an anchor (a full-batch gradient for the anchors' mean ``v``) with probability
  ``p``, else a miner (local steps along SARAH's estimate started from ``v``);
  ``x <- x + eta_g mean_{miners} Delta_i`` (``anchor.py``).
* ``afa_cd``: Yang, Zhang, Khanduri, Liu, "Anarchic Federated Learning" (ICML 2022),
  Algorithm 1 (AFA-CD): clients choose their own local steps ``K_i`` (and, through
  the system model's availability, when they take part); the server takes the next
  ``m`` (possibly stale) updates ``G_i = (1/K_i) sum_k g_k = -Delta_i / (eta_L K_i)``
  and steps ``x <- x - eta eta_L (1/m) sum G_i = x + eta (1/m) sum Delta_i / K_i``.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.asynchronous import anchor as anchor_lib
from fedjax_lab.asynchronous import staleness as staleness_lib
from fedjax_lab.asynchronous.clock import AsyncSpec, Arrivals, ClockState


def fedavg_sync(algorithm: FederatedAlgorithm, concurrency: int,
                deadline_s: Optional[float] = None):
  """Synchronous rounds of ``concurrency`` clients under the clock."""
  return algorithm, AsyncSpec(concurrency, dispatch="on_update", trigger="all",
                              deadline_s=deadline_s)


def fedasync(algorithm: FederatedAlgorithm, concurrency: int,
             staleness: staleness_lib.Staleness = None):
  """FedAsync: ``algorithm.server_tx`` is the mixing ``SGD(a)`` (e.g. ``optax.sgd(0.6)``).

  The paper's clients minimise ``f(x) + rho/2 ||x - x_tau||^2``: give ``algorithm`` a
  proximal client transform (``transforms.proximal(rho)``).
  """
  staleness = staleness_lib.polynomial(0.5) if staleness is None else staleness
  return algorithm, AsyncSpec(concurrency, dispatch="on_arrival", trigger="count",
                              buffer_size=1, staleness=staleness, mix="current")


def fedbuff(algorithm: FederatedAlgorithm, concurrency: int, buffer_size: int = 10,
            staleness: staleness_lib.Staleness = None):
  """FedBuff; ``algorithm.weighting='uniform'`` divides by ``K`` as the paper does."""
  staleness = staleness_lib.fedbuff() if staleness is None else staleness
  return algorithm, AsyncSpec(concurrency, dispatch="on_arrival", trigger="count",
                              buffer_size=buffer_size, staleness=staleness)


def fedfix(algorithm: FederatedAlgorithm, concurrency: int, window_s: float,
           staleness: staleness_lib.Staleness = None):
  """FedFix: fixed windows of ``window_s``; a window without an arrival is skipped."""
  staleness = staleness_lib.constant() if staleness is None else staleness
  return algorithm, AsyncSpec(concurrency, dispatch="on_update", trigger="window",
                              window_s=window_s, staleness=staleness)


# FedAU: online participation intervals.

def fedau_reweight(cutoff: int = 50):
  """``(init_stats, reweight)`` of FedAU's weights, one server update a round.

  Per client ``n``: ``M_n`` counts updates since its last interval ended; at an update
  where ``n`` arrives, or where ``M_n`` reaches the cutoff ``K``, the interval ``M_n``
  is recorded and ``M_n`` restarts; ``omega_n`` is the mean of the recorded intervals
  (Algorithm 1 of the paper). An arrival's delta is scaled by ``omega_n * |S| / N`` so
  that the uniform mean over the ``|S|`` arrivals is ``sum_{n in S} omega_n Delta_n / N``.
  """
  if cutoff < 1:
    raise ValueError(f"FedAU cutoff must be >= 1, got {cutoff}.")

  def init_stats(n):
    return {"au_counter": jnp.zeros((n,), jnp.int32), "au_sum": jnp.zeros((n,), jnp.float32),
            "au_count": jnp.zeros((n,), jnp.float32)}

  def reweight(clock: ClockState, arrivals: Arrivals):
    stats = clock.stats
    num_clients = stats["au_counter"].shape[0]
    ids = jnp.where(arrivals.valid, arrivals.client, num_clients)
    here = jnp.zeros((num_clients,), bool).at[ids].set(True, mode="drop")
    counter = stats["au_counter"] + 1
    ends = here | (counter >= cutoff)
    interval = jnp.minimum(counter, cutoff).astype(jnp.float32)
    total = stats["au_sum"] + jnp.where(ends, interval, 0.0)
    count = stats["au_count"] + ends.astype(jnp.float32)
    omega = total / jnp.maximum(count, 1.0)
    arrived = jnp.sum(arrivals.valid).astype(jnp.float32)
    factor = jnp.take(omega, ids, mode="fill", fill_value=0.0) * arrived / num_clients
    return factor, {"au_counter": jnp.where(ends, 0, counter), "au_sum": total,
                    "au_count": count}

  return init_stats, reweight


def fedau(algorithm: FederatedAlgorithm, concurrency: int, buffer_size: int = 10,
          cutoff: int = 50, sync: bool = False):
  """FedAU's weights on FedBuff's schedule (``sync=True``: on synchronous rounds).

  ``algorithm.weighting='uniform'`` gives the paper's ``(1/N) sum omega_n Delta_n``.
  """
  init_stats, reweight = fedau_reweight(cutoff)
  if sync:
    spec = AsyncSpec(concurrency, dispatch="on_update", trigger="all",
                     reweight=reweight, init_stats=init_stats)
  else:
    spec = AsyncSpec(concurrency, dispatch="on_arrival", trigger="count",
                     buffer_size=buffer_size, reweight=reweight, init_stats=init_stats)
  return algorithm, spec


# FedCompass: computing-power-aware local steps.

def compass_scheduler(min_steps: int, max_steps: int, prior_s_per_step: float = 0.0):
  """``(init_stats, local_steps, on_step)``: FedCompass-style step assignment.

  The server keeps an estimate ``v_n`` of each client's seconds per step (from its
  last job: ``(finish - start) / steps``, comm included; ``prior_s_per_step`` before
  the first one, 0: unknown) and a target arrival time ``T``, the next multiple of a
  group period that the slowest estimated client makes in ``max_steps``. A client
  dispatched at ``t`` runs ``Q = clip(floor((T - t) / v_n), min_steps, max_steps)``
  steps (``max_steps`` while its speed is unknown), so clients dispatched at different
  times arrive around ``T``; when ``T`` has passed, the next target is set one period on.
  This is our reading of FedCompass' scheduler reduced to one group at a time (the
  paper keeps several groups and a latency-tolerance factor).
  """
  if not 1 <= min_steps <= max_steps:
    raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}.")

  def init_stats(n):
    return {"compass_speed": jnp.full((n,), prior_s_per_step, jnp.float32),
            "compass_target": jnp.zeros((), jnp.float32)}

  def period(stats):
    known = stats["compass_speed"] > 0
    slowest = jnp.max(jnp.where(known, stats["compass_speed"], 0.0))
    return jnp.maximum(slowest * max_steps, 1e-6)

  def local_steps(clock: ClockState, client, time, key):
    del key
    stats = clock.stats
    v = stats["compass_speed"][client]
    target = stats["compass_target"]
    target = jnp.where(target > time, target, time + period(stats))
    q = jnp.floor((target - time) / jnp.maximum(v, 1e-12))
    q = jnp.where(v > 0, jnp.clip(q, min_steps, max_steps), max_steps)
    return q.astype(jnp.int32)

  def on_step(clock: ClockState, arrivals: Arrivals):
    stats = clock.stats
    speed = stats["compass_speed"]
    seen = arrivals.valid & (arrivals.steps > 0)
    ids = jnp.where(seen, arrivals.client, speed.shape[0])
    observed = (arrivals.finish - arrivals.start) / jnp.maximum(arrivals.steps, 1)
    speed = speed.at[ids].set(observed, mode="drop")
    target = stats["compass_target"]
    target = jnp.where(target > clock.time, target,
                       clock.time + period({**stats, "compass_speed": speed}))
    return clock._replace(stats={**stats, "compass_speed": speed, "compass_target": target})

  return init_stats, local_steps, on_step


def fedcompass(algorithm: FederatedAlgorithm, concurrency: int, buffer_size: int = 10,
               min_steps: int = 5, max_steps: int = 50, staleness=None):
  """FedCompass-style: FedBuff's buffer with steps assigned by ``compass_scheduler``."""
  init_stats, local_steps, on_step = compass_scheduler(min_steps, max_steps)
  staleness = staleness_lib.fedbuff() if staleness is None else staleness
  return algorithm, AsyncSpec(concurrency, dispatch="on_arrival", trigger="count",
                              buffer_size=buffer_size, staleness=staleness,
                              local_steps=local_steps, on_step=on_step, init_stats=init_stats)


# FedAMD: anchor and miner groups on synchronous rounds.

def fedamd(algorithm: FederatedAlgorithm, concurrency: int, anchor_prob=0.2,
           deadline_s: Optional[float] = None):
  """FedAMD (``anchor.fedamd``) on synchronous rounds of ``concurrency`` clients.

  Every client's anchor is its full-batch gradient at ``x_0`` (``anchor.initial_anchors``).
  The paper's default ``p`` is 0.2 (the authors' ``--pr``). A job lasts the schedule's
  steps whichever group the client is in (an anchor's full-batch gradient costs about
  one epoch of steps).
  """
  alg = anchor_lib.fedamd(algorithm, anchor_prob)
  spec = AsyncSpec(concurrency, dispatch="on_update", trigger="all", deadline_s=deadline_s,
                   on_init=lambda state, arrays, offsets, n: anchor_lib.initial_anchors(
                       state, arrays, offsets, n, alg))
  return alg, spec


# AFA-CD: clients choose their local steps; updates normalised by them.

def anarchic_steps(min_steps: int, max_steps: int):
  """``local_steps`` of clients that each draw ``K ~ uniform{min_steps..max_steps}`` per job."""
  if not 1 <= min_steps <= max_steps:
    raise ValueError(f"AFA-CD needs 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}.")

  def local_steps(clock: ClockState, client, time, key):
    del clock, client, time
    return jax.random.randint(key, (), min_steps, max_steps + 1).astype(jnp.int32)

  return local_steps


def normalise_by_steps(clock: ClockState, arrivals: Arrivals):
  """AFA-CD's ``Delta_i / K_i`` (``arrivals.steps``: the steps the job ran)."""
  factor = 1.0 / jnp.maximum(arrivals.steps, 1).astype(jnp.float32)
  return factor, clock.stats


def afa_cd(algorithm: FederatedAlgorithm, concurrency: int, buffer_size: int = 10,
           min_steps: int = 1, max_steps: int = 10, staleness: staleness_lib.Staleness = None):
  """AFA-CD: ``m = buffer_size`` arrivals per update, each ``Delta_i / K_i``.

  ``algorithm.server_tx`` is SGD(eta) (the paper's server rate; its two-sided rate is
  ``eta * eta_L`` on ``G``, i.e. ``eta`` on ``Delta / K``) and ``weighting='uniform'``
  gives the paper's ``1/m``. The paper discounts no staleness (``constant``; it
  assumes bounded delays). Steps are also capped by the schedule's steps of each client.
  """
  staleness = staleness_lib.constant() if staleness is None else staleness
  return algorithm, AsyncSpec(concurrency, dispatch="on_arrival", trigger="count",
                              buffer_size=buffer_size, staleness=staleness,
                              reweight=normalise_by_steps,
                              local_steps=anarchic_steps(min_steps, max_steps))
