"""pFedGate: a personal gating layer turns the global model into a sparse personal one.

Chen, Yao, Gao, Ding, Li. "Efficient Personalized Federated Learning via Sparse
Model-Adaptation", ICML 2023 (arXiv 2305.02776), Sec. 4, with the rules of the
authors' code (github.com/yxdyc/pFedGate: ``GatingLayer``, ``GatedLearner``,
``KnapsackSolver01.found_max_value_greedy``) where the text leaves them open. The
paper's equation numbers were not checked here; the equations are written out below.

The global model's parameters are cut into blocks: each leaf into ``block_split``
contiguous groups of its output units (the authors' ``fine_grained_block_split`` chunks
of a flattened PyTorch ``[out, in]`` weight; ``granularity='flat'`` cuts the flax leaf
flattened instead, i.e. groups of input features of a dense kernel).
Client i's gating layer phi_i maps a batch x to one weight per block:

    z     = std(x) W + b                      per example: x flattened and standardised
    g     = mean_batch sigmoid(BN(z))         BN over the batch, scale gamma, shift beta
    g     = max(g, s_min),  s_min = min(max(1 / block_split, 0.1), s)
    keep  = knapsack(g, sizes, s)             (below); the first sub-block of every leaf is
                                              always kept ("not cutting the information flow")
    theta_i(x) = theta  (.)  expand(g * keep)  every element scaled by its block's weight

The sparsity constraint (sparse factor s, the fraction of the model's parameters
kept) is a 0-1 knapsack over the other blocks: values the gate weights g_j, weights
the block sizes, capacity round((s - s_min) * their total size); solved greedily as in
the authors' code: blocks by value, highest first (ties by block order), each taken if
it still fits. The code ranks integer values round(10 g_j) (made for its DP solver):
``score_levels=10``. With those, the batch-normalised gates start at about 0.5 for
every block, all values tie at 5, and on the digits MLP every client keeps the same
blocks (measured: per-client accuracy 0 for the clients whose classes' head units were
dropped), so the default ranks by g itself (``score_levels=0``). The selection is piecewise
constant: it is a constant for the gradient, which reaches g_j through the kept
blocks only (the code's handling; a dropped block gets neither a gate gradient nor,
its gate being 0, a model gradient). ``s = 1`` keeps every block.

Local training updates theta and phi_i jointly on the same loss of the gated model,
each with its own SGD rate and its gradient clipped to global norm 10 (the code's
``bi_level_opt=0`` of the authors' run scripts, ``clip_grad_norm_(10)``); the server
averages theta's updates (FedAvg, weights n_i); phi_i stays on the client (its row of
the client-state table).

Deviations, named:
* input normalisation: each example standardised over its features (the code uses a
  switchable norm with learned mixing weights);
* BN uses the batch's statistics at evaluation too, and client i is evaluated with one
  client-level gate: ``g * keep`` averaged over its train split's batches (the code's
  ``client_level_adapt``; its default evaluates with per-test-batch gates);
* one knapsack over all blocks (the code solves one for linear layers and one for the
  rest; the models here are dense layers only);
* every client's gating layer starts from the same draw (``gate_seed``).
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.oracles import batch_loss
from fedjax_lab.transforms import GradientOracle

SCORE_LEVELS = 0      # rank by g itself; 10 = the authors' code (round(10 g))
CLIP_NORM = 10.0      # the authors' clip_grad_norm_ on both parts
BN_EPS = 1e-5


class BlockLayout(NamedTuple):
  """Static block structure of a params tree (numpy, from shapes only)."""
  sizes: np.ndarray        # int [L], elements per block
  first: np.ndarray        # bool [L], the first sub-block of its leaf (always kept)
  element_blocks: list     # per leaf (tree order): int [leaf.size], its elements' blocks
  split: int               # block_split it was cut with


GRANULARITIES = ("units", "flat")


def block_layout(params, block_split: int, granularity: str = "units") -> BlockLayout:
  """Blocks of every leaf (``jax.tree`` order): ``min(block_split, n)`` contiguous groups of
  ``ceil(n / that)`` of its n units (the last group shorter).

  ``'units'``: the units are the leaf's last axis (a dense or conv layer's output units,
  with all their incoming weights): the authors' chunks of a flattened PyTorch weight
  ``[out, in, ...]``, in flax's ``[..., in, out]`` layout. ``'flat'``: the units are the
  elements of the flax leaf flattened (for a dense kernel: groups of input features).
  """
  if int(block_split) < 1:
    raise ValueError(f"block_split must be >= 1, got {block_split}.")
  if granularity not in GRANULARITIES:
    raise ValueError(f"unknown block granularity {granularity!r}; choose one of "
                     f"{', '.join(GRANULARITIES)}.")
  sizes, first, element_blocks, start = [], [], [], 0
  for leaf in jax.tree.leaves(params):
    shape = tuple(np.shape(leaf))
    units = (shape[-1] if shape else 1) if granularity == "units" else int(np.prod(shape))
    per_unit = int(np.prod(shape, dtype=np.int64)) // units
    each = -(-units // min(block_split, units))
    count = -(-units // each)
    sizes += [each * per_unit] * (count - 1) + [(units - (count - 1) * each) * per_unit]
    first += [True] + [False] * (count - 1)
    unit_block = start + np.arange(units) // each
    if granularity == "units" and shape:
      blocks = np.broadcast_to(unit_block, shape).reshape(-1)
    else:
      blocks = np.repeat(unit_block, per_unit)
    element_blocks.append(blocks)
    start += count
  return BlockLayout(np.asarray(sizes, np.int64), np.asarray(first), element_blocks,
                     int(block_split))


def min_gate(sparsity, block_split: int):
  """s_min = min(max(1 / block_split, 0.1), s): the floor of every gate weight."""
  return jnp.minimum(max(1.0 / block_split, 0.1), sparsity)


def knapsack_keep(scores: jax.Array, layout: BlockLayout, sparsity,
                  score_levels: int = SCORE_LEVELS) -> jax.Array:
  """Bool ``[L]``: the blocks kept under sparse factor s (greedy 0-1 knapsack, see module).

  ``score_levels = 0`` ranks by the continuous scores instead of ``round(levels g)``.
  """
  candidate = ~jnp.asarray(layout.first)
  sizes = jnp.asarray(layout.sizes, jnp.float32)
  s_min = min_gate(sparsity, layout.split)
  capacity = jnp.round(jnp.sum(jnp.where(candidate, sizes, 0.0)) * (sparsity - s_min))
  values = jnp.round(score_levels * scores) if score_levels else scores
  order = jnp.argsort(jnp.where(candidate, -values, jnp.inf), stable=True)

  def take(total, j):
    fits = candidate[j] & (total + sizes[j] <= capacity)
    return total + jnp.where(fits, sizes[j], 0.0), fits

  _, taken = jax.lax.scan(take, jnp.zeros(()), order)
  keep = jnp.zeros(scores.shape, bool).at[order].set(taken) | ~candidate
  return jnp.where(sparsity >= 1.0, True, keep)


def init_gate(input_dim: int, num_blocks: int, key) -> dict:
  """phi: ``kernel [d, L]``, ``bias [L]`` ~ U(+-1/sqrt(d)) (torch Linear's init), BN
  ``scale`` 1 and ``shift`` 0."""
  bound = 1.0 / np.sqrt(input_dim)
  k1, k2 = jax.random.split(key)
  return {"kernel": jax.random.uniform(k1, (input_dim, num_blocks), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(k2, (num_blocks,), jnp.float32, -bound, bound),
          "scale": jnp.ones((num_blocks,), jnp.float32),
          "shift": jnp.zeros((num_blocks,), jnp.float32)}


def gate_scores(gate: dict, x: jax.Array, mask: jax.Array) -> jax.Array:
  """g ``[L]`` before the floor: masked batch mean of sigmoid(BN(std(x) W + b))."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  if x.shape[1] != gate["kernel"].shape[0]:
    raise ValueError(f"the gating layer takes {gate['kernel'].shape[0]} input features, the "
                     f"batch has {x.shape[1]}; set pfedgate_input_dim.")
  x = (x - x.mean(1, keepdims=True)) / jnp.sqrt(x.var(1, keepdims=True) + BN_EPS)
  z = x @ gate["kernel"] + gate["bias"]
  w = mask.astype(jnp.float32)[:, None]
  count = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(w * z, 0) / count
  var = jnp.sum(w * (z - mean) ** 2, 0) / count
  z = gate["scale"] * (z - mean) / jnp.sqrt(var + BN_EPS) + gate["shift"]
  return jnp.sum(w * jax.nn.sigmoid(z), 0) / count


def gate_weights(gate: dict, x, mask, layout: BlockLayout, sparsity,
                 score_levels: int = SCORE_LEVELS) -> jax.Array:
  """The block weights ``g * keep`` ``[L]`` (the selection held constant)."""
  g = jnp.maximum(gate_scores(gate, x, mask), min_gate(sparsity, layout.split))
  keep = jax.lax.stop_gradient(knapsack_keep(jax.lax.stop_gradient(g), layout, sparsity,
                                             score_levels))
  return g * keep


def client_level_weights(gate: dict, x, size, layout: BlockLayout, sparsity, batch_size: int,
                         score_levels: int = SCORE_LEVELS) -> jax.Array:
  """Client i's evaluation gate: ``g * keep`` averaged over its train split's batches of
  ``batch_size`` in order (the authors' ``client_level_adapt``); ``x`` padded, ``size`` real."""
  count = -(-x.shape[0] // batch_size)
  rows = jnp.arange(count * batch_size).reshape(count, batch_size)
  real = rows < size
  batches = jnp.take(x, jnp.minimum(rows, x.shape[0] - 1), axis=0)
  per_batch = jax.vmap(lambda xb, mb: gate_weights(gate, xb, mb, layout, sparsity,
                                                   score_levels))(batches, real)
  used = jnp.any(real, axis=1).astype(jnp.float32)[:, None]
  return jnp.sum(used * per_batch, 0) / jnp.maximum(jnp.sum(used), 1.0)


def gated_params(params, weights: jax.Array, layout: BlockLayout):
  """theta (.) expand(weights): every element times its block's weight."""
  leaves, treedef = jax.tree.flatten(params)
  out = [leaf * weights[blocks].reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf))
         for leaf, blocks in zip(leaves, layout.element_blocks)]
  return jax.tree.unflatten(treedef, out)


