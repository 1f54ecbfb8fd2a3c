"""Reader for LEAF's json files (FEMNIST, Shakespeare, Sent140).

Caldas et al. "LEAF: A Benchmark for Federated Settings", 2018. LEAF's
preprocessing writes ``data/<dataset>/data/{train,test}/*.json``, each file

    {"users": [u, ...], "num_samples": [n_u, ...],
     "user_data": {u: {"x": [...], "y": [...]}, ...}}

with, per dataset,

* FEMNIST: ``x`` 784 floats in [0, 1] (a 28x28 image, 1 = background), ``y`` a
  class in [0, 62);
* Shakespeare: ``x`` an 80-character string, ``y`` the character after it;
* Sent140: ``x`` the raw tweet record whose entry 4 is the text, ``y`` 0/1.

A path may be one json file or a folder of them (all ``*.json``, sorted).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Mapping, Sequence

import numpy as np

from fedjax_lab.data import text as text_lib

TASKS = ("femnist", "shakespeare", "sent140")
FEMNIST_CLASSES = 62
SENT140_CLASSES = 2
SENT140_TEXT_FIELD = 4


def _files(path: str) -> list[str]:
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.json")))
    if not files:
      raise FileNotFoundError(f"no LEAF *.json files in folder {path!r}")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LEAF json path not found: {path!r}")
  return [path]


def read_leaf(path: str) -> tuple[list[str], list[dict[str, list]]]:
  """``(user names, [{'x': [...], 'y': [...]}, ...])`` over all files of ``path``.

  Raises:
    FileNotFoundError: no such file / no json files in the folder.
    ValueError: wrong schema, a user missing from ``user_data``, ``x``/``y``/
      ``num_samples`` lengths that disagree, a user with zero examples, or a user
      listed in two files.
  """
  names, clients, origin = [], [], {}
  for file in _files(path):
    try:
      with open(file) as f:
        content = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file!r} is not valid json: {e}") from e
    if not isinstance(content, dict) or "users" not in content or "user_data" not in content:
      keys = sorted(content) if isinstance(content, dict) else type(content).__name__
      raise ValueError(f"{file!r} is not a LEAF file: expected keys 'users', 'num_samples', "
                       f"'user_data', found {keys}")
    users, user_data = content["users"], content["user_data"]
    counts = content.get("num_samples")
    if counts is not None and len(counts) != len(users):
      raise ValueError(f"{file!r}: {len(users)} users but {len(counts)} num_samples")
    for i, user in enumerate(users):
      if user in origin:
        raise ValueError(f"user {user!r} appears in both {origin[user]!r} and {file!r}")
      if user not in user_data:
        raise ValueError(f"{file!r}: user {user!r} is listed but has no user_data")
      record = user_data[user]
      if not isinstance(record, dict) or "x" not in record or "y" not in record:
        raise ValueError(f"{file!r}: user_data[{user!r}] must have 'x' and 'y'")
      x, y = record["x"], record["y"]
      if len(x) != len(y):
        raise ValueError(f"{file!r}: user {user!r} has {len(x)} x but {len(y)} y")
      if len(x) == 0:
        raise ValueError(f"{file!r}: user {user!r} has zero examples")
      if counts is not None and counts[i] != len(x):
        raise ValueError(f"{file!r}: user {user!r} declares {counts[i]} samples but has {len(x)}")
      origin[user] = file
      names.append(str(user))
      clients.append({"x": x, "y": y})
  if not clients:
    raise ValueError(f"{path!r} holds no users")
  return names, clients


def detect_task(client: Mapping[str, list]) -> str:
  """``'femnist'``, ``'shakespeare'`` or ``'sent140'`` from the first example's shape."""
  x0, y0 = client["x"][0], client["y"][0]
  if isinstance(x0, str) and isinstance(y0, str):
    return "shakespeare"
  if isinstance(x0, list) and len(x0) == 28 * 28 and all(isinstance(v, (int, float)) for v in x0[:8]):
    return "femnist"
  if isinstance(x0, list) and len(x0) > SENT140_TEXT_FIELD and isinstance(x0[SENT140_TEXT_FIELD], str):
    return "sent140"
  raise ValueError(f"unrecognised LEAF examples (x={str(x0)[:60]!r}, y={y0!r}); known: FEMNIST "
                   f"(784 floats, int), Shakespeare (str, char), Sent140 (tweet record, 0/1)")


