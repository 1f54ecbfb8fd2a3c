"""Decentralized (gossip) learning: no server; every node keeps its own model.

A round of ``N`` nodes with models ``X [N, ...]`` (the stacked params):

    W, active = topology.mixing(key, round)       # [N, N] mixing matrix, bool [N]
    Delta_i   = local_train(x_i) - x_i            # every active node, mapped by parallel.py
    train_then_mix (DFedAvg/M, DFedSAM):  X' = W^Q (X + Delta)
    mix_and_train  (D-PSGD):              X' = W X + Delta     (Delta computed at X)

Local training is a ``FederatedAlgorithm``'s client side (``client_update``: its
oracle, client transform, schedule, ``client_final`` and per-node state), run by the
same backends as rounds (``loop``, ``vmap``, ``sharded``); gossip is a matrix product
over the nodes axis (``mix``), so it runs wherever the stacked models are.

A decentralized run's ``ServerState`` holds the stacked models in ``params``
(leaves ``[N, ...]``) and the nodes' states in ``client_states``; ``opt_state``,
``rule_state`` and ``agg_state`` are empty. The rounds loop is ``training.run_loop``
(``train`` here wraps it), so metrics, evaluation, checkpoints and resume are the
loop's.

Mixing matrices are built on the host (numpy) for static graphs (``ring``, ``torus``,
``exponential``, ``erdos_renyi``, ``fully_connected``) and on the device for
time-varying ones (``random_matching``, ``one_peer_exponential``, ``modest``).

References:
  Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?", NeurIPS
  2017 (D-PSGD, Alg. 1). Sun, Li, Wang, "Decentralized Federated Averaging", TPAMI 2022
  (DFedAvg/DFedAvgM, Alg. 1). Shi et al., "Improving the Model Consistency of Decentralized
  Federated Learning", ICML 2023 (DFedSAM, DFedSAM-MGS, Alg. 1). de Vos et al., "MoDeST:
  Bridging the Gap between Federated and Decentralized Learning with Decentralized
  Sampling", 2023. Ying et al., "Exponential Graph is Provably Efficient for
  Decentralized Deep Training", NeurIPS 2021. Koloskova et al., "A Unified Theory of
  Decentralized SGD with Changing Topology and Local Updates", ICML 2020 (consensus
  distance, spectral gap). Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in
  Fully Decentralized Neural-Network Systems", 2024 (variance-corrected averaging).
"""
import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import parallel
from fedjax_lab import training
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState, pad_cohort
from fedjax_lab.data.federated import FederatedData, gather_cohort
from fedjax_lab.transforms import Aggregator
from fedjax_lab.types import Params, PRNGKey, PyTree

ORDERS = ("train_then_mix", "mix_and_train")


# ------------------------------------------------------------------ mixing matrices


def metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
  """Metropolis-Hastings weights of an undirected graph: symmetric, doubly stochastic.

  ``W_ij = 1 / (1 + max(d_i, d_j))`` for each edge, ``W_ii = 1 - sum_{j != i} W_ij``
  (Xiao & Boyd 2004); on a d-regular graph every edge and the self loop get 1/(d+1).
  """
  a = np.asarray(adjacency, bool)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"adjacency must be a square matrix, got shape {a.shape}.")
  if not np.array_equal(a, a.T):
    raise ValueError("adjacency must be symmetric (an undirected graph).")
  a = a & ~np.eye(len(a), dtype=bool)
  degree = a.sum(1)
  w = np.where(a, 1.0 / (1.0 + np.maximum(degree[:, None], degree[None, :])), 0.0)
  w[np.diag_indices_from(w)] = 1.0 - w.sum(1)
  return w


def _check_nodes(num_nodes: int, least: int, what: str) -> None:
  if not isinstance(num_nodes, (int, np.integer)) or num_nodes < least:
    raise ValueError(f"{what} needs an integer number of nodes >= {least}, got {num_nodes!r}.")


def ring(num_nodes: int) -> np.ndarray:
  """Each node averages itself and its two neighbours (1/3 each; n = 2: 1/2 each)."""
  _check_nodes(num_nodes, 2, "ring")
  i = np.arange(num_nodes)
  a = np.zeros((num_nodes, num_nodes), bool)
  a[i, (i + 1) % num_nodes] = a[(i + 1) % num_nodes, i] = True
  return metropolis_hastings(a)


