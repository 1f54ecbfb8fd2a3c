"""Compressed communication: compressors on client messages and on the broadcast, with the
exact count of the bits each message takes.

A compressor maps one array to what the receiver decodes and the bits it was sent in:
``compress(x, key) -> (x_hat, bits)``. The encodings and their exact bit counts
(``d`` entries, ``k`` kept, ``ib(d) = ceil(log2 d)`` bits per index, floats 32 bits):

==========================  ==========================================  ==================================
compressor                  what the receiver decodes                    bits sent
==========================  ==========================================  ==================================
``identity()``              ``x``                                        ``32 d``
``top_k(fraction)``         the ``k = ceil(fraction d)`` entries of      ``32 k + min(k ib(d), d)``
                            largest ``|x_i|``, zeros elsewhere           (positions as indices or a bitmap)
``random_k(fraction)``      ``(d / k) x_i`` on ``k`` uniformly drawn     ``32 k`` (positions follow from the
                            positions (unbiased)                         shared key)
``sign()``                  ``(||x||_1 / d) sign(x)`` (scaled sign)      ``d + 32``
``sign(vote=True)``         ``sign(x)``; the server takes the sign of    ``d``
                            the aggregate (majority vote)
``qsgd(b)``                 ``r sign(x_i) xi_i / s``, ``r = ||x||_2``    ``b d + 32`` per bucket
                            (or ``max |x|``) per bucket, ``s = 2^(b-1)
                            - 1`` levels, ``xi_i`` stochastic rounding
                            of ``s |x_i| / r`` (unbiased)
``rotated(b)``              ``D H q(H D x)``: Walsh-Hadamard rotation,   ``b n + 64`` (``n``: ``d`` padded to
                            ``2^b`` stochastic levels between min and    a power of 2; ``D`` from the key)
                            max, rotated back (unbiased)
``fedzip(z, clusters)``     top-z entries replaced by their k-means      positions ``min(k ib(d), d)`` +
                            centroid                                     Huffman-coded cluster ids +
                                                                         ``32 c`` codebook + Huffman table
                                                                         ``c ceil(log2 c)``
==========================  ==========================================  ==================================

References: top-k (Aji & Heafield 2017; Stich, Cordonnier, Jaggi 2018), random-k
(Stich et al. 2018), signSGD and its majority vote (Bernstein, Wang, Azizzadenesheli,
Anandkumar, ICML 2018; Bernstein, Zhao, Azizzadenesheli, Anandkumar, ICLR 2019), the
scaled sign (Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD", ICML
2019), QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017, eq. (1) with
buckets), rotated quantisation ``pi_srk`` (Suresh, Yu, Kumar, McMahan, "Distributed Mean
Estimation with Limited Communication", ICML 2017, Sec. 4), FedZip (Malekijoo,
Fadaeieslam, Malekijou, Homayounfar, Alizadeh-Shabdiz, Rawassizadeh, "FEDZIP: A
Compression Framework for Communication-Efficient Federated Learning", 2021: top-z
sparsification, k-means clustering with 3 centroids, Huffman coding).

``compressed(method, uplink, ...)`` puts a compressor between any method's
``client_final`` and its aggregator (and optionally on the broadcast), so it composes
with every method (FedAvg, SCAFFOLD, FAL, FedHyper, ...), robust aggregators and DP:

* error feedback, kept per client in the client-state table (``'ef'``):
  EF (Seide et al. 2014; Karimireddy et al. 2019): ``p = m + e; c = C(p); e' = p - c``,
  the client sends ``c``. EF21 (Richtarik, Sokolov, Fatkhullin, NeurIPS 2021; with
  partial participation as EF21-PP, Fatkhullin et al. 2021): the client and the
  server both hold ``g_i``; the client sends ``c = C(m - g_i)``, both set
  ``g_i <- g_i + c`` and the aggregator sees ``g_i``.
* downlink: the server keeps the model ``x_hat`` its clients hold and broadcasts
  ``C(x - x_hat)``, ``x_hat <- x_hat + C(x - x_hat)`` (EF21-P, Gruntkowska, Tyurin,
  Richtarik, ICML 2023); clients train from ``x_hat``, the server steps from ``x``.
* accounting: every real client (weight > 0) of a round adds its uplink message's
  bits and the broadcast's; entries that are not compressed count 32 bits per float.
  The totals are exact integers in the rule state (``CommState``); ``report`` reads
  them. The initial model's download is not counted.
"""
import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import byzantine
from fedjax_lab import server_rules
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.transforms import Aggregator, as_collectives
from fedjax_lab.types import PRNGKey, PyTree

