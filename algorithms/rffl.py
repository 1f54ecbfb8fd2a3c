"""RFFL: reputation-weighted aggregation that removes low-reputation clients.

Xu, Lyu. "A Reputation Mechanism Is All You Need: Collaborative Fairness and
Adversarial Robustness in Federated Learning", FL-ICML 2021 (arXiv 2011.10464),
Algorithm 1. Each round, with uploads ``Delta_i`` clipped to norm Gamma:

    u      = sum_{i in R} r_i Delta_i / sum_{i in R} r_i      (round 0: data-size weights)
    phi_i  = cos(Delta_i, u)
    r_i   <- alpha r_i + (1 - alpha) phi_i ;  r <- r / sum_R r
    R     <- R \\ {i : r_i < beta / |R|}   (r_i = 0 for removed) ;  r <- r / sum_R r

Fairness ("collaborative fairness", their Sec. 3): with ``personalized=True`` every
client keeps its own model ``w_i`` (trained from its own model, not the server's)
and receives as reward the largest-magnitude fraction ``q_i = r_i / max_j r_j`` of
each layer of ``u``, so a client's model improves in proportion to its reputation;
``fairness`` is the Pearson correlation of the final per-client accuracies with the
clients' contributions. The server model ``x <- x + server_tx(-u)`` is kept as
well, and is what a robustness comparison evaluates.

The reputation step is an ``Aggregator`` (``reputation_aggregator``) whose state
holds ``r`` and ``R`` for the whole population, so it composes with any method via
``rffl(method)``. The paper has every client in every round; with partial
participation the sampled clients' reputations move and all are renormalised, and a
personalised client applies the latest reward when it is next sampled.
"""
import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from algorithms.fedavg import fedavg, schedule_from_config
from fedjax_lab import aggregate as aggregate_lib
from fedjax_lab import byzantine
from fedjax_lab import server_rules
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.transforms import Aggregator
from fedjax_lab.types import PyTree

CLIENT_ID_KEY = "_client_id"


class ReputationState(NamedTuple):
  """``reputation`` float32 [N] (sums to 1 over the members); ``active`` bool [N]
  (not removed); ``seen`` bool [N] (has taken part). Members: seen and active."""
  reputation: jax.Array
  active: jax.Array
  seen: jax.Array


def init_reputation(num_clients: int) -> ReputationState:
  return ReputationState(reputation=jnp.zeros((num_clients,), jnp.float32),
                         active=jnp.ones((num_clients,), bool),
                         seen=jnp.zeros((num_clients,), bool))


def _prior(state: ReputationState) -> jax.Array:
  """Mean reputation of the members: what a client taking part for the first time starts from."""
  members = state.seen & state.active
  return jnp.sum(jnp.where(members, state.reputation, 0.0)) / jnp.maximum(jnp.sum(members), 1)


def cohort_reputation(state: ReputationState, ids: jax.Array) -> jax.Array:
  """``r_i`` of the cohort ``ids [C]``; first-time clients get the members' mean."""
  safe = jnp.clip(ids, 0, state.reputation.shape[0] - 1)
  return jnp.where(state.seen[safe], state.reputation[safe], _prior(state))


def update_reputation(state: ReputationState, ids: jax.Array, valid: jax.Array,
                      cosines: jax.Array, alpha: float, beta: float) -> ReputationState:
  """The reputation step (module docstring) for the cohort ``ids [C]``.

  Only valid (real, not removed) cohort clients move; rows that are not valid are
  ignored (their ids may repeat or be out of range). With every client in every
  round this is exactly the paper's step, reputations starting at 0.
  """
  num_clients = state.reputation.shape[0]
  safe = jnp.clip(ids, 0, num_clients - 1)
  valid = valid & state.active[safe]
  moved = alpha * cohort_reputation(state, ids) + (1 - alpha) * cosines
  drop = jnp.where(valid, ids, num_clients)            # out of range: dropped
  r = state.reputation.at[drop].set(moved, mode="drop")
  seen = state.seen.at[drop].set(True, mode="drop")

  def normalise(r, members):
    r = jnp.where(members, r, 0.0)
    return r / jnp.maximum(jnp.sum(r), 1e-12)

  members = seen & state.active
  r = normalise(r, members)
  removed = members & (r < beta / jnp.maximum(jnp.sum(members), 1))
  active = state.active & ~removed
  return ReputationState(reputation=normalise(r, seen & active), active=active, seen=seen)