def torus(rows: int, cols: int) -> np.ndarray:
  """A ``rows x cols`` grid with wrap-around; node ``r * cols + c``; 1/5 each for sides >= 3."""
  _check_nodes(rows, 1, "torus rows")
  _check_nodes(cols, 1, "torus cols")
  n = rows * cols
  a = np.zeros((n, n), bool)
  for r in range(rows):
    for c in range(cols):
      i = r * cols + c
      for j in (((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols):
        a[i, j] = a[j, i] = True
  return metropolis_hastings(a)


def torus_shape(num_nodes: int) -> tuple[int, int]:
  """The most square ``(rows, cols)`` with ``rows * cols = num_nodes``."""
  rows = int(math.isqrt(num_nodes))
  while num_nodes % rows:
    rows -= 1
  return rows, num_nodes // rows


def exponential(num_nodes: int) -> np.ndarray:
  """Static exponential graph (Ying et al. 2021, eq. 4): node i sends to ``i + 2^k``.

  ``W_ij = 1 / (tau + 1)`` for ``j = i`` and ``j = i - 2^k mod n``, ``k = 0..tau - 1``,
  ``tau = ceil(log2 n)``; directed and circulant, so doubly stochastic.
  """
  _check_nodes(num_nodes, 2, "exponential")
  tau = math.ceil(math.log2(num_nodes))
  w = np.eye(num_nodes)
  for k in range(tau):
    w += np.roll(np.eye(num_nodes), -(2 ** k), axis=1)   # W[i, i - 2^k]: i - 2^k sends to i
  return w / (tau + 1)


def erdos_renyi(num_nodes: int, p: float, seed: int = 0, max_tries: int = 100) -> np.ndarray:
  """A connected G(n, p) graph (the first of ``max_tries`` draws), Metropolis-Hastings weights."""
  _check_nodes(num_nodes, 2, "erdos_renyi")
  if not 0.0 < p <= 1.0:
    raise ValueError(f"erdos_renyi needs an edge probability p in (0, 1], got {p}.")
  rng = np.random.default_rng(seed)
  for _ in range(max_tries):
    upper = np.triu(rng.random((num_nodes, num_nodes)) < p, 1)
    w = metropolis_hastings(upper | upper.T)
    if spectral_gap(w) > 1e-9:   # connected
      return w
  raise ValueError(f"erdos_renyi(n={num_nodes}, p={p}) drew no connected graph in "
                   f"{max_tries} tries; raise p (connected w.h.p. for p > ln(n)/n = "
                   f"{math.log(num_nodes) / num_nodes:.3f}).")


def fully_connected(num_nodes: int) -> np.ndarray:
  """``W = 11^T / n``: one gossip step is the exact average (FedAvg's)."""
  _check_nodes(num_nodes, 1, "fully_connected")
  return np.full((num_nodes, num_nodes), 1.0 / num_nodes)


def check_doubly_stochastic(w, atol: float = 1e-6, name: str = "mixing matrix") -> np.ndarray:
  """``w`` as float64 numpy if it is non-negative with unit row and column sums, else raises."""
  w = np.asarray(w, np.float64)
  if w.ndim != 2 or w.shape[0] != w.shape[1]:
    raise ValueError(f"The {name} must be square, got shape {w.shape}.")
  if np.any(w < -atol):
    i, j = np.argwhere(w < -atol)[0]
    raise ValueError(f"The {name} has a negative entry W[{i}, {j}] = {w[i, j]:.3g}.")
  for axis, what in ((1, "row"), (0, "column")):
    sums = w.sum(axis)
    bad = np.flatnonzero(np.abs(sums - 1.0) > atol)
    if bad.size:
      raise ValueError(f"The {name} is not doubly stochastic: {what} {bad[0]} sums to "
                       f"{sums[bad[0]]:.6g}.")
  return w


def spectral_gap(w) -> jax.Array:
  """``1 - ||W - 11^T/n||_2``: the per-step contraction of the consensus distance's root.

  For doubly stochastic ``W``, ``||W X - 1 xbar^T||_F <= (1 - gap) ||X - 1 xbar^T||_F``;
  for symmetric ``W`` this is ``1 - max(|lambda_2|, |lambda_n|)``. Numpy in, numpy out;
  a JAX array in (a time-varying matrix on the device), a JAX scalar out.
  """
  xp = np if isinstance(w, np.ndarray) else jnp
  n = w.shape[0]
  return 1.0 - xp.linalg.norm(w - 1.0 / n, ord=2)


# ---------------------------------------------------------------------- topologies


class Topology(NamedTuple):
  """Who talks to whom in each round.

  mixing: ``(key, round) -> (W [N, N] float32, active bool [N])``; ``active`` marks
    the nodes that train this round (all but in ``modest``).
  num_nodes: N.
  name: for metrics and errors.
  matrix: the static matrix (numpy) of a static topology, None for time-varying ones.
  """
  mixing: Callable[[PRNGKey, jax.Array], tuple[jax.Array, jax.Array]]
  num_nodes: int
  name: str
  matrix: Optional[np.ndarray] = None


def static(w, name: str = "static", doubly_stochastic: bool = True) -> Topology:
  """A fixed mixing matrix (checked doubly stochastic unless told otherwise)."""
  w = check_doubly_stochastic(w, name=f"{name} mixing matrix") if doubly_stochastic \
      else np.asarray(w, np.float64)
  n = w.shape[0]
  matrix = jnp.asarray(w, jnp.float32)

  def mixing(key, round_index):
    del key, round_index
    return matrix, jnp.ones((n,), bool)

  return Topology(mixing, n, name, w)


def random_matching(num_nodes: int) -> Topology:
  """Time-varying: each round a uniformly random (near-)perfect matching; pairs average.

  ``W_t = (I + P_t) / 2`` with ``P_t`` the permutation swapping matched pairs (an odd
  node out keeps its model): symmetric and doubly stochastic every round.
  """
  _check_nodes(num_nodes, 2, "random_matching")
  n, pairs = num_nodes, num_nodes // 2

  def mixing(key, round_index):
    del round_index
    order = jax.random.permutation(key, n)
    partner = jnp.arange(n)
    a, b = order[0:2 * pairs:2], order[1:2 * pairs:2]
    partner = partner.at[a].set(b).at[b].set(a)
    w = 0.5 * (jnp.eye(n) + jax.nn.one_hot(partner, n))
    return w.astype(jnp.float32), jnp.ones((n,), bool)

  return Topology(mixing, n, "random_matching")


def one_peer_exponential(num_nodes: int) -> Topology:
  """Time-varying one-peer exponential graph (Ying et al. 2021, eq. 5).

  Round t: ``W_t = (I + S^{2^(t mod tau)}) / 2`` with S the cyclic shift and
  ``tau = ceil(log2 n)``; for n a power of 2, tau rounds give the exact average.
  """
  _check_nodes(num_nodes, 2, "one_peer_exponential")
  n, tau = num_nodes, math.ceil(math.log2(num_nodes))
  shifts = jnp.stack([jnp.asarray(np.roll(np.eye(n), -(2 ** k), axis=1), jnp.float32)
                      for k in range(tau)])

  def mixing(key, round_index):
    del key
    w = 0.5 * (jnp.eye(n, dtype=jnp.float32) + shifts[round_index % tau])
    return w, jnp.ones((n,), bool)

  return Topology(mixing, n, "one_peer_exponential")


def modest_sample(seed: int, round_index, num_nodes: int, sample_size: int) -> jax.Array:
  """MoDeST's sample of a round: the ``sample_size`` nodes of smallest hash(seed, round, id).

  Every node can compute any round's sample without asking anyone (decentralized
  sampling); here the hash is a keyed uniform draw. Returns bool ``[num_nodes]``.
  """
  scores = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(seed), round_index),
                              (num_nodes,))
  chosen = jnp.argsort(scores)[:sample_size]
  return jnp.zeros((num_nodes,), bool).at[chosen].set(True)