FLOAT_BITS = 32
COMM_KEY = "_comm_bits"       # per-client bit counts in the message, removed by the aggregator
DOWN_BITS_KEY = "_downlink_bits"   # the broadcast's bit count, in the broadcast
KEY_KEY = "_compression_key"       # the round's compression key, in the broadcast
EF_KINDS = ("ef", "ef21")
_INT32_MAX = 2 ** 31 - 1
_LIMB = 16                    # totals are (hi, lo) pairs in base 2^16, exact in int32


class Compressor(NamedTuple):
  """One array in, what the receiver decodes and the bits sent.

  compress: ``(x, key) -> (x_hat, bits)``; ``x_hat`` shaped like ``x``, ``bits`` an
    int32 scalar (traceable: data-dependent encodings such as Huffman codes).
  max_bits: ``d -> int``, an upper bound on ``bits`` for ``d`` entries (static checks).
  name: for errors and reports.
  unbiased: ``E[x_hat] = x``.
  vote: the server takes the sign of the aggregate (signSGD with majority vote).
  """
  compress: Callable[[jax.Array, PRNGKey], tuple[jax.Array, jax.Array]]
  max_bits: Callable[[int], int]
  name: str
  unbiased: bool = False
  vote: bool = False


def index_bits(d: int) -> int:
  """Bits of one position among ``d``: ``ceil(log2 d)`` (0 for ``d = 1``)."""
  return (int(d) - 1).bit_length()


def position_bits(k: int, d: int) -> int:
  """Positions of ``k`` kept entries among ``d``: indices or a bitmap, whichever is smaller."""
  return min(k * index_bits(d), d)


def _kept(fraction: float, d: int) -> int:
  return max(1, min(d, math.ceil(fraction * d)))


def _check_fraction(fraction, name):
  if not 0 < fraction <= 1:
    raise ValueError(f"{name}'s fraction must be in (0, 1], got {fraction}.")


def _check_bits(bits, low, name):
  if isinstance(bits, bool) or int(bits) != bits or not low <= bits <= 16:
    raise ValueError(f"{name} needs an integer number of bits in [{low}, 16], got {bits!r}.")


def identity() -> Compressor:
  """No compression: ``32 d`` bits."""
  return Compressor(lambda x, key: (x, jnp.int32(FLOAT_BITS * x.size)),
                    lambda d: FLOAT_BITS * d, "identity", unbiased=True)


def top_k(fraction: float) -> Compressor:
  """The ``k = ceil(fraction d)`` entries of largest magnitude (ties: lower index first)."""
  _check_fraction(fraction, "top_k")

  def compress(x, key):
    del key
    flat = x.reshape(-1)
    k = _kept(fraction, flat.size)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    out = jnp.zeros_like(flat).at[idx].set(flat[idx])
    return out.reshape(x.shape), jnp.int32(FLOAT_BITS * k + position_bits(k, flat.size))

  return Compressor(compress, lambda d: FLOAT_BITS * _kept(fraction, d) +
                    position_bits(_kept(fraction, d), d), "top_k")


def random_k(fraction: float) -> Compressor:
  """``k`` positions drawn uniformly without replacement, scaled by ``d / k`` (unbiased).

  The positions follow from the key, which the server derives too: only the values
  are sent.
  """
  _check_fraction(fraction, "random_k")

  def compress(x, key):
    flat = x.reshape(-1)
    d = flat.size
    k = _kept(fraction, d)
    idx = jax.random.choice(key, d, (k,), replace=False)
    out = jnp.zeros_like(flat).at[idx].set(flat[idx] * (d / k))
    return out.reshape(x.shape), jnp.int32(FLOAT_BITS * k)

  return Compressor(compress, lambda d: FLOAT_BITS * _kept(fraction, d), "random_k",
                    unbiased=True)


