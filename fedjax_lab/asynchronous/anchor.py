"""FedAMD: anchor sampling for partial participation.

Wu, Guo, Qu, He, Liu, Gao. "Anchor Sampling for Federated Learning with Partial Client
Participation", ICML 2023 (Algorithm 1; github.com/HarliWu/FedAMD, ``algo/fedamd.py``).

Every client ``i`` keeps an anchor ``g_i``, a large-batch gradient of its loss, set for
every client at ``x_0``. In round ``t`` the server broadcasts ``x_t`` and
``v_t = (1/N) sum_i g_i`` (all ``N`` clients' anchors). Each sampled client is, with
probability ``p``, in the anchor group, else in the miner group:

    anchor: g_i <- grad f_i(x_t; B_i)          (B_i: all of the client's examples)
    miner:  y_0 = x_t,  d_0 = v_t,
            d_k = d_{k-1} + grad f_i(y_k; b_k) - grad f_i(y_{k-1}; b_k)    (k >= 1)
            y_{k+1} = y_k - eta_l d_k,           Delta_i = y_K - x_t
    server: x_{t+1} = x_t + eta_g (1/|miners|) sum_{miners} Delta_i

The miner's direction is SARAH's recursive estimate started from ``v_t``
(``sarah_oracle``). Anchors upload no delta (weight 0, so the aggregator averages
over the miners); a round without miners leaves ``x`` as it is under server SGD.
"""
import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lab import hyperparams
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.data.federated import gather_cohort
from fedjax_lab.transforms import GradientOracle

_ANCHOR_COIN = 0x616d64   # fold_in tag of the anchor / miner draw


def sarah_oracle(oracle: GradientOracle) -> GradientOracle:
  """SARAH's recursive estimate over ``oracle``: ``d_k = d_{k-1} + g(y_k) - g(y_{k-1})``.

  Both gradients are on the step's batch (and key). The state is ``(y_{k-1}, d_{k-1})``;
  start it at ``(y_0, v)`` so that the first step's direction is ``v``.
  """
  def update(params, batch, rng, state):
    previous, direction = state
    grads, aux, _ = oracle.update(params, batch, rng, oracle.init(params))
    before, _, _ = oracle.update(previous, batch, rng, oracle.init(previous))
    direction = jax.tree.map(lambda d, g, h: d + g - h, direction, grads, before)
    return direction, aux, (params, direction)

  return GradientOracle(init=lambda params: (params, jax.tree.map(jnp.zeros_like, params)),
                        update=update)


def full_gradient(oracle: GradientOracle, params, data, size, rng):
  """The oracle's gradient on all ``size`` examples of a client's padded ``data``."""
  n = jax.tree.leaves(data)[0].shape[0]
  batch = {**data, "mask": jnp.arange(n) < size}
  return oracle.update(params, batch, rng, oracle.init(params))[0]


@dataclasses.dataclass(frozen=True)
class AnchorSampled(FederatedAlgorithm):
  """A method whose sampled clients are anchors (probability ``anchor_prob``) or miners.

  ``oracle`` is the miners' SARAH oracle, ``anchor_oracle`` the plain one the anchors'
  gradients come from; ``client_states`` hold the anchors ``g_i``.
  """
  anchor_oracle: GradientOracle = None
  anchor_prob: float = 0.2

  def client_update(self, message_down, one_client, max_examples):
    client_state, data, size, rng = one_client
    message, weight, outputs = super().client_update(message_down, one_client, max_examples)
    anchor = full_gradient(self.anchor_oracle, message_down["params"], data, size, rng)
    is_anchor = jax.random.bernoulli(jax.random.fold_in(rng, _ANCHOR_COIN), self.anchor_prob)
    is_anchor = is_anchor & (size > 0)
    message = jax.tree.map(lambda m: jnp.where(is_anchor, jnp.zeros_like(m), m), message)
    weight = jnp.where(is_anchor, 0.0, weight)
    new_state = jax.tree.map(lambda a, g: jnp.where(is_anchor, a, g), anchor, client_state)
    return message, weight, {**outputs, "client_state": new_state, "weight": weight}


def fedamd(base: FederatedAlgorithm, anchor_prob=0.2) -> AnchorSampled:
  """FedAMD on ``base``'s oracle, client transform (SGD(eta_l) in the paper), schedule,
  aggregator and server step (SGD(eta_g)); ``base.weighting='uniform'`` averages the
  miners as the paper does.

  ``initial_anchors`` (an ``AsyncSpec.on_init``) sets every client's anchor at ``x_0``.
  """
  hyperparams.check(anchor_prob, lambda v: 0 <= v <= 1,
                    f"FedAMD's anchor probability must be in [0, 1], got {anchor_prob}.")
  if base.init_client_state is not None:
    raise ValueError(f"FedAMD keeps each client's anchor in the client states; the base "
                     f"method {base.name!r} already has its own.")
  base_broadcast = base.broadcast

  def broadcast(state: ServerState) -> dict:
    anchors = state.client_states
    if not jax.tree.leaves(anchors):
      raise ValueError("FedAMD's broadcast needs the anchor table (state.client_states) "
                       "on the device.")
    return {**base_broadcast(state),
            "anchor_mean": jax.tree.map(lambda g: jnp.mean(g, axis=0), anchors)}

  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(FederatedAlgorithm)}
  fields.update(
      name="fedamd", oracle=sarah_oracle(base.oracle), anchor_oracle=base.oracle,
      anchor_prob=anchor_prob,
      init_client_state=lambda params: jax.tree.map(jnp.zeros_like, params),
      broadcast=broadcast,
      init_oracle_state=lambda down, row: (down["params"], down["anchor_mean"]))
  return AnchorSampled(**fields)


def initial_anchors(state: ServerState, arrays, offsets, max_examples: int,
                    algorithm: AnchorSampled) -> ServerState:
  """Every client's anchor ``g_i = grad f_i(x_0; B_i)`` (the authors' start)."""
  num_clients = offsets.shape[0] - 1
  ids = jnp.arange(num_clients, dtype=jnp.int32)
  cohort, sizes = gather_cohort(arrays, offsets, ids, max_examples)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(state.rng, 5), i))(ids)
  anchors = jax.vmap(lambda d, n, k: full_gradient(algorithm.anchor_oracle, state.params, d, n, k))(
      cohort, sizes, keys)
  return state._replace(client_states=anchors)