def modest(num_nodes: int, sample_size: int, seed: int = 0) -> Topology:
  """MoDeST-style decentralized sampling (de Vos et al. 2023, Sec. 3).

  Round t: the sample ``S_t`` trains from the models it holds; the average of their
  trained models goes to every node of the next round's sample ``S_{t+1}`` (MoDeST's
  aggregators hand it on), everyone else keeps its model:

      W_t[i, :] = 1_{S_t} / s  for i in S_{t+1};   W_t[i, :] = e_i  otherwise.

  With every node starting from one model, the model ``S_{t+1}`` holds is FedAvg's
  with the cohorts ``S_t`` and uniform weights. ``W_t`` is row- but not column-stochastic.
  """
  _check_nodes(num_nodes, 1, "modest")
  if not 1 <= sample_size <= num_nodes:
    raise ValueError(f"modest needs 1 <= sample_size <= num_nodes={num_nodes}, "
                     f"got {sample_size}.")
  n = num_nodes

  def mixing(key, round_index):
    del key
    now = modest_sample(seed, round_index, n, sample_size)
    nxt = modest_sample(seed, round_index + 1, n, sample_size)
    average = jnp.broadcast_to(now.astype(jnp.float32) / sample_size, (n, n))
    w = jnp.where(nxt[:, None], average, jnp.eye(n, dtype=jnp.float32))
    return w, now

  return Topology(mixing, n, "modest")


