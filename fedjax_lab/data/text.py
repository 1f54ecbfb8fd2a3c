"""Text tasks: vocabularies, next-token sequences, padding and masking.

Token ids follow FedJAX's Shakespeare and Stack Overflow tasks: ``PAD = 0``,
``BOS = 1``, ``EOS = 2``, vocabulary tokens from ``3``, and one out-of-vocabulary
id last. A target equal to ``PAD`` is padding: ``token_mask(y)`` is False there and
losses and accuracies skip it.

Two next-token layouts:

* ``char_sequences`` (Shakespeare): a client's snippets are joined as
  ``BOS s1 EOS BOS s2 EOS ...`` and cut into rows of ``sequence_length``; the
  target row is the input row shifted by one token. Only the last row is padded.
* ``word_sequences`` (Stack Overflow): one row per text, ``BOS w1 .. wn`` as input
  and ``w1 .. wn EOS`` as target, truncated or padded to ``max_length``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np

from fedjax_lab.data.federated import FederatedData

PAD, BOS, EOS = 0, 1, 2
NUM_RESERVED = 3
LEVELS = ("char", "word")


def as_str(text) -> str:
  """``str`` from str, bytes or a numpy string scalar (UTF-8, bad bytes replaced)."""
  if isinstance(text, (bytes, np.bytes_)):
    return bytes(text).decode("utf-8", errors="replace")
  if isinstance(text, (str, np.str_)):
    return str(text)
  raise ValueError(f"text must be str or bytes, got {type(text).__name__}: {text!r:.80}")


def split_tokens(text, level: str) -> list[str]:
  """Characters of ``text`` (``'char'``) or its whitespace-separated words (``'word'``)."""
  text = as_str(text)
  if level == "char":
    return list(text)
  if level == "word":
    return text.split()
  raise ValueError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Token <-> id map with reserved ``PAD, BOS, EOS`` and a final OOV id.

  Attributes:
    tokens: in-vocabulary tokens; ``tokens[i]`` has id ``NUM_RESERVED + i``.
    level: ``'char'`` or ``'word'``: how ``encode`` splits a text.
  """
  tokens: tuple[str, ...]
  level: str = "char"

  def __post_init__(self):
    if self.level not in LEVELS:
      raise ValueError(f"unknown level {self.level!r}; choose one of {', '.join(LEVELS)}")
    tokens = tuple(self.tokens)
    if len(set(tokens)) != len(tokens):
      raise ValueError("vocabulary tokens must be distinct")
    object.__setattr__(self, "tokens", tokens)
    object.__setattr__(self, "_index", {t: NUM_RESERVED + i for i, t in enumerate(tokens)})

  @property
  def oov(self) -> int:
    """The id of every token not in ``tokens``."""
    return NUM_RESERVED + len(self.tokens)

  @property
  def size(self) -> int:
    """Number of ids (reserved + tokens + OOV): the model's output width."""
    return self.oov + 1

  def encode(self, text, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """int32 ids of ``text``'s tokens, optionally wrapped in BOS / EOS."""
    ids = [self._index.get(t, self.oov) for t in split_tokens(text, self.level)]
    return np.array(([BOS] if add_bos else []) + ids + ([EOS] if add_eos else []), np.int32)

  def decode(self, ids) -> str:
    """Text of ``ids``: PAD/BOS/EOS dropped, OOV written ``<unk>``."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if NUM_RESERVED <= i < self.oov:
        out.append(self.tokens[i - NUM_RESERVED])
      elif i == self.oov:
        out.append("<unk>")
    return ("" if self.level == "char" else " ").join(out)


def build_vocabulary(texts: Iterable, level: str = "char", max_size: int | None = None,
                     min_count: int = 1) -> Vocabulary:
  """Vocabulary of the most frequent tokens (ties broken by the token itself).

  Args:
    texts: iterable of str/bytes.
    level: ``'char'`` or ``'word'``.
    max_size: keep at most this many tokens (None: all).
    min_count: drop tokens seen fewer times.
  """
  if max_size is not None and max_size < 1:
    raise ValueError(f"max_size must be >= 1 or None, got {max_size}")
  counts = collections.Counter()
  for text in texts:
    counts.update(split_tokens(text, level))
  ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
  if not ranked:
    raise ValueError("no tokens to build a vocabulary from (empty texts, or min_count too high)")
  return Vocabulary(tuple(ranked[:max_size]), level)


def char_sequences(texts: Sequence, vocab: Vocabulary, sequence_length: int) -> dict[str, np.ndarray]:
  """One client's snippets as next-token rows (FedJAX's Shakespeare layout).

  With ``sequence_length = 3``, ``['ab', 'c']`` joins to ``BOS a b EOS BOS c EOS``
  and gives ``x = [[BOS, a, b], [EOS, BOS, c]]``, ``y = [[a, b, EOS], [BOS, c, EOS]]``.

  Returns:
    ``{'x': int32 [M, L], 'y': int32 [M, L]}``, ``M = ceil((T - 1) / L)`` for a
    joined length ``T``; the tail of the last row is ``PAD`` in both.
  """
  if sequence_length < 1:
    raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
  if len(texts) == 0:
    empty = np.zeros((0, sequence_length), np.int32)
    return {"x": empty, "y": empty.copy()}
  joined = np.concatenate([vocab.encode(t, add_bos=True, add_eos=True) for t in texts])
  n = joined.shape[0] - 1
  rows = -(-n // sequence_length)
  x = np.full(rows * sequence_length, PAD, np.int32)
  y = np.full(rows * sequence_length, PAD, np.int32)
  x[:n], y[:n] = joined[:-1], joined[1:]
  return {"x": x.reshape(rows, sequence_length), "y": y.reshape(rows, sequence_length)}


def word_sequences(texts: Sequence, vocab: Vocabulary, max_length: int) -> dict[str, np.ndarray]:
  """One row per text: ``x = BOS w1..wn``, ``y = w1..wn EOS``, cut/padded to ``max_length``.

  Returns:
    ``{'x': int32 [N, L], 'y': int32 [N, L]}`` (Stack Overflow's layout in FedJAX).
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  x = np.full((len(texts), max_length), PAD, np.int32)
  y = np.full((len(texts), max_length), PAD, np.int32)
  for i, text in enumerate(texts):
    ids = vocab.encode(text, add_bos=True, add_eos=True)
    m = min(ids.shape[0] - 1, max_length)
    x[i, :m], y[i, :m] = ids[:m], ids[1:m + 1]
  return {"x": x, "y": y}


def pad_ids(texts: Sequence, vocab: Vocabulary, max_length: int) -> np.ndarray:
  """int32 ``[N, max_length]`` token ids of each text, truncated or ``PAD``-padded (for classifiers)."""
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  out = np.full((len(texts), max_length), PAD, np.int32)
  for i, text in enumerate(texts):
    ids = vocab.encode(text)[:max_length]
    out[i, :ids.shape[0]] = ids
  return out


def token_mask(y, pad_id: int = PAD):
  """True where ``y`` is a real target (works on numpy and jax arrays)."""
  return y != pad_id


def federated_text(client_texts: Mapping | Sequence, vocab: Vocabulary, sequence_length: int,
                   layout: str | None = None) -> tuple[FederatedData, list]:
  """Packs per-client texts as a next-token FederatedData.

  Args:
    client_texts: ``{client name: [texts]}`` or a list of text lists.
    vocab: the vocabulary (build it on the training clients only).
    sequence_length: row length ``L``.
    layout: ``'char'`` (``char_sequences``) or ``'word'`` (``word_sequences``);
      default ``vocab.level``.

  Returns:
    ``(data, names)``: data with ``x, y`` int32 ``[rows, L]``, one client per entry
    in input order; names are the dict keys (or ``0..K-1``).
  """
  layout = layout or vocab.level
  if layout not in LEVELS:
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LEVELS)}")
  if isinstance(client_texts, Mapping):
    names, lists = list(client_texts.keys()), list(client_texts.values())
  else:
    names, lists = list(range(len(client_texts))), list(client_texts)
  if not lists:
    raise ValueError("no clients: client_texts is empty")
  to_rows = char_sequences if layout == "char" else word_sequences
  parts = [to_rows(texts, vocab, sequence_length) for texts in lists]
  empty = [names[i] for i, p in enumerate(parts) if p["x"].shape[0] == 0]
  if empty:
    raise ValueError(f"clients with zero examples: {empty[:10]}")
  sizes = np.array([p["x"].shape[0] for p in parts], np.int64)
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in ("x", "y")}
  return FederatedData(arrays, np.concatenate([[0], np.cumsum(sizes)])), names