def gated_oracle(example_loss, sparsity, block_split: int, score_levels: int = SCORE_LEVELS,
                 granularity: str = "units", input_key: str = "x") -> GradientOracle:
  """Gradients of the gated model's masked mean loss for ``{'model': theta, 'gate': phi}``."""
  loss = batch_loss(example_loss)

  def gated_loss(params, batch, rng):
    layout = block_layout(params["model"], block_split, granularity)
    weights = gate_weights(params["gate"], batch[input_key], batch["mask"], layout, sparsity,
                           score_levels)
    return loss(gated_params(params["model"], weights, layout), batch, rng)

  def update(params, batch, rng, state):
    value, grads = jax.value_and_grad(gated_loss)(params, batch, rng)
    return grads, {"loss": value}, state

  return GradientOracle(init=lambda params: (), update=update)


def gated_sgd(model_lr, gate_lr, clip_norm=CLIP_NORM) -> optax.GradientTransformation:
  """SGD on theta (``model_lr``) and phi (``gate_lr``), each gradient clipped to ``clip_norm``."""
  def part(lr):
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.sgd(lr))
  return optax.multi_transform({"model": part(model_lr), "gate": part(gate_lr)},
                               {"model": "model", "gate": "gate"})


def first_input_dim(params) -> int:
  """Fan-in of the first 2-D kernel (an MLP's flattened input size)."""
  for leaf in jax.tree.leaves(params):
    if jnp.ndim(leaf) == 2:
      return int(jnp.shape(leaf)[0])
  raise ValueError("cannot infer the gating layer's input size from the params (no 2-D "
                   "kernel); set pfedgate_input_dim.")


