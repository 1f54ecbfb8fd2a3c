"""Reader (and a small writer) for the SQLite federated files of FedJAX and TFF.

Two layouts are read, detected from the tables:

* FedJAX (``federated_emnist_train.sqlite``, ``shakespeare_train.sqlite``,
  ``stackoverflow_train.sqlite``, ...): one table
  ``federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)``;
  ``data`` is a zlib-compressed msgpack map ``feature name -> array [n, ...]`` in
  which numeric arrays are msgpack extension 1 (``(shape, dtype name, C-order
  bytes)``) and bytes arrays extension 4 (``(shape, flat list of bytes)``).
* TFF (``emnist_all.sqlite``, ``shakespeare.sqlite``, ``stackoverflow.sqlite``):
  ``examples(split_name, client_id, serialized_example_proto)`` with one
  ``tf.train.Example`` per row, and ``client_metadata(client_id, split_name,
  num_examples)``. A file holds several splits (``split=``). The protos are parsed
  with the protobuf classes shipped in ``tensorflow_datasets``; TensorFlow is not
  needed.

``SQLiteClients`` reads one client at a time (``client(i)``), which is what
host-side streaming needs; ``task_arrays`` turns the raw features of EMNIST,
Shakespeare and Stack Overflow into model-ready ``x, y`` arrays.
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from typing import Mapping, Sequence

import numpy as np

from fedjax_lab.data import text as text_lib

FORMATS = ("fedjax", "tff")
EMNIST_CLASSES = 62

# msgpack extension codes of FedJAX's serialization.
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR, _EXT_BYTES_NDARRAY = 1, 2, 3, 4


# ------------------------------------------------------------------ FedJAX blobs


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
  import msgpack
  shape, dtype, buffer = msgpack.unpackb(data, raw=True)
  return np.frombuffer(buffer, dtype=np.dtype(dtype.decode())).reshape(shape).copy()


def _ext_hook(code, data):
  import msgpack
  if code == _EXT_NDARRAY:
    return _ndarray_from_bytes(data)
  if code == _EXT_SCALAR:
    return _ndarray_from_bytes(data)[()]
  if code == _EXT_BYTES_NDARRAY:
    shape, flat = msgpack.unpackb(data, raw=True)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)
  if code == _EXT_COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  return msgpack.ExtType(code, data)


def decode_fedjax_blob(blob: bytes) -> dict[str, np.ndarray]:
  """``feature name -> array`` from one ``federated_data.data`` value."""
  import msgpack
  examples = msgpack.unpackb(zlib.decompress(blob), ext_hook=_ext_hook, raw=False)
  if not isinstance(examples, dict):
    raise ValueError(f"a FedJAX client blob must hold a map of features, got {type(examples).__name__}")
  return {k: np.asarray(v) for k, v in examples.items()}


def _ext_pack(x):
  import msgpack
  if isinstance(x, np.ndarray) and x.dtype.kind in "OS":
    flat = [bytes(v) if not isinstance(v, str) else v.encode() for v in x.reshape(-1)]
    return msgpack.ExtType(_EXT_BYTES_NDARRAY, msgpack.packb((x.shape, flat), use_bin_type=True))
  if isinstance(x, np.ndarray):
    payload = (x.shape, x.dtype.name, np.ascontiguousarray(x).tobytes())
    return msgpack.ExtType(_EXT_NDARRAY, msgpack.packb(payload, use_bin_type=True))
  raise TypeError(f"cannot serialize {type(x).__name__}")


def encode_fedjax_blob(examples: Mapping[str, np.ndarray]) -> bytes:
  """Inverse of ``decode_fedjax_blob``."""
  import msgpack
  arrays = {k: np.asarray(v) for k, v in examples.items()}
  return zlib.compress(msgpack.packb(arrays, default=_ext_pack, strict_types=True))


# ------------------------------------------------------------------ TFF protos


def _parse_tf_example(serialized: bytes) -> dict[str, np.ndarray]:
  from tensorflow_datasets.proto import tf_example_pb2  # lazy: protobuf classes only
  example = tf_example_pb2.Example.FromString(serialized)
  out = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    if kind is None:
      continue
    values = getattr(feature, kind).value
    if kind == "bytes_list":
      arr = np.empty(len(values), dtype=object)
      arr[:] = list(values)
    else:
      arr = np.array(values, dtype=np.float32 if kind == "float_list" else np.int64)
    out[name] = arr[0] if arr.shape[0] == 1 else arr  # one value: a scalar feature
  return out


def _tf_example(features: Mapping[str, np.ndarray]) -> bytes:
  from tensorflow_datasets.proto import tf_example_pb2
  example = tf_example_pb2.Example()
  for name, value in features.items():
    value = np.asarray(value)
    feature = example.features.feature[name]
    if value.dtype.kind in "OSU":
      feature.bytes_list.value.extend(
          v.encode() if isinstance(v, str) else bytes(v) for v in value.reshape(-1))
    elif value.dtype.kind == "f":
      feature.float_list.value.extend(value.reshape(-1).tolist())
    else:
      feature.int64_list.value.extend(value.reshape(-1).astype(np.int64).tolist())
  return example.SerializeToString()


def _stack(client: str, rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks per-example features into ``[n, ...]`` arrays; shapes must agree."""
  names = set(rows[0])
  out = {}
  for name in sorted(names):
    values = []
    for i, row in enumerate(rows):
      if set(row) != names:
        raise ValueError(f"client {client!r}: example {i} has features {sorted(row)}, "
                         f"example 0 has {sorted(names)}")
      values.append(row[name])
    if isinstance(values[0], np.ndarray) and values[0].dtype != object:
      shapes = {np.shape(v) for v in values}
      if len(shapes) != 1:
        raise ValueError(f"client {client!r}: feature {name!r} has mismatched shapes {sorted(shapes)}")
      out[name] = np.stack(values)
    elif isinstance(values[0], (bytes, np.ndarray)):
      arr = np.empty(len(values), dtype=object)
      arr[:] = values
      out[name] = arr
    else:
      out[name] = np.asarray(values)
  return out