TOPOLOGIES = ("ring", "torus", "exponential", "erdos_renyi", "fully_connected",
              "random_matching", "one_peer_exponential", "modest")


def topology(name: str, num_nodes: int, *, edge_probability: float = 0.2,
             sample_size: Optional[int] = None, seed: int = 0) -> Topology:
  """A topology of ``TOPOLOGIES`` by name."""
  if name == "ring":
    return static(ring(num_nodes), name)
  if name == "torus":
    return static(torus(*torus_shape(num_nodes)), name)
  if name == "exponential":
    return static(exponential(num_nodes), name)
  if name == "erdos_renyi":
    return static(erdos_renyi(num_nodes, edge_probability, seed), name)
  if name == "fully_connected":
    return static(fully_connected(num_nodes), name)
  if name == "random_matching":
    return random_matching(num_nodes)
  if name == "one_peer_exponential":
    return one_peer_exponential(num_nodes)
  if name == "modest":
    return modest(num_nodes, sample_size or max(1, num_nodes // 10), seed)
  raise ValueError(f"Unknown topology {name!r}; choose one of {', '.join(TOPOLOGIES)}.")


# ------------------------------------------------------------------------- gossip


def mix(w: jax.Array, stacked: PyTree) -> PyTree:
  """One gossip step ``X' = W X`` over the leading nodes axis of every leaf."""
  return jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), stacked)


def _element_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per node: mean and variance over the elements of one leaf ``[N, ...]``."""
  flat = x.reshape(x.shape[0], -1)
  return jnp.mean(flat, 1), jnp.var(flat, 1)


def variance_corrected_mix(w: jax.Array, stacked: PyTree, eps: float = 1e-12) -> PyTree:
  """``W X`` with each node's layers rescaled to the variance of the models it averaged.

  The vanishing-variance correction (Tian et al. 2024): averaging weakly correlated
  models shrinks the variance of their weights below the one initialisation set.
  Per node ``i`` and per leaf (layer), with ``m``, ``v`` the mean and variance over the
  leaf's elements:

      z_i  = sum_j W_ij x_j,     v_target = sum_j W_ij v(x_j)
      z_i' = m(z_i) + (z_i - m(z_i)) sqrt(v_target / v(z_i))

  Leaves of one element (or of zero variance, e.g. zero biases) are left as mixed.
  The statistics (per layer, over its elements; the W-weighted target) are this
  module's reading of the paper's variance-corrected averaging.
  """
  def one(x):
    z = jnp.tensordot(w.astype(x.dtype), x, axes=1)
    if x[0].size < 2:
      return z
    mean_z, var_z = _element_moments(z)
    target = w.astype(x.dtype) @ _element_moments(x)[1]
    scale = jnp.where(var_z > eps, jnp.sqrt(target / jnp.maximum(var_z, eps)), 1.0)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return mean_z.reshape(shape) + (z - mean_z.reshape(shape)) * scale.reshape(shape)
  return jax.tree.map(one, stacked)


def average_model(stacked: PyTree) -> Params:
  """The nodes' average model ``xbar``."""
  return jax.tree.map(lambda x: jnp.mean(x, 0), stacked)


def consensus_distance(stacked: PyTree) -> jax.Array:
  """``(1/N) sum_i ||x_i - xbar||^2`` over all leaves (Koloskova et al. 2020)."""
  spread = jax.tree.map(jnp.subtract, stacked, average_model(stacked))
  return optax.tree.norm(spread, squared=True) / jax.tree.leaves(stacked)[0].shape[0]


