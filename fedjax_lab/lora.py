"""Parameter-efficient fine-tuning as transforms on parameter trees: LoRA and frozen subsets.

LoRA (Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR 2022, eq. 3): a selected weight ``W0 [in, out]`` (flax's
``x @ W`` layout) becomes

    W = W0 + (alpha / r) A B,    A [in, r] ~ N(0, 1/in),  B [r, out] = 0,

so the adapted model starts exactly at the base; only ``A, B`` are trained and sent.
(The paper writes ``W0 x + B A x`` for ``W0 [out, in]``: the same product, transposed.)

Prompt tuning and any other "train these leaves only" scheme is ``subset``: the trainable
tree is the selected leaves, the rest of the base is a constant.

Both give a ``models.Model`` whose params are the trainable tree only and whose ``apply``
merges the frozen base (held as a constant), so every federated method fine-tunes it
unchanged and its messages are the trainable tree (``tree_bytes``). Parameter trees are
nested dicts (flax variables); a path is the tuple of keys.
"""
from typing import Callable

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.models import Model
from fedjax_lab.types import Params, PyTree

Select = Callable[[tuple, jax.Array], bool]   # (path, leaf) -> adapt / train this leaf


def kernels(path: tuple, leaf) -> bool:
  """LoRA's default selection: every 2-D ``kernel`` (dense weights; not embeddings)."""
  return path[-1] == "kernel" and jnp.ndim(leaf) == 2


def named(*names: str) -> Select:
  """Selects the leaves whose path contains one of ``names`` (e.g. ``named('prompt')``)."""
  return lambda path, leaf: any(n in path for n in names)


def _flat(tree: Params) -> dict:
  if not isinstance(tree, dict):
    raise ValueError(f"parameters must be nested dicts (flax variables), got {type(tree).__name__}")
  return traverse_util.flatten_dict(tree)


def selected_paths(base: Params, select: Select) -> list:
  paths = [p for p, leaf in _flat(base).items() if select(p, leaf)]
  if not paths:
    raise ValueError("the selection matches no parameter of the base model")
  return paths


def init(base: Params, rank: int, rng: jax.Array, select: Select = kernels) -> Params:
  """LoRA adapters ``{path..., 'lora_a': A, 'lora_b': B}`` for the selected 2-D leaves."""
  if int(rank) < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  flat = _flat(base)
  out = {}
  for i, path in enumerate(selected_paths(base, select)):
    w = flat[path]
    if jnp.ndim(w) != 2:
      raise ValueError(f"LoRA adapts 2-D weights; {'/'.join(map(str, path))} has shape {jnp.shape(w)}")
    fan_in, fan_out = w.shape
    a = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, rank), w.dtype) / np.sqrt(fan_in)
    out[path + ("lora_a",)] = a
    out[path + ("lora_b",)] = jnp.zeros((rank, fan_out), w.dtype)
  return traverse_util.unflatten_dict(out)


def merge(base: Params, adapters: Params, alpha) -> Params:
  """``W0 + (alpha / r) A B`` at every adapted leaf; the other leaves of ``base`` as they are."""
  flat = dict(_flat(base))
  pairs = _flat(adapters)
  for key in pairs:
    if key[-1] != "lora_a":
      continue
    path = key[:-1]
    if path not in flat:
      raise ValueError(f"adapter for {'/'.join(map(str, path))}, which the base does not have")
    a, b = pairs[key], pairs[path + ("lora_b",)]
    flat[path] = flat[path] + (alpha / a.shape[-1]) * (a @ b)
  return traverse_util.unflatten_dict(flat)


def take(base: Params, select: Select) -> Params:
  """The selected leaves of ``base`` as a nested dict (a subset's trainable tree)."""
  flat = _flat(base)
  return traverse_util.unflatten_dict({p: flat[p] for p in selected_paths(base, select)})


def put(base: Params, part: Params) -> Params:
  """``base`` with the leaves of ``part`` replaced."""
  flat = dict(_flat(base))
  for path, leaf in _flat(part).items():
    if path not in flat:
      raise ValueError(f"{'/'.join(map(str, path))} is not a parameter of the base model")
    flat[path] = leaf
  return traverse_util.unflatten_dict(flat)


def lora_model(model: Model, base: Params, rank: int, alpha=None, select: Select = kernels) -> Model:
  """``model`` fine-tuned through LoRA adapters on the frozen ``base``.

  ``init(rng, x)`` gives the adapters (``x`` unused); ``apply(adapters, x)`` runs
  ``model`` on ``merge(base, adapters, alpha)``. ``alpha`` defaults to ``rank``
  (scale 1), the common choice when only ``rank`` is tuned.
  """
  alpha = rank if alpha is None else alpha
  def apply(adapters, x):
    return model.apply(merge(base, adapters, alpha), x)
  return Model(init=lambda rng, x: init(base, rank, rng, select), apply=apply)


def subset_model(model: Model, base: Params, select: Select) -> Model:
  """``model`` with only the selected leaves of ``base`` trainable (prompt tuning: ``named('prompt')``)."""
  take(base, select)   # fails early on an empty selection
  return Model(init=lambda rng, x: take(base, select),
               apply=lambda part, x: model.apply(put(base, part), x))


def tree_bytes(tree: PyTree) -> int:
  """Bytes of every leaf of ``tree`` (what a client uploads when it sends ``tree``)."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) * jnp.result_type(x).itemsize
                 for x in jax.tree.leaves(tree)))