# ------------------------------------------------------------------ reader


def _connect(path: str) -> sqlite3.Connection:
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SQLite federated file not found: {path!r}")
  # Read-only: sqlite3.connect would otherwise create an empty file.
  return sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, check_same_thread=False)


def _tables(connection, path: str = "") -> set[str]:
  try:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
  except sqlite3.DatabaseError as e:
    raise ValueError(f"{path!r} is not an SQLite database: {e}") from e
  return {r[0] for r in rows}


def _name(client_id) -> str:
  return client_id.decode("utf-8", errors="replace") if isinstance(client_id, bytes) else str(client_id)


class SQLiteClients:
  """Clients of a FedJAX or TFF SQLite file, read one at a time.

  Attributes:
    path: the file.
    format: ``'fedjax'`` or ``'tff'``.
    split: the TFF split read (None for FedJAX files).
    names: client ids as str, in file order ``[num_clients]``.
    client_sizes: int64 ``[num_clients]`` from the file's ``num_examples``.
  """

  def __init__(self, path: str, split: str | None = None):
    self.path = path
    self._connection = _connect(path)
    tables = _tables(self._connection, path)
    if "federated_data" in tables:
      self.format, self.split = "fedjax", None
      if split is not None:
        raise ValueError(f"{path!r} is a FedJAX file (one split per file); do not pass split={split!r}")
      rows = self._connection.execute(
          "SELECT client_id, num_examples FROM federated_data ORDER BY rowid").fetchall()
    elif {"examples", "client_metadata"} <= tables:
      self.format = "tff"
      splits = [r[0] for r in self._connection.execute(
          "SELECT DISTINCT split_name FROM client_metadata ORDER BY split_name")]
      if split is None:
        if len(splits) != 1:
          raise ValueError(f"{path!r} holds the splits {splits}; choose one with split=")
        split = splits[0]
      if split not in splits:
        raise ValueError(f"unknown split {split!r} in {path!r}; known splits: {', '.join(splits)}")
      self.split = split
      rows = self._connection.execute(
          "SELECT client_id, num_examples FROM client_metadata WHERE split_name = ? ORDER BY rowid",
          (split,)).fetchall()
    else:
      raise ValueError(
          f"{path!r} has tables {sorted(tables)}; expected the FedJAX schema (table "
          f"'federated_data') or the TFF schema (tables 'examples' and 'client_metadata')")
    if not rows:
      raise ValueError(f"{path!r} holds no clients")
    self._ids = [r[0] for r in rows]
    self.names = [_name(r[0]) for r in rows]
    self.client_sizes = np.array([r[1] for r in rows], dtype=np.int64)
    empty = [self.names[i] for i in np.flatnonzero(self.client_sizes <= 0)]
    if empty:
      raise ValueError(f"{path!r}: clients with zero examples: {empty[:10]}")

  @property
  def num_clients(self) -> int:
    return len(self._ids)

  def __len__(self) -> int:
    return self.num_clients

  def client(self, i: int) -> dict[str, np.ndarray]:
    """Raw features of client ``i``: name -> ``[client_sizes[i], ...]``."""
    if not 0 <= i < self.num_clients:
      raise IndexError(f"client {i} out of range [0, {self.num_clients})")
    if self.format == "fedjax":
      (blob,) = self._connection.execute(
          "SELECT data FROM federated_data WHERE client_id = ?", (self._ids[i],)).fetchone()
      examples = decode_fedjax_blob(blob)
    else:
      rows = self._connection.execute(
          "SELECT serialized_example_proto FROM examples WHERE split_name = ? AND client_id = ? "
          "ORDER BY rowid", (self.split, self._ids[i])).fetchall()
      if not rows:
        raise ValueError(f"{self.path!r}: client {self.names[i]!r} has zero examples")
      examples = _stack(self.names[i], [_parse_tf_example(r[0]) for r in rows])
    lengths = {k: v.shape[0] for k, v in examples.items()}
    if set(lengths.values()) != {int(self.client_sizes[i])}:
      raise ValueError(f"{self.path!r}: client {self.names[i]!r} declares "
                       f"{self.client_sizes[i]} examples but its features have {lengths}")
    return examples

  def clients(self):
    """Yields ``(name, raw features)`` for every client in file order."""
    for i in range(self.num_clients):
      yield self.names[i], self.client(i)

  def close(self):
    self._connection.close()