def reputation_aggregator(alpha: float = 0.95, beta: float = 1.0 / 3.0,
                          clip: Optional[float] = None,
                          num_clients: Optional[int] = None) -> Aggregator:
  """RFFL's aggregation and reputation update as an aggregator.

  Messages must carry the client id under ``CLIENT_ID_KEY`` (``rffl`` adds it).
  The weighted sum crosses placements with ``collectives.sum``; only the ids,
  validity and cosines ``[C]`` are gathered (``collectives.gather``) for the
  reputation update.

  Args:
    alpha: reputation momentum.
    beta: removal threshold coefficient (``r_i < beta / |R|`` is removed).
    clip: Gamma, the upload norm bound (None: no clipping).
    num_clients: population size for ``init``; ``rffl`` sizes the state itself.
  """
  if not 0.0 <= alpha < 1.0:
    raise ValueError(f"RFFL alpha must be in [0, 1), got {alpha}.")
  if beta < 0:
    raise ValueError(f"RFFL beta must be >= 0, got {beta}.")
  if clip is not None and not clip > 0:
    raise ValueError(f"RFFL clip must be > 0 (or None), got {clip}.")

  def init():
    # None: rffl(method) sizes the state from the population at init.
    return None if num_clients is None else init_reputation(num_clients)

  def update(messages, weights, state, collectives=None):
    if not isinstance(messages, dict) or CLIENT_ID_KEY not in messages:
      raise ValueError("The RFFL aggregator needs messages tagged with the client id "
                       "(build the method with algorithms.rffl.rffl).")
    if state is None:
      raise ValueError("The RFFL aggregator state is unsized: pass num_clients, or build "
                       "the method with algorithms.rffl.rffl.")
    messages = dict(messages)
    ids = messages.pop(CLIENT_ID_KEY).astype(jnp.int32)
    if clip is not None:
      messages, _ = aggregate_lib.clip_clients(messages, clip)
    n = state.reputation.shape[0]
    valid = (weights > 0) & state.active[jnp.clip(ids, 0, n - 1)]
    # Round 0 (nobody seen): the clients' data weights, as in the paper.
    mix = jnp.where(jnp.any(state.seen), cohort_reputation(state, ids),
                    weights.astype(jnp.float32))
    mix = jnp.where(valid, mix, 0.0)
    u, _ = aggregate_lib.weighted_mean().update(messages, mix, (), collectives)
    flat, _ = aggregate_lib.ravel_clients(messages)
    u_flat = jax.flatten_util.ravel_pytree(u)[0].astype(jnp.float32)
    cosines = flat @ u_flat / jnp.maximum(
        jnp.linalg.norm(flat, axis=1) * jnp.linalg.norm(u_flat), 1e-12)
    ids, valid, cosines = aggregate_lib.gather_clients((ids, valid, cosines), collectives)
    return u, update_reputation(state, ids, valid, cosines, alpha, beta)

  return Aggregator(init=init, update=update)


def top_fraction(tree, fraction: jax.Array):
  """Keeps the ``ceil(fraction * size)`` largest-magnitude entries of each leaf (ties kept)."""
  def leaf(x):
    size = x.size
    k = jnp.ceil(fraction * size).astype(jnp.int32)
    sorted_abs = jnp.sort(jnp.abs(x).ravel())
    threshold = sorted_abs[jnp.clip(size - k, 0, size - 1)]
    return jnp.where((jnp.abs(x) >= threshold) & (k > 0), x, jnp.zeros_like(x))
  return jax.tree.map(leaf, tree)


