"""FedKSeed: federated zeroth-order tuning whose perturbations come from K shared seeds.

Qin, Chen, Yao, Ding, Li, Li, Deng. "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", ICML 2024 (Algorithm 1).
Seeds s_1..s_K are shared; z_j = N(0, I) is drawn from s_j.

    client i, step t = 1..tau:  j_t ~ U{1..K}
                                g_t = (L(w + eps z_j) - L(w - eps z_j)) / (2 eps)
                                w <- w - eta g_t z_j
    upload:                     the tau pairs (j_t, g_t): 8 tau bytes
    server:                     x <- x - eta sum_i p_i sum_t g_{i,t} z_{j_{i,t}}

The pairs are a K-vector of accumulated scalars a_j = sum_{t: j_t = j} g_t (the
authors' ``local_seed_pool``), and w_tau - w_0 = -eta sum_j a_j z_j exactly; the message
is c = -eta a, the engine's weighted mean averages it (p_i = n_i / n, the authors'
default; ``weighting='uniform'`` is their ``--equal_weight``) and the server rule
replays sum_j c_j z_j (``kseed.replay_rule``), then ``server_tx`` (sgd(1): the paper).

Defaults of the authors' code (FederatedScope, branch FedKSeed): K = 4096,
eps = 5e-4, tau = 200 local steps of batch size 1; the rate is the task's.

``sampling='pro'`` (``config.kseed_sampling``) is FedKSeed-Pro (the authors'
``--bias_sampling``): seed j is drawn with p_j = softmax(normalised mean |clip(g, +-1000)|
of its history), the history being every scalar any client drew with seed j after an
initial 0. The history's per-seed sums (|clip g| and counts, derivable from the pairs:
no extra bytes) are summed over the cohort by the aggregator and kept by
``kseed.history_rule``; the broadcast carries log p.
"""
import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import aggregate as aggregate_lib
from fedjax_lab import server_rules
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import Aggregator, as_collectives
from fedjax_lab.zeroth_order import kseed

SAMPLING = ("uniform", "pro")


def history_aggregator() -> Aggregator:
  """Weighted mean of ``'delta'``; plain sums over the cohort of ``'abs'`` and ``'count'``."""
  mean = aggregate_lib.weighted_mean()

  def update(messages, weights, state, collectives=None):
    agg, state = mean.update({"delta": messages["delta"]}, weights, state, collectives)
    real = (weights > 0)[:, None]
    total = lambda m: as_collectives(collectives).sum(jnp.sum(jnp.where(real, m, 0.0), axis=0))
    return {**agg, "abs": total(messages["abs"]), "count": total(messages["count"])}, state

  return Aggregator(mean.init, update)


def fedkseed(example_loss, client_lr, seeds_key: jax.Array, num_seeds: int = 4096,
             eps=5e-4, schedule: LocalSchedule = LocalSchedule(batch_size=1, epochs=None, steps=200),
             server_lr=1.0, weighting: str = "num_examples", sampling: str = "uniform",
             clip=1000.0) -> FederatedAlgorithm:
  """FedKSeed with K = ``num_seeds`` shared seeds (``seeds_key`` folds in the index)."""
  if schedule.steps is None:
    raise ValueError("FedKSeed uploads one pair per local step: give a fixed number of "
                     "local steps (schedule.steps / config.local_steps > 0)")
  if sampling not in SAMPLING:
    raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLING)}")
  common = dict(client_tx=optax.sgd(client_lr), server_tx=optax.sgd(server_lr),
                schedule=schedule, weighting=weighting)
  if sampling == "uniform":
    def client_final(local, message_down, client_state):
      del message_down
      return {"delta": -client_lr * local.oracle_state}, client_state

    return FederatedAlgorithm(
        name="fedkseed", oracle=kseed.oracle(example_loss, seeds_key, num_seeds, eps),
        server_rule=kseed.replay_rule(seeds_key), client_final=client_final, **common)

  def broadcast(state):
    history = server_rules.find_state(state.rule_state, kseed.SeedHistory)
    return {"params": state.params, "seed_log_p": kseed.seed_log_probabilities(history)}

  pro = kseed.pro_oracle(example_loss, seeds_key, num_seeds, eps, clip)

  def init_oracle_state(message_down, client_state):
    del client_state
    return {**pro.init(None), "log_p": message_down["seed_log_p"]}

  def pro_final(local, message_down, client_state):
    del message_down
    s = local.oracle_state
    return {"delta": -client_lr * s["acc"], "abs": s["abs"], "count": s["count"]}, client_state

  return FederatedAlgorithm(
      name="fedkseed_pro", oracle=pro, aggregator=history_aggregator(),
      server_rule=server_rules.chain(kseed.history_rule(num_seeds), kseed.replay_rule(seeds_key)),
      broadcast=broadcast, init_oracle_state=init_oracle_state, client_final=pro_final, **common)


def uplink_bytes(config) -> int:
  """Bytes a client uploads a round: 8 per (seed index, scalar) pair, one pair a step."""
  return kseed.uplink_bytes(config.local_steps)


def from_config(config, example_loss) -> FederatedAlgorithm:
  """FedKSeed; ``config.kseed_sampling = 'pro'``: FedKSeed-Pro."""
  seeds_key = jax.random.PRNGKey(config.get("kseed_seed", 0))
  return fedkseed(example_loss, config.client_lr, seeds_key, config.get("kseed_num_seeds", 4096),
                  config.get("kseed_eps", 5e-4), schedule_from_config(config), config.server_lr,
                  config.get("weighting", "num_examples"), config.get("kseed_sampling", "uniform"),
                  config.get("kseed_clip", 1000.0))
