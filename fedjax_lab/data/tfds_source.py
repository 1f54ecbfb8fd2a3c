"""Image and text classification datasets from TensorFlow Datasets, without TensorFlow.

Reads through ``tfds.data_source(name, split=...)`` (random access to ArrayRecord
files; TensorFlow is not imported), e.g. ``mnist``, ``fashion_mnist``,
``emnist/byclass``, ``cifar10``, ``cifar100``, ``imdb_reviews``. The dataset must
have been prepared once (``tfds build NAME`` or ``tfds.builder(NAME).download_and_prepare()``
with ``file_format='array_record'``) in ``data_dir``. ``tensorflow_datasets`` is
imported only when a function here runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NORMALIZATIONS = ("unit", "standardize", "none")
_CHUNK = 1024


def _records(source, count: int):
  """Yields the first ``count`` examples, in chunks through ``__getitems__`` where it works."""
  start = 0
  batched = hasattr(source, "__getitems__")
  while start < count:
    keys = list(range(start, min(start + _CHUNK, count)))
    if batched:
      try:
        chunk = source.__getitems__(keys)
      except TypeError:  # some sources (e.g. under tfds.testing.mock_data) lack batched reads
        batched, chunk = False, [source[k] for k in keys]
    else:
      chunk = [source[k] for k in keys]
    yield from chunk
    start = keys[-1] + 1


def _keys(info, x_key: str | None, y_key: str | None) -> tuple[str, str]:
  supervised = info.supervised_keys
  if (x_key is None or y_key is None) and supervised is not None and len(supervised) == 2 \
      and all(isinstance(k, str) for k in supervised):
    x_key, y_key = x_key or supervised[0], y_key or supervised[1]
  features = list(info.features.keys())
  x_key = x_key or next((k for k in ("image", "text", "sentence") if k in features), None)
  y_key = y_key or ("label" if "label" in features else None)
  if x_key not in features or y_key not in features:
    raise ValueError(f"cannot pick input/label features of {info.name!r} (features: "
                     f"{', '.join(features)}); pass x_key= and y_key=")
  return x_key, y_key


def num_classes_of(info, y_key: str) -> int | None:
  """Number of classes of a ``ClassLabel`` feature (None if the label is not one)."""
  feature = info.features[y_key]
  return getattr(feature, "num_classes", None)


def load_tfds(name: str, split: str = "train", data_dir: str | None = None,
              x_key: str | None = None, y_key: str | None = None, normalize: str = "unit",
              stats: tuple[np.ndarray, np.ndarray] | None = None,
              max_examples: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a TFDS classification split into arrays.

  Args:
    name: TFDS name, e.g. ``'mnist'`` or ``'emnist/byclass'``.
    split: split name, e.g. ``'train'``, ``'test'``, ``'train[:10%]'``.
    data_dir: TFDS data folder (default: TFDS's own).
    x_key, y_key: input and label features (default: the dataset's supervised keys,
      else ``image``/``text`` and ``label``).
    normalize: images only: ``'unit'`` (divide by 255), ``'standardize'``
      (``(x / 255 - mean) / std`` per channel), or ``'none'`` (raw values as float32).
    stats: ``(mean, std)`` for ``'standardize'``; default: computed on this split
      (pass the train split's ``info['stats']`` when loading the test split).
    max_examples: read only the first examples.

  Returns:
    ``(arrays, info)``: arrays ``{'x': float32 [n, H, W, C] images or object [n]
    texts (str), 'y': int32 [n]}``; info has ``num_classes``, ``x_key``, ``y_key``,
    ``kind`` (``'image'``/``'text'``), ``splits`` and ``stats``.
  """
  import tensorflow_datasets as tfds  # lazy: importing fedjax_lab must stay light

  if normalize not in NORMALIZATIONS:
    raise ValueError(f"unknown normalize {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  info = source.dataset_info
  x_key, y_key = _keys(info, x_key, y_key)
  count = len(source) if max_examples is None else min(int(max_examples), len(source))
  if count == 0:
    raise ValueError(f"{name!r} split {split!r} has zero examples")
  xs, ys = [], []
  for example in _records(source, count):
    xs.append(example[x_key])
    ys.append(example[y_key])
  y = np.asarray(ys)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name!r}: label {y_key!r} must be one integer per example, got "
                     f"dtype {y.dtype} shape {y.shape}")
  num_classes = num_classes_of(info, y_key)
  if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"{name!r}: labels out of range [0, {num_classes}): min {y.min()}, max {y.max()}")
  first = xs[0]
  if isinstance(first, (str, bytes)) or (isinstance(first, np.ndarray) and first.dtype.kind in "OSU"):
    x = np.empty(count, dtype=object)
    x[:] = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in xs]
    kind, stats = "text", None
  else:
    shapes = {np.shape(v) for v in xs}
    if len(shapes) != 1:
      raise ValueError(f"{name!r}: feature {x_key!r} has mismatched shapes {sorted(shapes)[:5]}; "
                       f"resize the images to one shape first")
    x = np.stack(xs).astype(np.float32)
    if x.ndim == 3:  # [n, H, W] -> one channel
      x = x[..., None]
    kind = "image"
    if normalize != "none":
      x /= 255.0
    if normalize == "standardize":
      if stats is None:
        axes = tuple(range(x.ndim - 1))
        stats = (x.mean(axis=axes), np.maximum(x.std(axis=axes), 1e-6))
      x = (x - stats[0]) / stats[1]
    else:
      stats = None
  meta = {"num_classes": num_classes if num_classes is not None else int(y.max()) + 1,
          "x_key": x_key, "y_key": y_key, "kind": kind, "stats": stats,
          "splits": sorted(info.splits.keys())}
  return {"x": x, "y": y.astype(np.int32)}, meta