def _labels(name: str, y, num_classes: int) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.number):
    raise ValueError(f"user {name!r}: labels must be numbers, got {y[:3]!r}")
  if y.min() < 0 or y.max() >= num_classes or np.any(y != np.round(y)):
    raise ValueError(f"user {name!r}: labels out of range [0, {num_classes}): "
                     f"min {y.min()}, max {y.max()}")
  return y.astype(np.int32)


def task_vocabulary(task: str, clients: Sequence[Mapping[str, list]],
                    vocab_size: int = 10000) -> text_lib.Vocabulary | None:
  """Characters of Shakespeare, or Sent140's ``vocab_size`` most frequent words; None for FEMNIST."""
  if task == "femnist":
    return None
  if task == "shakespeare":
    return text_lib.build_vocabulary((s for c in clients for s in c["x"] + c["y"]), "char")
  return text_lib.build_vocabulary(
      (x[SENT140_TEXT_FIELD] for c in clients for x in c["x"]), "word", max_size=vocab_size)


def task_arrays(task: str, name: str, client: Mapping[str, list],
                vocab: text_lib.Vocabulary | None = None, sequence_length: int | None = None,
                invert: bool = True) -> dict[str, np.ndarray]:
  """Model-ready arrays of one user.

  * femnist: ``x`` float32 ``[n, 28, 28, 1]`` (``1 - x`` with ``invert``: ink 1,
    background 0), ``y`` int32;
  * shakespeare: ``x`` the string's ids ``[n, 80]``, ``y`` the ids of the string
    shifted by one character with LEAF's target appended (a next-token target at
    every position, the last one being LEAF's label);
  * sent140: ``x`` word ids ``[n, L]`` padded with PAD (default L = 25), ``y`` 0/1.
  """
  if task == "femnist":
    lengths = sorted({len(v) if isinstance(v, list) else -1 for v in client["x"]})
    if lengths != [28 * 28]:
      raise ValueError(f"user {name!r}: FEMNIST x must be 784 floats per example, got lengths "
                       f"{lengths[:5]}")
    x = np.asarray(client["x"], dtype=np.float32)
    x = (1.0 - x) if invert else x
    return {"x": x.reshape(-1, 28, 28, 1), "y": _labels(name, client["y"], FEMNIST_CLASSES)}
  if vocab is None:
    raise ValueError(f"task {task!r} needs a vocabulary (see task_vocabulary)")
  if task == "shakespeare":
    lengths = {len(s) for s in client["x"]}
    if len(lengths) != 1 or any(len(c) != 1 for c in client["y"]):
      raise ValueError(f"user {name!r}: Shakespeare x must be strings of one length and y single "
                       f"characters; x lengths {sorted(lengths)[:5]}")
    x = np.stack([vocab.encode(s) for s in client["x"]])
    y = np.stack([vocab.encode(s[1:] + t) for s, t in zip(client["x"], client["y"])])
    return {"x": x, "y": y}
  if task == "sent140":
    texts = [record[SENT140_TEXT_FIELD] for record in client["x"]]
    return {"x": text_lib.pad_ids(texts, vocab, sequence_length or 25),
            "y": _labels(name, client["y"], SENT140_CLASSES)}
  raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def load_leaf(path: str, vocab: text_lib.Vocabulary | None = None,
              sequence_length: int | None = None, vocab_size: int = 10000, invert: bool = True):
  """Reads LEAF json into packed arrays plus natural client ids.

  Returns:
    ``(arrays, client_ids, names, task, vocab)`` as ``sqlite_source.load_sqlite``;
    pass the training vocabulary when reading the test folder.
  """
  names, clients = read_leaf(path)
  task = detect_task(clients[0])
  if vocab is None:
    vocab = task_vocabulary(task, clients, vocab_size)
  parts = [task_arrays(task, n, c, vocab, sequence_length, invert) for n, c in zip(names, clients)]
  shapes = {k: {p[k].shape[1:] for p in parts} for k in parts[0]}
  for k, s in shapes.items():
    if len(s) != 1:
      raise ValueError(f"{path!r}: feature {k!r} has mismatched shapes across users: {sorted(s)}")
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  ids = np.repeat(np.arange(len(parts)), [p["y"].shape[0] for p in parts]).astype(np.int64)
  return arrays, ids, names, task, vocab