# ----------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class Decentralized:
  """A gossip method: a client side, a topology, and how the two alternate.

  Attributes:
    name: for metrics and the progress bar.
    local: the ``FederatedAlgorithm`` whose client side each node runs (its oracle,
      client transform, schedule, ``client_final`` and ``init_client_state``; its
      server side is not used). ``client_extra_args`` sees ``{'params': x_i}``.
    topology: the mixing matrices.
    order: ``'train_then_mix'`` (``X' = W^Q (X + Delta)``) or ``'mix_and_train'``
      (D-PSGD: ``X' = W X + Delta``, Delta computed at X).
    gossip_steps: Q mixing steps per round (DFedSAM-MGS); 1 otherwise.
    variance_correction: mix with ``variance_corrected_mix``.
  """
  name: str
  local: FederatedAlgorithm
  topology: Topology
  order: str = "train_then_mix"
  gossip_steps: int = 1
  variance_correction: bool = False

  def __post_init__(self):
    if self.order not in ORDERS:
      raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}.")
    if not isinstance(self.gossip_steps, int) or self.gossip_steps < 1:
      raise ValueError(f"gossip_steps must be a positive integer, got {self.gossip_steps!r}.")
    if self.order == "mix_and_train" and self.gossip_steps != 1:
      raise ValueError("mix_and_train (D-PSGD) mixes once per round; gossip_steps must be 1.")

  def init(self, params: Params, rng: PRNGKey, node_params: Optional[PyTree] = None
           ) -> ServerState:
    """Every node starts from ``params``, or node i from row i of ``node_params`` (leaves
    ``[N, ...]``: e.g. independent initialisations, the vanishing-variance setting)."""
    n = self.topology.num_nodes
    if node_params is None:
      stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)).copy(), params)
    else:
      stacked = jax.tree.map(jnp.asarray, node_params)
      for leaf in jax.tree.leaves(stacked):
        if leaf.shape[:1] != (n,):
          raise ValueError(f"node_params needs a leading axis of the {n} nodes, got a leaf "
                           f"of shape {leaf.shape}.")
    states = ()
    if self.local.init_client_state is not None:
      one = self.local.init_client_state(params)
      states = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)).copy(), one)
    return ServerState(params=stacked, opt_state=(), round=jnp.zeros((), jnp.int32),
                       rng=jnp.asarray(rng, jnp.uint32), client_states=states, extra={},
                       agg_state=(), rule_state=())

  def gossip(self, w: jax.Array, stacked: PyTree) -> PyTree:
    step = variance_corrected_mix if self.variance_correction else mix
    for _ in range(self.gossip_steps):
      stacked = step(w, stacked)
    return stacked


# The local updates' messages stay in the outputs; nothing is reduced.
_NO_AGGREGATE = Aggregator(init=lambda: (), update=lambda m, w, s, c: ({}, s))