def pfedgate(example_loss, client_lr: float, gate_lr: float = 0.1, sparsity: float = 0.5,
             block_split: int = 5, score_levels: int = SCORE_LEVELS, granularity: str = "units",
             input_dim: Optional[int] = None, gate_seed: int = 0, server_lr: float = 1.0,
             schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
             ) -> FederatedAlgorithm:
  """pFedGate with sparse factor ``sparsity`` (the authors' scripts: 0.5, split 5, rates 0.1)."""
  hyperparams.check(sparsity, lambda s: 0.0 < s <= 1.0,
                    f"pFedGate's sparse factor must be in (0, 1], got {sparsity}.")
  hyperparams.check(gate_lr, lambda lr: lr >= 0.0, f"gate_lr must be >= 0, got {gate_lr}.")
  if int(block_split) < 1:
    raise ValueError(f"block_split must be >= 1, got {block_split}.")
  block_layout({}, block_split, granularity)   # fails early on a bad split or granularity
  if int(score_levels) < 0:
    raise ValueError(f"score_levels must be >= 0, got {score_levels}.")

  def init_client_state(params):
    layout = block_layout(params, block_split, granularity)
    dim = first_input_dim(params) if not input_dim else int(input_dim)
    return init_gate(dim, len(layout.sizes), jax.random.PRNGKey(gate_seed))

  def init_local_params(message_down, gate):
    return {"model": message_down["params"], "gate": gate}

  def client_final(local, message_down, gate):
    delta = jax.tree.map(jnp.subtract, local.params["model"], message_down["params"])
    return {"delta": delta}, local.params["gate"]

  def personalize(global_params, gate, data, size, rng):
    del rng
    layout = block_layout(global_params, block_split, granularity)
    weights = client_level_weights(gate, data["x"], size, layout, sparsity,
                                   schedule.resolved_batch_size(data["x"].shape[0]),
                                   score_levels)
    return gated_params(global_params, weights, layout)

  return FederatedAlgorithm(
      name="pfedgate", oracle=gated_oracle(example_loss, sparsity, block_split, score_levels,
                                          granularity),
      client_tx=gated_sgd(client_lr, gate_lr), server_tx=optax.sgd(server_lr),
      schedule=schedule, weighting=weighting, init_client_state=init_client_state,
      init_local_params=init_local_params, client_final=client_final, personalize=personalize)


def kept_fraction(params, gate, x, mask, sparsity, block_split: int,
                  score_levels: int = SCORE_LEVELS, granularity: str = "units") -> jax.Array:
  """Fraction of theta's elements with a nonzero gate for the batch ``x``."""
  layout = block_layout(params, block_split, granularity)
  weights = gate_weights(gate, x, mask, layout, sparsity, score_levels)
  sizes = jnp.asarray(layout.sizes, jnp.float32)
  return jnp.sum(jnp.where(weights > 0, sizes, 0.0)) / jnp.sum(sizes)


def from_config(config, example_loss):
  return pfedgate(example_loss, config.client_lr, config.get("pfedgate_gate_lr", 0.1),
                  config.get("pfedgate_sparsity", 0.5), config.get("pfedgate_block_split", 5),
                  config.get("pfedgate_score_levels", SCORE_LEVELS),
                  config.get("pfedgate_blocks", "units"), config.get("pfedgate_input_dim") or None, config.get("seed", 0),
                  config.server_lr, schedule_from_config(config),
                  config.get("weighting", "num_examples"))