@dataclasses.dataclass(frozen=True)
class RFFLAlgorithm(byzantine.TaggedAlgorithm):
  """A method with RFFL's reputation aggregator (and, if personalized, per-client models)."""
  personalized: bool = False

  def init(self, params, rng, num_clients: int) -> ServerState:
    state = super().init(params, rng, num_clients)
    if state.agg_state is None:
      state = state._replace(agg_state=init_reputation(num_clients))
    if self.personalized:
      models = jax.tree.map(
          lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x)).copy(), params)
      state = state._replace(client_states={**state.client_states, "model": models})
    return state

  def client_update(self, message_down, one_client, max_examples):
    if not self.personalized:
      return super().client_update(message_down, one_client, max_examples)
    client_state = one_client[0]
    q = message_down["reward_share"][client_state["tags"]["client_id"]]
    start = jax.tree.map(jnp.add, client_state["model"],
                         top_fraction(message_down["reward"], q))
    return super().client_update({**message_down, "params": start}, one_client, max_examples)


class RewardState(NamedTuple):
  """reward: the last reputation-weighted aggregate, the clients' reward (personalized)."""
  reward: PyTree


def keep_reward() -> server_rules.ServerRule:
  """Keeps ``aggregate['delta']`` as the next round's reward; ``g`` passes unchanged."""
  return server_rules.keep_aggregate("delta", RewardState)


def rffl(method: FederatedAlgorithm, alpha: float = 0.95, beta: float = 1.0 / 3.0,
         clip: Optional[float] = None, personalized: bool = False) -> RFFLAlgorithm:
  """``method`` aggregated by RFFL's reputation mechanism (module docstring).

  Args:
    method: the base method (its aggregator is replaced).
    alpha, beta, clip: see ``reputation_aggregator``.
    personalized: keep per-client models with reputation-proportional rewards.
  """
  method = byzantine.with_client_tags(method)
  inner_final = method.client_final
  inner_broadcast = method.broadcast

  def client_final(local, message_down, client_state):
    message_up, new_state = inner_final(local, message_down, client_state)
    if not isinstance(message_up, dict):
      raise ValueError("RFFL needs dict messages (e.g. {'delta': ...}).")
    if personalized:
      new_state = {**new_state, "model": local.params}
    return {**message_up, CLIENT_ID_KEY: client_state["tags"]["client_id"]}, new_state

  def broadcast(state):
    down = inner_broadcast(state)
    if personalized:
      rep = state.agg_state
      # q_i = r_i / max_j r_j; a client not seen yet takes the whole reward.
      share = jnp.where(rep.seen, rep.reputation / jnp.maximum(jnp.max(rep.reputation), 1e-12),
                        1.0)
      reward = server_rules.require_state(state.rule_state, RewardState, "keep_reward").reward
      down = {**down, "reward": reward, "reward_share": share}
    return down

  fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
  fields.update(name=f"rffl_{method.name}" if method.name != "fedavg" else "rffl",
                aggregator=reputation_aggregator(alpha, beta, clip),
                client_final=client_final, broadcast=broadcast, personalized=personalized)
  if personalized:
    fields["server_rule"] = server_rules.chain(method.server_rule, keep_reward())
  return RFFLAlgorithm(**fields)


def client_models(state: ServerState):
  """Per-client models ``[N, ...]`` of a personalized RFFL run."""
  if not isinstance(state.client_states, dict) or "model" not in state.client_states:
    raise ValueError("client_models needs the state of rffl(..., personalized=True).")
  return state.client_states["model"]


def fairness(per_client_accuracy, contribution) -> float:
  """Pearson correlation of per-client accuracies with contributions (RFFL, Sec. 5)."""
  a = np.asarray(per_client_accuracy, np.float64)
  c = np.asarray(contribution, np.float64)
  if a.shape != c.shape or a.ndim != 1 or a.size < 2:
    raise ValueError(f"fairness needs two 1-D arrays of the same length >= 2, got "
                     f"{a.shape} and {c.shape}.")
  if np.std(a) == 0 or np.std(c) == 0:
    return 0.0
  return float(np.corrcoef(a, c)[0, 1])


def from_config(config, example_loss):
  base = fedavg(example_loss, config.client_lr, config.server_lr, schedule_from_config(config),
                config.get("weighting", "num_examples"))
  return rffl(base, config.get("rffl_alpha", 0.95), config.get("rffl_beta", 1.0 / 3.0),
              config.get("rffl_clip", None), config.get("rffl_personalized", True))