def make_round(method: Decentralized, data: FederatedData,
               backend: parallel.BackendLike = "vmap", mesh=None,
               chunk_size: Optional[int] = None) -> Callable:
  """``round_fn(state, arrays, offsets) -> (state, metrics)``, pure; node i is client i.

  Keys as ``algorithm.make_round``'s: node i's local key is
  ``fold_in(split(fold_in(rng, t))[1], i)``, the mixing key the other half, so on a
  fully connected graph the nodes run exactly FedAvg's clients.
  """
  n = method.topology.num_nodes
  if data.num_clients != n:
    raise ValueError(f"The topology has {n} nodes and the data {data.num_clients} clients; "
                     f"one node per client.")
  backend = parallel.get_backend(backend, mesh)
  padded = backend.padded_cohort_size(n)
  max_examples = int(data.max_client_size)
  local = method.local

  def node_fn(shared, one_node):
    del shared
    x, row, node_data, size, key = one_node
    up, weight, outputs = local.client_update({"params": x}, (row, node_data, size, key),
                                              max_examples)
    return {}, weight, {**outputs, "delta": up["delta"]}

  mapper = backend.make_mapper(node_fn, _NO_AGGREGATE, chunk_size)

  def pad_nodes(tree):
    return jax.tree.map(lambda x: jnp.pad(x, [(0, padded - n)] + [(0, 0)] * (x.ndim - 1)), tree)

  def round_fn(state: ServerState, arrays, offsets):
    mix_key, client_key = jax.random.split(jax.random.fold_in(state.rng, state.round))
    w, active = method.topology.mixing(mix_key, state.round)
    ids = pad_cohort(jnp.arange(n, dtype=jnp.int32), padded, n)
    cohort, sizes = gather_cohort(arrays, offsets, ids, max_examples)
    sizes = jnp.where(jnp.pad(active, (0, padded - n)), sizes, 0)   # idle nodes take no step
    keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(ids)
    rows = pad_nodes(state.client_states)
    _, outputs, _ = mapper((), (pad_nodes(state.params), rows, cohort, sizes, keys), (),
                           client_ids=ids)
    outputs = jax.tree.map(lambda x: x[:n], outputs)
    delta = outputs["delta"]
    if method.order == "train_then_mix":
      params = method.gossip(w, jax.tree.map(jnp.add, state.params, delta))
    else:
      params = jax.tree.map(jnp.add, method.gossip(w, state.params), delta)
    weights = outputs["weight"]
    metrics = {"train_loss": jnp.sum(weights * outputs["loss"]) / jnp.maximum(jnp.sum(weights), 1e-12),
               "local_steps": jnp.sum(outputs["num_steps"]),
               "consensus_distance": consensus_distance(params),
               "spectral_gap": spectral_gap(w),
               "active_nodes": jnp.sum(active)}
    state = state._replace(params=params, client_states=outputs["client_state"],
                           round=state.round + 1)
    return state, metrics

  return round_fn


def node_evaluator(evaluate: Callable) -> Callable:
  """``evaluate(params, test)`` for stacked models: the average model's metrics, plus
  ``node_accuracy`` / ``node_loss`` (the mean over the nodes' own models) and
  ``consensus_distance``."""
  @jax.jit
  def per_node(stacked, test):
    return jax.lax.map(lambda p: evaluate(p, test), stacked)

  def evaluate_nodes(stacked, test):
    result = dict(evaluate(average_model(stacked), test))
    nodes = per_node(stacked, test)
    result["node_accuracy"] = jnp.mean(nodes["accuracy"])
    result["node_loss"] = jnp.mean(nodes["loss"])
    result["consensus_distance"] = consensus_distance(stacked)
    return result

  return evaluate_nodes


def train(method: Decentralized, params: Params, data: FederatedData,
          evaluate: Optional[Callable] = None, test_arrays=None,
          opts: Optional[training.TrainOptions] = None,
          node_params: Optional[PyTree] = None) -> tuple[ServerState, list[dict]]:
  """``opts.rounds`` gossip rounds on the rounds loop (``training.run_loop``).

  ``evaluate(params, test)`` evaluates one model; it is applied to the average model
  and to every node (``node_evaluator``). ``opts.clients_per_round`` is ignored (every
  node is in every round; ``modest`` chooses who trains). Returns ``(state, history)``
  with ``state.params`` the stacked models. ``node_params``: each node's own initial
  model (``Decentralized.init``).
  """
  if opts.client_states != "device" or opts.sampler is not None:
    raise ValueError("Decentralized runs keep the node states on the device and sample "
                     "nothing (client_states='device', sampler=None).")
  opts = dataclasses.replace(opts, clients_per_round=data.num_clients)
  # Gossip maps every node each round: no automatic chunking (its rule is for cohorts).
  chunk_size = None if opts.chunk_size == "auto" else opts.chunk_size
  round_fn = make_round(method, data, opts.backend, chunk_size=chunk_size)
  rng = jax.random.PRNGKey(opts.seed)
  loop = training.run_loop(
      dataclasses.replace(method.local, name=method.name), params, data,
      None if evaluate is None else node_evaluator(evaluate), test_arrays, opts,
      round_wrapper=_Replace(round_fn), init_state=method.init(params, rng, node_params))
  return loop.state, loop.history


class _Replace:
  """A round wrapper that runs the gossip round instead of the federated one.

  Unhashable, so the rounds loop's compile cache does not keep one entry per run.
  """
  __hash__ = None

  def __init__(self, round_fn):
    self.round_fn = round_fn

  def __call__(self, federated_round):
    del federated_round
    return self.round_fn