def read_sqlite(path: str, split: str | None = None,
                max_clients: int | None = None) -> tuple[list[str], list[dict[str, np.ndarray]]]:
  """All (or the first ``max_clients``) clients: ``(names, raw features per client)``."""
  source = SQLiteClients(path, split)
  try:
    count = source.num_clients if max_clients is None else min(max_clients, source.num_clients)
    return source.names[:count], [source.client(i) for i in range(count)]
  finally:
    source.close()


# ------------------------------------------------------------------ writers (tests, conversion)


def write_fedjax_sqlite(path: str, clients: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Writes ``{client id: {feature: [n, ...]}}`` in FedJAX's layout (overwrites ``path``)."""
  if os.path.exists(path):
    os.remove(path)
  with sqlite3.connect(path) as connection:
    connection.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
                       "data BLOB NOT NULL, num_examples INTEGER NOT NULL)")
    for client_id, examples in clients.items():
      n = len(next(iter(examples.values())))
      key = client_id.encode() if isinstance(client_id, str) else bytes(client_id)
      connection.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
                         (key, encode_fedjax_blob(examples), n))
  connection.close()


def write_tff_sqlite(path: str, splits: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]) -> None:
  """Writes ``{split: {client id: {feature: [n, ...]}}}`` in TFF's layout (overwrites ``path``)."""
  if os.path.exists(path):
    os.remove(path)
  with sqlite3.connect(path) as connection:
    connection.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                       "serialized_example_proto BLOB NOT NULL)")
    connection.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, "
                       "split_name TEXT NOT NULL, num_examples INTEGER NOT NULL)")
    for split, clients in splits.items():
      for client_id, examples in clients.items():
        n = len(next(iter(examples.values())))
        for j in range(n):
          connection.execute("INSERT INTO examples VALUES (?, ?, ?)",
                             (split, client_id, _tf_example({k: v[j] for k, v in examples.items()})))
        connection.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client_id, split, n))
  connection.close()


# ------------------------------------------------------------------ tasks

TASKS = ("emnist", "shakespeare", "stackoverflow")


def detect_task(features: Sequence[str]) -> str:
  """``'emnist'`` (pixels, label), ``'shakespeare'`` (snippets) or ``'stackoverflow'`` (tokens)."""
  features = set(features)
  if {"pixels", "label"} <= features:
    return "emnist"
  if "snippets" in features:
    return "shakespeare"
  if "tokens" in features:
    return "stackoverflow"
  raise ValueError(f"unrecognised features {sorted(features)}; known: EMNIST (pixels, label), "
                   f"Shakespeare (snippets), Stack Overflow (tokens)")


def _texts(examples: Mapping[str, np.ndarray], feature: str) -> list[str]:
  return [text_lib.as_str(t) for t in np.asarray(examples[feature]).reshape(-1)]