def sign(vote: bool = False) -> Compressor:
  """``(||x||_1 / d) sign(x)`` (``d + 32`` bits); ``vote``: ``sign(x)`` (``d`` bits) and the
  server's aggregate becomes its sign (signSGD with majority vote)."""
  def compress(x, key):
    del key
    if vote:
      return jnp.sign(x), jnp.int32(x.size)
    return jnp.mean(jnp.abs(x)) * jnp.sign(x), jnp.int32(x.size + FLOAT_BITS)

  return Compressor(compress, lambda d: d + (0 if vote else FLOAT_BITS),
                    "sign_vote" if vote else "sign", vote=vote)


def _buckets(flat, bucket_size):
  d = flat.size
  size = d if bucket_size is None else min(int(bucket_size), d)
  count = -(-d // size)
  padded = jnp.pad(flat, (0, count * size - d))
  return padded.reshape(count, size), count


def qsgd(bits: int = 4, norm: str = "l2", bucket_size: Optional[int] = None) -> Compressor:
  """QSGD's stochastic quantisation with ``s = 2^(bits-1) - 1`` levels and a sign bit.

  ``Q(x)_i = r sign(x_i) xi_i / s`` with ``r = ||x||_2`` (the paper's eq. (1); ``norm=
  'linf'``: ``r = max |x|``, stochastic uniform quantisation) per bucket of
  ``bucket_size`` entries (None: the whole array), ``xi_i = floor(s |x_i| / r) + 1`` with
  probability ``frac(s |x_i| / r)``, else the floor: unbiased, ``bits`` bits per entry
  plus a 32-bit ``r`` per bucket.
  """
  _check_bits(bits, 2, "qsgd")
  if norm not in ("l2", "linf"):
    raise ValueError(f"qsgd's norm must be 'l2' or 'linf', got {norm!r}.")
  if bucket_size is not None and int(bucket_size) < 1:
    raise ValueError(f"qsgd's bucket_size must be >= 1 or None, got {bucket_size}.")
  levels = 2 ** (bits - 1) - 1

  def compress(x, key):
    flat = x.reshape(-1)
    b, count = _buckets(flat, bucket_size)
    r = (jnp.linalg.norm(b, axis=1) if norm == "l2" else jnp.max(jnp.abs(b), axis=1))[:, None]
    scaled = jnp.where(r > 0, jnp.abs(b) / jnp.where(r > 0, r, 1.0), 0.0) * levels
    low = jnp.floor(scaled)
    up = jax.random.uniform(key, b.shape) < (scaled - low)
    q = r * jnp.sign(b) * (low + up) / levels
    out = q.reshape(-1)[:flat.size].reshape(x.shape)
    return out, jnp.int32(bits * flat.size + FLOAT_BITS * count)

  def max_bits(d):
    size = d if bucket_size is None else min(int(bucket_size), d)
    return bits * d + FLOAT_BITS * -(-d // max(size, 1))

  return Compressor(compress, max_bits, f"qsgd{bits}", unbiased=True)


def hadamard(x: jax.Array) -> jax.Array:
  """``H x / sqrt(n)`` along the last axis (``n`` a power of 2): the fast Walsh-Hadamard
  transform, Sylvester order (``scipy.linalg.hadamard``); its own inverse."""
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"hadamard needs a power-of-2 length, got {n}.")
  y, h = x, 1
  while h < n:
    y = y.reshape(x.shape[:-1] + (n // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2).reshape(x.shape)
    h *= 2
  return y / jnp.sqrt(jnp.float32(n))


def _pow2(d):
  return 1 << (int(d) - 1).bit_length()


def rotated(bits: int = 4) -> Compressor:
  """Suresh et al.'s ``pi_srk``: rotate ``y = H D x`` (``D`` random signs from the key,
  ``x`` zero-padded to ``n = 2^m``), quantise each ``y_j`` stochastically to the ``2^bits``
  levels evenly spaced in ``[min y, max y]``, decode ``D H y_hat``. Unbiased;
  ``bits n + 64`` bits (the two ends)."""
  _check_bits(bits, 1, "rotated")
  levels = 2 ** bits

  def compress(x, key):
    flat = x.reshape(-1)
    d, n = flat.size, _pow2(flat.size)
    sign_key, round_key = jax.random.split(key)
    signs = jax.random.rademacher(sign_key, (n,), jnp.float32)
    y = hadamard(signs * jnp.pad(flat, (0, n - d)))
    lo, hi = jnp.min(y), jnp.max(y)
    step = jnp.where(hi > lo, (hi - lo) / (levels - 1), 1.0)
    scaled = (y - lo) / step
    low = jnp.floor(scaled)
    up = jax.random.uniform(round_key, (n,)) < (scaled - low)
    y_hat = jnp.where(hi > lo, lo + (low + up) * step, y)
    out = (signs * hadamard(y_hat))[:d].reshape(x.shape)
    return out, jnp.int32(bits * n + 2 * FLOAT_BITS)

  return Compressor(compress, lambda d: bits * _pow2(d) + 2 * FLOAT_BITS, f"rotated{bits}",
                    unbiased=True)


def huffman_code_lengths(counts: jax.Array) -> jax.Array:
  """Huffman code lengths of symbols with ``counts`` (int ``[S]``); 0 for absent symbols.

  The ``S - 1`` merges of the two lightest groups (ties: lowest index), each adding
  one bit to every symbol of both; a lone symbol gets 1 bit. Traceable.
  """
  counts = jnp.asarray(counts, jnp.int32)
  num = counts.shape[0]
  present = counts > 0
  big = jnp.iinfo(jnp.int32).max

  def merge(_, carry):
    depth, group, weight, active = carry
    live = jnp.sum(active) >= 2
    w = jnp.where(active, weight, big)
    a = jnp.argmin(w)
    b = jnp.argmin(jnp.where(jnp.arange(num) == a, big, w))
    members = (group == a) | (group == b)
    depth = jnp.where(live & members & present, depth + 1, depth)
    group = jnp.where(live & (group == b), a, group)
    weight = jnp.where(live, weight.at[a].add(weight[b]), weight)
    active = jnp.where(live, active.at[b].set(False), active)
    return depth, group, weight, active

  depth, *_ = jax.lax.fori_loop(
      0, max(num - 1, 0), merge,
      (jnp.zeros(num, jnp.int32), jnp.arange(num), counts, present))
  lone = jnp.sum(present) == 1
  return jnp.where(present, jnp.where(lone, 1, depth), 0)


def kmeans_1d(values: jax.Array, mask: jax.Array, clusters: int, iterations: int
              ) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means of the ``values`` where ``mask``: ``(centroids [c], assignment)``.

  Starts from ``clusters`` centroids evenly spaced between the masked min and max; an
  empty cluster keeps its centroid.
  """
  lo = jnp.min(jnp.where(mask, values, jnp.inf))
  hi = jnp.max(jnp.where(mask, values, -jnp.inf))
  lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
  centroids = lo + (hi - lo) * jnp.linspace(0.0, 1.0, clusters)

  def assign(c):
    return jnp.argmin(jnp.abs(values[:, None] - c[None, :]), axis=1)

  def step(_, c):
    onehot = jax.nn.one_hot(assign(c), clusters) * mask[:, None]
    count = jnp.sum(onehot, 0)
    total = jnp.sum(onehot * values[:, None], 0)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), c)

  centroids = jax.lax.fori_loop(0, iterations, step, centroids)
  return centroids, assign(centroids)


def fedzip(fraction: float = 0.1, clusters: int = 3, iterations: int = 10) -> Compressor:
  """FedZip's pipeline on one layer: top-z sparsification, k-means clustering of the kept
  values (3 clusters, the paper's choice), Huffman coding of the cluster ids.

  Bits: the kept positions (``position_bits``), the Huffman-coded ids of the ``k`` kept
  entries, the codebook (``32 c``) and the Huffman table (a code length per cluster,
  ``ceil(log2 c)`` bits each; canonical codes follow from the lengths).
  """
  _check_fraction(fraction, "fedzip")
  if int(clusters) != clusters or clusters < 1:
    raise ValueError(f"fedzip needs clusters >= 1, got {clusters!r}.")
  table = clusters * index_bits(clusters)

  def compress(x, key):
    del key
    flat = x.reshape(-1)
    d = flat.size
    k = _kept(fraction, d)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    kept = flat[idx]
    centroids, ids = kmeans_1d(kept, jnp.ones(k, bool), clusters, iterations)
    out = jnp.zeros_like(flat).at[idx].set(centroids[ids])
    counts = jnp.bincount(ids, length=clusters)
    code = jnp.sum(counts * huffman_code_lengths(counts))
    bits = position_bits(k, d) + code + FLOAT_BITS * clusters + table
    return out.reshape(x.shape), bits.astype(jnp.int32)

  def max_bits(d):
    k = _kept(fraction, d)
    return position_bits(k, d) + k * max(clusters - 1, 1) + FLOAT_BITS * clusters + table

  return Compressor(compress, max_bits, "fedzip")


def compress_tree(compressor: Compressor, tree: PyTree, key: PRNGKey
                  ) -> tuple[PyTree, jax.Array]:
  """Each leaf compressed on its own (layer-wise) with ``fold_in(key, leaf index)``;
  returns the decoded tree and the total bits."""
  leaves, treedef = jax.tree.flatten(tree)
  out, bits = [], jnp.int32(0)
  for i, leaf in enumerate(leaves):
    leaf = jnp.asarray(leaf)
    x_hat, b = compressor.compress(leaf, jax.random.fold_in(key, i))
    out.append(x_hat.astype(leaf.dtype))
    bits = bits + b
  return jax.tree.unflatten(treedef, out), bits


def max_tree_bits(compressor: Compressor, tree: PyTree) -> int:
  return sum(int(compressor.max_bits(int(jnp.size(x)))) for x in jax.tree.leaves(tree))


def float_count(tree: PyTree) -> int:
  """Floating-point entries of ``tree`` (what 32 bits per float counts)."""
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.floating))


# --------------------------------------------------------------------------- the wrapper


class CommState(NamedTuple):
  """The accounting rule's state.

  key: base key of the compressors (the round's key is ``fold_in(key, count)``).
  count: int32, rounds done.
  totals: int32 ``[4, 2]``: (uplink, uplink uncompressed, downlink, downlink
    uncompressed) bits as ``hi 2^16 + lo`` pairs (exact totals).
  last: float32 ``[4]``, the same counts of the last round (its metrics).
  client_rounds: int32, real clients summed over rounds.
  reference: the model the clients hold (downlink compression), or ().
  """
  key: jax.Array
  count: jax.Array
  totals: jax.Array
  last: jax.Array
  client_rounds: jax.Array
  reference: PyTree = ()


def _split(bits):
  bits = jnp.asarray(bits, jnp.int32)
  return jnp.stack([bits >> _LIMB, bits & ((1 << _LIMB) - 1)], axis=-1)


def _normalise(pairs):
  carry = pairs[..., 1] >> _LIMB
  return jnp.stack([pairs[..., 0] + carry, pairs[..., 1] & ((1 << _LIMB) - 1)], axis=-1)


def _value(pairs):
  return pairs[..., 0].astype(jnp.float32) * float(1 << _LIMB) + pairs[..., 1].astype(jnp.float32)


def _round_key(comm: CommState) -> jax.Array:
  return jax.random.fold_in(comm.key, comm.count)


def _downlink_message(downlink: Compressor, params, comm: CommState):
  """``(x_hat + C(x - x_hat), bits)``: what the clients hold after this round's broadcast."""
  diff = jax.tree.map(jnp.subtract, params, comm.reference)
  step, bits = compress_tree(downlink, diff, jax.random.fold_in(_round_key(comm), 0))
  return jax.tree.map(jnp.add, comm.reference, step), bits


def accounting_rule(downlink: Optional[Compressor], seed: int = 0) -> server_rules.ServerRule:
  """Adds the round's bits (``aggregate[COMM_KEY]``) to ``CommState``'s exact totals and,
  with ``downlink``, moves the clients' model ``x_hat`` by the broadcast ``C(x - x_hat)``.
  The pseudo-gradient passes unchanged."""
  def init_fn(params):
    return CommState(jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32),
                     jnp.zeros((4, 2), jnp.int32), jnp.zeros((4,), jnp.float32),
                     jnp.zeros((), jnp.int32),
                     () if downlink is None else jax.tree.map(jnp.asarray, params))

  def update_fn(updates, state, params=None, *, aggregate=None, **extra):
    del extra
    if aggregate is None or COMM_KEY not in aggregate:
      raise ValueError("accounting_rule needs the aggregate of compressed(...)'s aggregator "
                       f"(with {COMM_KEY!r}).")
    round_pairs = aggregate[COMM_KEY]["bits"]
    reference = state.reference
    if downlink is not None:
      reference, _ = _downlink_message(downlink, params, state)
    return updates, CommState(
        state.key, state.count + 1, _normalise(state.totals + round_pairs),
        _value(round_pairs), state.client_rounds + aggregate[COMM_KEY]["clients"], reference)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def comm_state(state: ServerState) -> CommState:
  return server_rules.require_state(state.rule_state, CommState, "compressed(...) accounting")


def _check_int32(bound: int, what: str):
  if bound > _INT32_MAX:
    raise ValueError(f"{what} may take {bound} bits, more than an int32 counts per client "
                     f"({_INT32_MAX}); compress it further or split the model.")


def compressed(method: FederatedAlgorithm, uplink: Compressor, *,
               keys: Sequence[str] = ("delta",), error_feedback: Optional[str] = None,
               downlink: Optional[Compressor] = None, seed: int = 0) -> FederatedAlgorithm:
  """``method`` with its uplink messages (and optionally its broadcast) compressed.

  Args:
    method: any federated algorithm (its hooks see their own client state).
    uplink: the compressor of the message entries ``keys``.
    keys: message entries compressed (each leaf on its own); the others are sent as
      they are (32 bits per float). SCAFFOLD: ``('delta', 'control_delta')``.
    error_feedback: None, ``'ef'`` or ``'ef21'`` (module docstring); the residual
      (EF) or ``g_i`` (EF21) of every compressed entry is the client state's ``'ef'``.
    downlink: compressor of the broadcast model (None: sent as it is).
    seed: base key of the compressors' randomness (shared by clients and server).

  Apply it after ``byzantine.with_attack`` (as ``launch.common.build`` does): tagging
  a compressed method again rebuilds its client state without ``'ef'``.

  Returns:
    A ``byzantine.TaggedAlgorithm`` (the client id keys each client's randomness);
    ``report(state)`` gives the bit totals, ``round_metrics`` adds ``uplink_bits``,
    ``downlink_bits`` and their uncompressed counts per round.
  """
  keys = tuple(keys)
  if not keys:
    raise ValueError("compressed needs at least one message key to compress.")
  if error_feedback not in (None,) + EF_KINDS:
    raise ValueError(f"error_feedback must be None or one of {EF_KINDS}, got {error_feedback!r}.")
  if error_feedback and uplink.vote:
    raise ValueError("sign(vote=True) sends signs the server votes on; error feedback needs "
                     "a compressor whose output is the message's estimate (use sign()).")
  tagged = byzantine.with_client_tags(method)
  inner_init = tagged.init_client_state
  inner_broadcast, inner_final = tagged.broadcast, tagged.client_final
  inner_extra, inner_oracle = tagged.client_extra_args, tagged.init_oracle_state
  inner_metrics, inner_agg = tagged.round_metrics, tagged.aggregator

  def own(client_state):
    return {k: v for k, v in client_state.items() if k != "ef"}

  def init_client_state(params):
    state = inner_init(params)
    if error_feedback:
      state = {**state, "ef": {k: jax.tree.map(jnp.zeros_like, params) for k in keys}}
    return state

  def broadcast(state):
    comm = comm_state(state)
    down = dict(inner_broadcast(state))
    bits = jnp.int32(FLOAT_BITS * float_count({k: v for k, v in down.items() if k != "params"}))
    if downlink is None:
      bits = bits + FLOAT_BITS * float_count(down["params"])
    else:
      _check_int32(max_tree_bits(downlink, down["params"]), "The broadcast")
      down["params"], params_bits = _downlink_message(downlink, down["params"], comm)
      bits = bits + params_bits
    return {**down, KEY_KEY: _round_key(comm), DOWN_BITS_KEY: bits}

  def client_extra_args(message_down, client_state):
    return inner_extra(message_down, own(client_state))

  def init_oracle_state(message_down, client_state):
    return inner_oracle(message_down, own(client_state))

  def client_final(local, message_down, client_state):
    message_up, new_state = inner_final(local, message_down, own(client_state))
    if not isinstance(message_up, dict) or any(k not in message_up for k in keys):
      raise ValueError(f"compressed(keys={keys}) needs dict messages with those entries; the "
                       f"method sends {jax.tree.structure(message_up)}.")
    client_id = client_state["tags"]["client_id"]
    key = jax.random.fold_in(jax.random.fold_in(message_down[KEY_KEY], 1), client_id)
    sent = dict(message_up)
    # Entries not compressed go as they are.
    bound = FLOAT_BITS * float_count({k: v for k, v in message_up.items() if k not in keys})
    bits = jnp.int32(bound)
    ef_new = {}
    trained = local.num_steps > 0
    for j, k in enumerate(keys):
      m = message_up[k]
      bound += max_tree_bits(uplink, m)
      kkey = jax.random.fold_in(key, j)
      if error_feedback == "ef":
        e = client_state["ef"][k]
        p = jax.tree.map(jnp.add, m, e)
        c, b = compress_tree(uplink, p, kkey)
        sent[k] = c
        ef_new[k] = jax.tree.map(jnp.subtract, p, c)
      elif error_feedback == "ef21":
        g = client_state["ef"][k]
        c, b = compress_tree(uplink, jax.tree.map(jnp.subtract, m, g), kkey)
        sent[k] = ef_new[k] = jax.tree.map(jnp.add, g, c)
      else:
        sent[k], b = compress_tree(uplink, m, kkey)
      bits = bits + b
    _check_int32(bound, "A client's message")
    _check_int32(FLOAT_BITS * float_count(message_up), "A client's uncompressed message")
    if error_feedback:
      # A client that did not train (padding) keeps its residual.
      ef_new = jax.tree.map(lambda n, o: jnp.where(trained, n, o), ef_new, client_state["ef"])
      new_state = {**new_state, "ef": ef_new}
    down_dense = FLOAT_BITS * float_count(
        {k: v for k, v in message_down.items() if k not in (KEY_KEY, DOWN_BITS_KEY)})
    sent[COMM_KEY] = jnp.stack([bits, jnp.int32(FLOAT_BITS * float_count(message_up)),
                                message_down[DOWN_BITS_KEY], jnp.int32(down_dense)])
    return sent, new_state

  def update(messages, weights, agg_state, collectives=None):
    if not isinstance(messages, dict) or COMM_KEY not in messages:
      raise ValueError("The compressed aggregator needs the messages of compressed(...).")
    messages = dict(messages)
    tag = messages.pop(COMM_KEY)
    valid = weights > 0
    total = as_collectives(collectives).sum
    pairs = total(jnp.sum(jnp.where(valid[:, None, None], _split(tag), 0), axis=0))
    clients = total(jnp.sum(valid.astype(jnp.int32)))
    aggregate, agg_state = inner_agg.update(messages, weights, agg_state, collectives)
    aggregate = dict(aggregate)
    if uplink.vote:
      for k in keys:
        aggregate[k] = jax.tree.map(jnp.sign, aggregate[k])
    aggregate[COMM_KEY] = {"bits": _normalise(pairs), "clients": clients}
    return aggregate, agg_state

  def round_metrics(state):
    last = comm_state(state).last
    metrics = {} if inner_metrics is None else dict(inner_metrics(state))
    metrics.update({"uplink_bits": last[0], "uplink_bits_uncompressed": last[1],
                    "downlink_bits": last[2], "downlink_bits_uncompressed": last[3]})
    return metrics

  return dataclasses.replace(
      tagged, init_client_state=init_client_state, broadcast=broadcast,
      client_extra_args=client_extra_args,
      init_oracle_state=None if inner_oracle is None else init_oracle_state,
      client_final=client_final, aggregator=Aggregator(inner_agg.init, update),
      server_rule=server_rules.chain(tagged.server_rule, accounting_rule(downlink, seed)),
      round_metrics=round_metrics)


def report(state: ServerState) -> dict:
  """Exact totals of a compressed run (Python ints): ``uplink_bits``, ``downlink_bits``,
  the same ``_uncompressed`` (32 bits per float), ``client_rounds``,
  ``uplink_bytes_per_client_round`` and ``uplink_compression_ratio``."""
  comm = comm_state(state)
  totals = jax.device_get(comm.totals).astype(object)
  up, up_dense, down, down_dense = (int(hi) * (1 << _LIMB) + int(lo) for hi, lo in totals)
  client_rounds = int(comm.client_rounds)
  return {"uplink_bits": up, "uplink_bits_uncompressed": up_dense,
          "downlink_bits": down, "downlink_bits_uncompressed": down_dense,
          "client_rounds": client_rounds,
          "uplink_bytes_per_client_round": up / 8 / max(client_rounds, 1),
          "uplink_compression_ratio": up_dense / up if up else None,
          "downlink_compression_ratio": down_dense / down if down else None}