def task_vocabulary(task: str, clients: Sequence[Mapping[str, np.ndarray]],
                    vocab_size: int = 10000) -> text_lib.Vocabulary | None:
  """Vocabulary for a text task built on ``clients`` (None for EMNIST).

  Shakespeare: every character seen; Stack Overflow: the ``vocab_size`` most frequent
  words (FedJAX's default is 10000).
  """
  if task == "emnist":
    return None
  if task == "shakespeare":
    return text_lib.build_vocabulary((s for c in clients for s in _texts(c, "snippets")), "char")
  return text_lib.build_vocabulary((s for c in clients for s in _texts(c, "tokens")), "word",
                                   max_size=vocab_size)


def task_arrays(task: str, name: str, examples: Mapping[str, np.ndarray],
                vocab: text_lib.Vocabulary | None = None, sequence_length: int | None = None,
                invert: bool = True) -> dict[str, np.ndarray]:
  """Model-ready arrays of one client.

  * emnist: ``x`` float32 ``[n, 28, 28, 1]`` (``1 - pixels`` with ``invert``, so ink
    is 1 and background 0 as in MNIST; FedJAX does the same), ``y`` int32 in [0, 62);
  * shakespeare: ``char_sequences`` of the snippets (default length 80);
  * stackoverflow: ``word_sequences`` of the tokens (default length 20).
  """
  if task == "emnist":
    pixels = np.asarray(examples["pixels"], dtype=np.float32)
    if pixels.ndim == 2 and pixels.shape[1] == 28 * 28:  # TFF protos store them flat
      pixels = pixels.reshape(-1, 28, 28)
    if pixels.shape[1:] != (28, 28):
      raise ValueError(f"client {name!r}: EMNIST pixels must be [n, 28, 28], got {pixels.shape}")
    labels = np.asarray(examples["label"]).reshape(-1)
    if labels.shape[0] and (labels.min() < 0 or labels.max() >= EMNIST_CLASSES):
      raise ValueError(f"client {name!r}: labels out of range [0, {EMNIST_CLASSES}): "
                       f"min {labels.min()}, max {labels.max()}")
    x = (1.0 - pixels) if invert else pixels
    return {"x": x[..., None].astype(np.float32), "y": labels.astype(np.int32)}
  if vocab is None:
    raise ValueError(f"task {task!r} needs a vocabulary (see task_vocabulary)")
  if task == "shakespeare":
    return text_lib.char_sequences(_texts(examples, "snippets"), vocab, sequence_length or 80)
  if task == "stackoverflow":
    return text_lib.word_sequences(_texts(examples, "tokens"), vocab, sequence_length or 20)
  raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def load_sqlite(path: str, split: str | None = None, vocab: text_lib.Vocabulary | None = None,
                sequence_length: int | None = None, vocab_size: int = 10000,
                max_clients: int | None = None, invert: bool = True):
  """Reads a FedJAX/TFF SQLite file into packed arrays plus natural client ids.

  Args:
    path: the ``.sqlite`` file.
    split: TFF split name (e.g. ``'digits_only_train'``); None for FedJAX files.
    vocab: vocabulary for text tasks; None builds one on this file (pass the
      training file's vocabulary when reading a test file).
    sequence_length: row length for text tasks (defaults: 80 / 20).
    vocab_size: Stack Overflow vocabulary size when building one.
    max_clients: read only the first clients (quick experiments).
    invert: EMNIST ``1 - pixels``.

  Returns:
    ``(arrays, client_ids, names, task, vocab)``: ``arrays`` maps ``x, y`` to
    ``[n, ...]`` sorted by client, ``client_ids`` int64 ``[n]`` indexes ``names``.
  """
  names, raw = read_sqlite(path, split, max_clients)
  task = detect_task(raw[0].keys())
  if vocab is None:
    vocab = task_vocabulary(task, raw, vocab_size)
  parts = [task_arrays(task, n, ex, vocab, sequence_length, invert) for n, ex in zip(names, raw)]
  empty = [n for n, p in zip(names, parts) if p["y"].shape[0] == 0]
  if empty:
    raise ValueError(f"{path!r}: clients with zero examples: {empty[:10]}")
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  ids = np.repeat(np.arange(len(parts)), [p["y"].shape[0] for p in parts]).astype(np.int64)
  return arrays, ids, names, task, vocab
