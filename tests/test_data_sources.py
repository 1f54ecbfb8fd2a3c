"""Tests for partitioners, real-data readers (TFDS, SQLite, LEAF), text tasks and streaming."""

import json
import math
import os
import sqlite3
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest

from fedjax_lab import data as fd
from fedjax_lab import training
from fedjax_lab.algorithm import ServerState, sample_cohort
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data import leaf_source, sqlite_source, streaming
from fedjax_lab.data import text as text_lib
from fedjax_lab.models import Model, classification_loss, mlp
from fedjax_lab.models import text as text_models
from algorithms.fedavg import fedavg


def _labels(n=600, num_classes=10, seed=0, p=None):
  return np.random.default_rng(seed).choice(num_classes, n, p=p)


def _check_assignment(ids, n, k):
  """Every example has exactly one valid client (no -1 / garbage left)."""
  assert ids.dtype == np.int64 and ids.shape == (n,)
  assert ids.min() >= 0 and ids.max() < k
  assert np.bincount(ids, minlength=k).sum() == n


def _classes_per_client(labels, ids, k):
  return np.array([np.unique(labels[ids == c]).size for c in range(k)])


# ---------------------------------------------------------------- partitioners

SKEWED = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
MILD = np.linspace(2, 1, 10) / np.linspace(2, 1, 10).sum()

PARTITIONERS = {
    "shard": lambda l, k, s: fd.shard(l, k, 2, s),
    "shard_size": lambda l, k, s: fd.shard(l, k, None, s, shard_size=25),
    "pathological": lambda l, k, s: fd.pathological(l, k, 3, s),
    "pathological_first": lambda l, k, s: fd.pathological(l, k, 2, s, "first-deterministic"),
    "linear": fd.linear,
    "square": fd.square,
    "exponential": fd.exponential,
    "inner_dirichlet": lambda l, k, s: fd.inner_dirichlet(
        l, np.full(k, l.shape[0] // k), 0.5, s),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_partitioner_assigns_every_example_exactly_once_and_is_seeded(name):
  fn = PARTITIONERS[name]
  labels = _labels(600, p=SKEWED)
  ids = fn(labels, 6, 3)
  _check_assignment(ids, 600, 6)
  np.testing.assert_array_equal(ids, fn(labels, 6, 3))
  assert not np.array_equal(ids, fn(labels, 6, 4))


def test_shard_each_client_sees_at_most_its_shard_count_of_classes():
  labels = _labels(1000, p=SKEWED, seed=1)  # unequal classes: shards cannot straddle them
  for s in (1, 2, 3):
    ids = fd.shard(labels, 20, s, seed=s)
    _check_assignment(ids, 1000, 20)
    assert _classes_per_client(labels, ids, 20).max() <= s
  ids = fd.shard(labels, 20, None, seed=0, shard_size=40)
  _check_assignment(ids, 1000, 20)
  # Shards hold <= 40 examples of one class; dealt round-robin, a client has <= ceil(S/K).
  num_shards = sum(math.ceil(np.sum(labels == c) / 40) for c in range(10))
  per_client = math.ceil(num_shards / 20)
  assert _classes_per_client(labels, ids, 20).max() <= per_client
  assert np.bincount(ids).max() <= per_client * 40


def test_shard_matches_fedavg_pathological_split_on_balanced_classes():
  # FedAvg's MNIST setting in small: 10 classes x 60, 10 clients x 2 shards of 30.
  labels = np.repeat(np.arange(10), 60)
  ids = fd.shard(labels, 10, 2, seed=0)
  np.testing.assert_array_equal(np.bincount(ids), np.full(10, 60))
  counts = np.array([np.bincount(labels[ids == c], minlength=10) for c in range(10)])
  assert set(np.unique(counts)) <= {0, 30, 60}  # whole shards of one class
  np.testing.assert_array_equal(counts.sum(0), np.full(10, 60))


@pytest.mark.parametrize("mode", ["random", "deterministic", "first-deterministic"])
def test_pathological_exactly_k_classes_split_evenly(mode):
  labels = _labels(900, p=MILD, seed=2)
  k, per = 15, 3
  ids = fd.pathological(labels, k, per, seed=5, class_assignment_mode=mode)
  _check_assignment(ids, 900, k)
  np.testing.assert_array_equal(_classes_per_client(labels, ids, k), np.full(k, per))
  for c in range(10):  # a class is split evenly (np.array_split) among its holders
    held = np.bincount(ids[labels == c], minlength=k)
    held = held[held > 0]
    assert held.max() - held.min() <= 1
  held_classes = [set(np.unique(labels[ids == i])) for i in range(k)]
  if mode == "deterministic":
    assert held_classes == [{(i + j) % 10 for j in range(per)} for i in range(k)]
  if mode == "first-deterministic":
    assert all(i % 10 in held_classes[i] for i in range(k))


@pytest.mark.parametrize("name,units", [("linear", lambda i: i), ("square", lambda i: i * i),
                                        ("exponential", np.exp)])
@pytest.mark.parametrize("n,k", [(1000, 4), (5000, 7)])
def test_size_skews_follow_flower_formula(name, units, n, k):
  ids = getattr(fd, name)(_labels(n), k, seed=0)
  _check_assignment(ids, n, k)
  u = units(np.arange(1, k + 1, dtype=np.float64))
  want = np.floor(n * u / u.sum()).astype(int)
  want[-1] += n - want.sum()  # remainder to the largest client
  np.testing.assert_array_equal(np.bincount(ids, minlength=k), want)


def test_size_skew_rejects_empty_clients():
  with pytest.raises(ValueError, match="an empty client"):
    fd.exponential(_labels(100), 10, seed=0)  # e^1 / sum(e^i) * 100 < 1


def test_natural_id_maps_sorted_ids():
  names_in = np.array(["bob", "al", "cy", "al", "bob", "bob"])
  ids, names = fd.natural_id(names_in)
  np.testing.assert_array_equal(names, ["al", "bob", "cy"])
  np.testing.assert_array_equal(ids, [1, 0, 2, 0, 1, 1])
  np.testing.assert_array_equal(names[ids], names_in)
  with pytest.raises(ValueError, match="non-empty"):
    fd.natural_id(np.array([]))


def test_inner_dirichlet_sizes_as_requested_and_alpha_controls_skew():
  labels = _labels(2000)
  sizes = np.array([0, 50, 150, 300, 500, 1000])
  ids = fd.inner_dirichlet(labels, sizes, 1.0, seed=0)
  _check_assignment(ids, 2000, 6)
  np.testing.assert_array_equal(np.bincount(ids, minlength=6), sizes)

  def skew(alpha):
    glob = np.bincount(labels, minlength=10) / 2000
    out = []
    for s in range(3):
      ids = fd.inner_dirichlet(labels, np.full(20, 100), alpha, seed=s)
      counts = np.array([np.bincount(labels[ids == c], minlength=10) for c in range(20)])
      out.append(np.mean(0.5 * np.abs(counts / 100 - glob).sum(1)))
    return np.mean(out)

  low, mid, high = skew(0.05), skew(1.0), skew(1000.0)
  assert low > mid > high
  assert high < 0.15 and low > 0.5
  # Per-class concentration vector is accepted.
  _check_assignment(fd.inner_dirichlet(labels, np.full(20, 100), np.linspace(0.1, 1, 10), 0),
                    2000, 20)


def test_partitioner_errors():
  labels = _labels(100)
  with pytest.raises(ValueError, match="exactly one of num_shards_per_partition and shard_size"):
    fd.shard(labels, 5, 2, 0, shard_size=10)
  with pytest.raises(ValueError, match="exactly one of"):
    fd.shard(labels, 5, None, 0)
  with pytest.raises(ValueError, match="cannot cover"):
    fd.shard(labels, 3, 2, 0)  # 6 single-class shards for 10 classes
  with pytest.raises(ValueError, match="class_assignment_mode"):
    fd.pathological(labels, 5, 2, 0, "sorted")
  with pytest.raises(ValueError, match="cannot cover all 10 classes"):
    fd.pathological(labels, 4, 2, 0)
  with pytest.raises(ValueError, match=r"num_classes_per_partition must be in \[1, 10\]"):
    fd.pathological(labels, 5, 11, 0)
  with pytest.raises(ValueError, match="sum to 90 but there are 100"):
    fd.inner_dirichlet(labels, np.full(9, 10), 0.5, 0)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    fd.inner_dirichlet(labels, np.full(10, 10), 0.0, 0)
  with pytest.raises(ValueError, match="one entry per class"):
    fd.inner_dirichlet(labels, np.full(10, 10), [1.0, 2.0], 0)
  with pytest.raises(ValueError, match="zero clients"):
    fd.shard(labels, 0, 2, 0)


# ---------------------------------------------------------------- TFDS


def test_importing_the_library_does_not_import_tfds():
  code = ("import sys, fedjax_lab.data, fedjax_lab.data.tfds_source, fedjax_lab.models.text; "
          "assert 'tensorflow_datasets' not in sys.modules; assert 'tensorflow' not in sys.modules")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(__file__)))


def test_tfds_images_normalised_against_the_raw_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  from fedjax_lab.data import tfds_source
  with tfds.testing.mock_data(num_examples=24):
    raw = tfds.data_source("mnist", split="train")
    want_x = np.stack([raw[i]["image"] for i in range(24)]).astype(np.float32)
    want_y = np.array([raw[i]["label"] for i in range(24)])
    arrays, info = tfds_source.load_tfds("mnist", "train")
    std, std_info = tfds_source.load_tfds("cifar10", "train", normalize="standardize")
    test_std, _ = tfds_source.load_tfds("cifar10", "test", normalize="standardize",
                                        stats=std_info["stats"])
    raw_cifar = np.stack([tfds.data_source("cifar10", split="train")[i]["image"]
                          for i in range(24)]).astype(np.float32) / 255
  assert arrays["x"].shape == (24, 28, 28, 1) and arrays["x"].dtype == np.float32
  np.testing.assert_allclose(arrays["x"], want_x / 255.0)
  np.testing.assert_array_equal(arrays["y"], want_y)
  assert arrays["y"].dtype == np.int32 and info["num_classes"] == 10 and info["kind"] == "image"
  assert std["x"].shape == (24, 32, 32, 3)
  mean, sd = raw_cifar.mean((0, 1, 2)), raw_cifar.std((0, 1, 2))
  np.testing.assert_allclose(std["x"], (raw_cifar - mean) / sd, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(std["x"].mean((0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(std["x"].std((0, 1, 2)), 1, atol=1e-3)
  # The test split is standardised with the train statistics.
  np.testing.assert_allclose(std_info["stats"][0], mean, rtol=1e-5)
  assert test_std["x"].shape[1:] == (32, 32, 3)


def test_tfds_through_load_federated_and_text():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=60):
    train, test, info = fd.load_federated_with_info(
        "tfds:fashion_mnist", "shard", num_clients=6, num_shards_per_partition=2, seed=0)
    text_train, text_test, text_info = fd.load_federated_with_info(
        "tfds:imdb_reviews", "iid", num_clients=4, sequence_length=12, seed=0)
  assert train.num_clients == 6 and train.num_examples == 60 and test["y"].shape == (60,)
  assert info.num_classes == 10 and info.task == "classification"
  assert _classes_per_client(train.arrays["y"], np.repeat(np.arange(6), train.client_sizes),
                             6).max() <= 2
  assert text_train.arrays["x"].shape == (60, 12) and text_train.arrays["x"].dtype == np.int32
  assert text_info.vocab.level == "word" and text_info.num_classes == 2
  assert text_train.arrays["x"].max() < text_info.vocab.size


def test_tfds_bad_input():
  tfds = pytest.importorskip("tensorflow_datasets")
  from fedjax_lab.data import tfds_source
  with tfds.testing.mock_data(num_examples=5):
    with pytest.raises(ValueError, match="normalize"):
      tfds_source.load_tfds("mnist", normalize="zscore")
    with pytest.raises(ValueError, match="pass x_key= and y_key="):
      tfds_source.load_tfds("mnist", x_key="pixels")


# ---------------------------------------------------------------- SQLite


def _emnist_clients(rng, sizes, labels_max=62):
  return {f"f{i:04d}_0{i}": {"pixels": rng.random((n, 28, 28), dtype=np.float32),
                             "label": rng.integers(0, labels_max, n).astype(np.int32)}
          for i, n in enumerate(sizes)}


def test_fedjax_blob_format_by_hand():
  # A blob built from the format's definition (zlib(msgpack map) with ndarrays as
  # ext 1 = packb((shape, dtype name, bytes)) and bytes arrays as ext 4).
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  ext_x = msgpack.ExtType(1, msgpack.packb(((2, 3), "float32", x.tobytes()), use_bin_type=True))
  ext_s = msgpack.ExtType(4, msgpack.packb(((2,), [b"to be", b"or not"]), use_bin_type=True))
  blob = zlib.compress(msgpack.packb({"x": ext_x, "snippets": ext_s}, use_bin_type=True))
  got = sqlite_source.decode_fedjax_blob(blob)
  np.testing.assert_array_equal(got["x"], x)
  assert got["x"].dtype == np.float32
  assert got["snippets"].tolist() == [b"to be", b"or not"]
  # Our writer emits the same bytes for the same map.
  assert sqlite_source.decode_fedjax_blob(sqlite_source.encode_fedjax_blob(got))["x"].tolist() \
      == x.tolist()


def test_sqlite_fedjax_emnist(tmp_path):
  rng = np.random.default_rng(0)
  clients = _emnist_clients(rng, [3, 5, 2])
  path = str(tmp_path / "federated_emnist_train.sqlite")
  sqlite_source.write_fedjax_sqlite(path, clients)
  source = sqlite_source.SQLiteClients(path)
  assert source.format == "fedjax" and source.names == list(clients)
  np.testing.assert_array_equal(source.client_sizes, [3, 5, 2])
  np.testing.assert_array_equal(source.client(1)["pixels"], clients["f0001_01"]["pixels"])
  arrays, ids, names, task, vocab = sqlite_source.load_sqlite(path)
  assert task == "emnist" and vocab is None and names == list(clients)
  np.testing.assert_array_equal(ids, np.repeat([0, 1, 2], [3, 5, 2]))
  want = np.concatenate([c["pixels"] for c in clients.values()])
  np.testing.assert_allclose(arrays["x"][..., 0], 1.0 - want)  # ink 1, background 0
  np.testing.assert_array_equal(arrays["y"], np.concatenate([c["label"] for c in clients.values()]))
  # load_federated: natural clients, test from the second file.
  test_path = str(tmp_path / "federated_emnist_test.sqlite")
  sqlite_source.write_fedjax_sqlite(test_path, _emnist_clients(rng, [2, 2]))
  train, test, info = fd.load_federated_with_info(f"sqlite:{path},{test_path}", "natural")
  assert train.num_clients == 3 and info.client_names == sorted(clients)
  np.testing.assert_array_equal(train.client_sizes, [3, 5, 2])
  assert test["x"].shape == (4, 28, 28, 1) and info.num_classes >= 1


def test_sqlite_tff_splits_text_tasks(tmp_path):
  path = str(tmp_path / "shakespeare.sqlite")
  snippets = {"train": {"KING": {"snippets": np.array([b"ab", b"c"], dtype=object)},
                        "FOOL": {"snippets": np.array([b"ba"], dtype=object)}},
              "test": {"KING": {"snippets": np.array([b"abd"], dtype=object)}}}
  sqlite_source.write_tff_sqlite(path, snippets)
  with pytest.raises(ValueError, match="choose one with split="):
    sqlite_source.SQLiteClients(path)
  source = sqlite_source.SQLiteClients(path, split="train")
  assert source.format == "tff" and source.names == ["KING", "FOOL"]
  assert source.client(0)["snippets"].tolist() == [b"ab", b"c"]
  arrays, ids, names, task, vocab = sqlite_source.load_sqlite(path, "train", sequence_length=3)
  assert task == "shakespeare" and vocab.tokens == ("a", "b", "c")  # a, b twice; c once
  a, b, c = 3, 4, 5
  # KING: BOS a b EOS BOS c EOS; FOOL: BOS b a EOS.
  np.testing.assert_array_equal(arrays["x"], [[1, a, b], [2, 1, c], [1, b, a]])
  np.testing.assert_array_equal(arrays["y"], [[a, b, 2], [1, c, 2], [b, a, 2]])
  np.testing.assert_array_equal(ids, [0, 0, 1])
  test, *_ = sqlite_source.load_sqlite(path, "test", vocab=vocab, sequence_length=3)
  np.testing.assert_array_equal(test["y"], [[a, b, vocab.oov], [2, 0, 0]])  # 'd' is OOV
  # Through load_federated: natural speakers, or a label-free re-partition of the rows.
  train, test, info = fd.load_federated_with_info(
      f"sqlite:{path}#train,{path}#test", "natural", sequence_length=3)
  assert info.task == "next_token" and info.num_classes == vocab.size == 7
  np.testing.assert_array_equal(train.client_sizes, [2, 1])
  np.testing.assert_array_equal(test["x"], [[1, a, b], [vocab.oov, 0, 0]])
  train, _ = fd.load_federated(f"sqlite:{path}#train", "linear", num_clients=2, test_fraction=0.0,
                               sequence_length=3)
  np.testing.assert_array_equal(train.client_sizes, [1, 2])
  with pytest.raises(ValueError, match="needs one label per example"):
    fd.load_federated(f"sqlite:{path}#train", "dirichlet", num_clients=2, sequence_length=3)
  # Stack Overflow: one row per post, word level.
  so = str(tmp_path / "stackoverflow.sqlite")
  sqlite_source.write_fedjax_sqlite(so, {"u1": {"tokens": np.array([b"a b a", b"c"], dtype=object),
                                                "score": np.array([1, 2])}})
  arrays, _, _, task, vocab = sqlite_source.load_sqlite(so, sequence_length=4, vocab_size=2)
  assert task == "stackoverflow" and vocab.tokens == ("a", "b")
  np.testing.assert_array_equal(arrays["x"], [[1, 3, 4, 3], [1, vocab.oov, 0, 0]])
  np.testing.assert_array_equal(arrays["y"], [[3, 4, 3, 2], [vocab.oov, 2, 0, 0]])


def test_sqlite_bad_input(tmp_path):
  missing = str(tmp_path / "nope.sqlite")
  with pytest.raises(FileNotFoundError, match="not found"):
    sqlite_source.SQLiteClients(missing)
  assert not os.path.exists(missing)  # not created by the failed open
  other = str(tmp_path / "other.sqlite")
  with sqlite3.connect(other) as con:
    con.execute("CREATE TABLE t (a INTEGER)")
  con.close()
  with pytest.raises(ValueError, match="expected the FedJAX schema"):
    sqlite_source.SQLiteClients(other)
  rng = np.random.default_rng(0)
  empty = str(tmp_path / "empty.sqlite")
  sqlite_source.write_fedjax_sqlite(empty, {"a": {"pixels": np.zeros((0, 28, 28), np.float32),
                                                  "label": np.zeros(0, np.int32)}})
  with pytest.raises(ValueError, match="zero examples"):
    sqlite_source.load_sqlite(empty)
  bad_labels = str(tmp_path / "labels.sqlite")
  clients = _emnist_clients(rng, [2])
  clients["f0000_00"]["label"][1] = 62
  sqlite_source.write_fedjax_sqlite(bad_labels, clients)
  with pytest.raises(ValueError, match=r"labels out of range \[0, 62\)"):
    sqlite_source.load_sqlite(bad_labels)
  bad_shapes = str(tmp_path / "shapes.sqlite")
  sqlite_source.write_tff_sqlite(bad_shapes, {"train": {"w": {
      "pixels": np.zeros((2, 784), np.float32), "label": np.array([1, 2])}}})
  with sqlite3.connect(bad_shapes) as con:  # rewrite the protos with unequal pixel counts
    con.execute("DELETE FROM examples")
    for n in (784, 700):
      con.execute("INSERT INTO examples VALUES ('train', 'w', ?)",
                  (sqlite_source._tf_example({"pixels": np.zeros(n, np.float32),
                                              "label": np.array(1)}),))
  con.close()
  with pytest.raises(ValueError, match="mismatched shapes"):
    sqlite_source.load_sqlite(bad_shapes)
  with pytest.raises(ValueError, match="unknown split 'valid'"):
    sqlite_source.SQLiteClients(bad_shapes, split="valid")


# ---------------------------------------------------------------- LEAF


def _write_leaf(path, users):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"users": list(users), "num_samples": [len(u["y"]) for u in users.values()],
               "user_data": users}, f)


def test_leaf_femnist_folder_layout(tmp_path):
  rng = np.random.default_rng(0)

  def user(n):
    return {"x": rng.random((n, 784)).round(3).tolist(), "y": rng.integers(0, 62, n).tolist()}

  train = {"f_a": user(3), "f_b": user(2)}
  _write_leaf(str(tmp_path / "femnist/train/part0.json"), {"f_a": train["f_a"]})
  _write_leaf(str(tmp_path / "femnist/train/part1.json"), {"f_b": train["f_b"]})
  _write_leaf(str(tmp_path / "femnist/test/all.json"), {"f_a": user(1), "f_b": user(1)})
  arrays, ids, names, task, _ = leaf_source.load_leaf(str(tmp_path / "femnist/train"))
  assert task == "femnist" and names == ["f_a", "f_b"]
  np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1])
  want = np.array(train["f_a"]["x"] + train["f_b"]["x"], np.float32).reshape(-1, 28, 28, 1)
  np.testing.assert_allclose(arrays["x"], 1.0 - want)
  np.testing.assert_array_equal(arrays["y"], train["f_a"]["y"] + train["f_b"]["y"])
  fed, test, info = fd.load_federated_with_info(f"leaf:{tmp_path / 'femnist'}", "natural")
  np.testing.assert_array_equal(fed.client_sizes, [3, 2])
  assert test["y"].shape == (2,) and info.source == "leaf:femnist"


def test_leaf_shakespeare_and_sent140(tmp_path):
  shakes = str(tmp_path / "shakespeare.json")
  _write_leaf(shakes, {"ROMEO": {"x": ["abc", "bca"], "y": ["a", "b"]}})
  arrays, _, _, task, vocab = leaf_source.load_leaf(shakes)
  assert task == "shakespeare" and vocab.tokens == ("a", "b", "c")  # a: 3, b: 3, c: 2
  a, b, c = 3, 4, 5
  np.testing.assert_array_equal(arrays["x"], [[a, b, c], [b, c, a]])
  np.testing.assert_array_equal(arrays["y"], [[b, c, a], [c, a, b]])  # shifted, LEAF label last
  sent = str(tmp_path / "sent140.json")
  tweets = [["1", "date", "q", "ann", "good day good"], ["2", "date", "q", "ann", "bad"]]
  _write_leaf(sent, {"ann": {"x": tweets, "y": [1, 0]}})
  arrays, _, _, task, vocab = leaf_source.load_leaf(sent, sequence_length=4)
  assert task == "sent140" and vocab.tokens == ("good", "bad", "day")
  np.testing.assert_array_equal(arrays["x"], [[3, 5, 3, 0], [4, 0, 0, 0]])
  np.testing.assert_array_equal(arrays["y"], [1, 0])


def test_leaf_bad_input(tmp_path):
  with pytest.raises(FileNotFoundError):
    leaf_source.read_leaf(str(tmp_path / "missing.json"))
  os.makedirs(tmp_path / "emptydir")
  with pytest.raises(FileNotFoundError, match="no LEAF"):
    leaf_source.read_leaf(str(tmp_path / "emptydir"))
  cases = {
      "schema.json": ({"data": []}, "not a LEAF file"),
      "count.json": ({"users": ["u"], "num_samples": [3], "user_data": {"u": {"x": [[0.0] * 784],
                                                                          "y": [1]}}},
                     "declares 3 samples but has 1"),
      "zero.json": ({"users": ["u"], "user_data": {"u": {"x": [], "y": []}}}, "zero examples"),
      "xy.json": ({"users": ["u"], "user_data": {"u": {"x": [[0.0] * 784], "y": [1, 2]}}},
                  "1 x but 2 y"),
  }
  for name, (content, message) in cases.items():
    with open(tmp_path / name, "w") as f:
      json.dump(content, f)
    with pytest.raises(ValueError, match=message):
      leaf_source.load_leaf(str(tmp_path / name))
  _write_leaf(str(tmp_path / "range.json"), {"u": {"x": [[0.0] * 784], "y": [62]}})
  with pytest.raises(ValueError, match=r"labels out of range \[0, 62\)"):
    leaf_source.load_leaf(str(tmp_path / "range.json"))
  _write_leaf(str(tmp_path / "shape.json"), {"u": {"x": [[0.0] * 784, [0.0] * 783], "y": [1, 1]}})
  with pytest.raises(ValueError, match="784 floats"):
    leaf_source.load_leaf(str(tmp_path / "shape.json"))
  _write_leaf(str(tmp_path / "dup/a.json"), {"u": {"x": ["ab"], "y": ["c"]}})
  _write_leaf(str(tmp_path / "dup/b.json"), {"u": {"x": ["ab"], "y": ["c"]}})
  with pytest.raises(ValueError, match="appears in both"):
    leaf_source.read_leaf(str(tmp_path / "dup"))


# ---------------------------------------------------------------- load_federated


def test_load_federated_new_partitions_and_errors():
  for partition in ("shard", "pathological", "linear", "square", "exponential", "inner_dirichlet"):
    k = 6 if partition == "exponential" else 10  # e^1 / sum(e^i) must leave client 0 examples
    train, test = fd.load_federated("digits", partition, num_clients=k, seed=0, log_stats=False)
    assert train.num_clients == k and train.num_examples + test["y"].shape[0] == 1797
    assert train.client_sizes.min() > 0
  train, _ = fd.load_federated("digits", "pathological", num_clients=10,
                               num_classes_per_partition=1, seed=0)
  assert _classes_per_client(train.arrays["y"], np.repeat(np.arange(10), train.client_sizes),
                             10).max() == 1
  with pytest.raises(ValueError, match="known names: digits, mnist5k, synthetic, tfds:NAME, sqlite:PATH"):
    fd.load_federated("emnist")
  with pytest.raises(ValueError, match="needs a path"):
    fd.load_federated("leaf:")
  with pytest.raises(FileNotFoundError):
    fd.load_federated("sqlite:/nonexistent/file.sqlite", "natural")


def test_client_stats_against_numpy():
  labels = np.array([0, 0, 1, 1, 1, 2])
  data = fd.FederatedData.from_client_ids({"x": np.zeros((6, 1)), "y": labels},
                                          np.array([0, 0, 1, 1, 1, 1]), 3)
  stats = fd.client_stats(data, num_classes=3)
  assert (stats["num_clients"], stats["empty_clients"], stats["examples_min"],
          stats["examples_max"], stats["examples_median"]) == (3, 1, 0, 4, 2.0)
  glob = np.array([2, 3, 1]) / 6
  tv0 = 0.5 * np.abs(np.array([1, 0, 0]) - glob).sum()
  tv1 = 0.5 * np.abs(np.array([0, 0.75, 0.25]) - glob).sum()
  assert stats["label_skew"] == pytest.approx((tv0 + tv1) / 2)
  np.testing.assert_array_equal(fd.label_counts(data, 3), [[2, 0, 0], [0, 3, 1], [0, 0, 0]])
  from fedjax_lab import plotting
  fig = plotting.plot_client_statistics(data, num_classes=3)
  bars = [p.get_height() for p in fig.axes[0].patches]
  np.testing.assert_array_equal(bars, data.client_sizes)


# ---------------------------------------------------------------- text


def test_vocabulary_padding_and_masking_by_hand():
  vocab = text_lib.build_vocabulary(["abca", b"cab d"], "char")
  # counts: a 3, b 2, c 2, ' ' 1, d 1 -> by count then by token.
  assert vocab.tokens == ("a", "b", "c", " ", "d") and vocab.oov == 8 and vocab.size == 9
  np.testing.assert_array_equal(vocab.encode("abz", add_bos=True, add_eos=True), [1, 3, 4, 8, 2])
  assert vocab.decode([1, 3, 4, 8, 2, 0]) == "ab<unk>"
  words = text_lib.build_vocabulary(["the cat", "the dog the"], "word", max_size=2)
  assert words.tokens == ("the", "cat")
  seq = text_lib.word_sequences(["the cat sat", "the the the the the"], words, 4)
  np.testing.assert_array_equal(seq["x"], [[1, 3, 4, 5], [1, 3, 3, 3]])
  np.testing.assert_array_equal(seq["y"], [[3, 4, 5, 2], [3, 3, 3, 3]])  # truncated: no EOS
  chars = text_lib.char_sequences(["ab", "c"], vocab, 4)
  # BOS a b EOS BOS c EOS -> 6 (input, target) pairs -> 2 rows of 4, the last half padding.
  np.testing.assert_array_equal(chars["x"], [[1, 3, 4, 2], [1, 5, 0, 0]])
  np.testing.assert_array_equal(chars["y"], [[3, 4, 2, 1], [5, 2, 0, 0]])
  np.testing.assert_array_equal(text_lib.token_mask(chars["y"]),
                                [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(text_lib.pad_ids(["ab", "abcab"], vocab, 3), [[3, 4, 0], [3, 4, 5]])
  data, names = text_lib.federated_text({"u": ["ab", "c"], "v": ["abcabc"]}, vocab, 4)
  assert names == ["u", "v"]
  np.testing.assert_array_equal(data.client_sizes, [2, 2])
  with pytest.raises(ValueError, match="zero examples"):
    text_lib.federated_text({"u": []}, vocab, 4)
  with pytest.raises(ValueError, match="unknown level"):
    text_lib.build_vocabulary(["a"], "byte")


def test_sequence_loss_masks_padding_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 6)).astype(np.float32)
  y = np.array([[2, 5, 1, 0], [0, 0, 0, 0], [3, 3, 3, 3]])
  # The stub's "input" is the row index, so chunked evaluation sees the right logits.
  model = Model(init=None, apply=lambda params, x: jnp.asarray(logits)[x[:, 0]])
  rows = np.repeat(np.arange(3)[:, None], 4, axis=1)
  got = text_models.sequence_loss(model)(None, {"x": rows, "y": y}, None)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  mask = y != 0
  want = np.array([nll[0, :3].mean(), 0.0, nll[2].mean()])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  ev = text_models.make_sequence_evaluator(model, batch_size=2)(None, {"x": rows, "y": y})
  assert int(ev["num_tokens"]) == 7
  np.testing.assert_allclose(float(ev["loss"]), nll[mask].mean(), rtol=1e-5)
  acc = (logits.argmax(-1) == y)[mask].mean()
  np.testing.assert_allclose(float(ev["accuracy"]), acc, rtol=1e-6)


def _markov_text(rng, num_snippets, stay=0.9, letters="abcdefgh"):
  """Snippets where the next letter is the following one with probability ``stay``."""
  out = []
  for _ in range(num_snippets):
    s = [rng.integers(len(letters))]
    for _ in range(rng.integers(10, 30) - 1):
      s.append((s[-1] + 1) % len(letters) if rng.random() < stay else rng.integers(len(letters)))
    out.append("".join(letters[i] for i in s))
  return out


def test_fedavg_char_lm_learns_far_below_unigram_entropy():
  rng = np.random.default_rng(0)
  train_texts = {f"c{i}": _markov_text(rng, 6) for i in range(16)}
  vocab = text_lib.build_vocabulary((s for v in train_texts.values() for s in v), "char")
  train, _ = text_lib.federated_text(train_texts, vocab, 16)
  test, _ = text_lib.federated_text({"held": _markov_text(rng, 40)}, vocab, 16)
  # Unigram entropy of the held-out targets: the best loss without context.
  targets = test.arrays["y"][test.arrays["y"] != text_lib.PAD]
  p = np.bincount(targets) / targets.size
  p = p[p > 0]
  unigram = -(p * np.log(p)).sum()
  # Entropy of one Markov step: a floor no model can beat on fresh text.
  step = 0.9 + 0.1 / 8
  markov = -(step * np.log(step) + 7 * (0.1 / 8) * np.log(0.1 / 8))

  model = text_models.char_lm(vocab.size, embed_dim=8, hidden=(32,))
  params = model.init(jax.random.PRNGKey(1), train.arrays["x"][:1])
  method = fedavg(text_models.sequence_loss(model), client_lr=1.0,
                  schedule=LocalSchedule(batch_size=4, steps=5))
  opts = training.TrainOptions(rounds=30, clients_per_round=4, eval_every=0, rounds_per_call=30,
                               progress=False)
  state, history = training.train(method, params, train, text_models.make_sequence_evaluator(model),
                                  dict(test.arrays), opts)
  final = history[-1]
  assert history[0]["train_loss"] > 0.9 * unigram  # starts near chance
  assert final["test_loss"] < 0.5 * unigram, (final, unigram)
  assert final["test_loss"] > 0.8 * markov  # no target leaked into the inputs
  assert final["test_accuracy"] > 0.7


# ---------------------------------------------------------------- streaming


def _population(seed=0, num_clients=9):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 12, num_clients)
  arrays = {"x": rng.normal(size=(sizes.sum(), 5)).astype(np.float32),
            "y": rng.integers(0, 3, sizes.sum()).astype(np.int32)}
  return fd.FederatedData(arrays, np.concatenate([[0], np.cumsum(sizes)]))


def test_streamed_cohorts_equal_gather_cohort():
  data = _population()
  arrays, offsets = data.device_arrays()
  max_n = data.max_client_size
  state = ServerState(params=(), opt_state=(), round=jnp.asarray(2, jnp.int32),
                      rng=jnp.asarray(jax.random.PRNGKey(7), jnp.uint32), client_states=(),
                      extra={}, agg_state=())
  with streaming.CohortStream(data, state, 4, num_rounds=3, layout="padded") as stream:
    padded = list(stream)
  with streaming.CohortStream(data, state, 4, num_rounds=3, layout="packed", prefetch=1) as stream:
    packed = list(stream)
  assert [item.round for item in padded] == [2, 3, 4]
  for item, pack in zip(padded, packed):
    ids, _ = sample_cohort(state._replace(round=jnp.asarray(item.round, jnp.int32)),
                           data.num_clients, 4)
    np.testing.assert_array_equal(item.ids, np.asarray(ids))  # the engine's cohort
    want, want_sizes = fd.gather_cohort(arrays, offsets, ids, max_n)
    cohort, sizes = item.data
    np.testing.assert_array_equal(np.asarray(sizes), np.asarray(want_sizes))
    for k in want:
      np.testing.assert_array_equal(np.asarray(cohort[k]), np.asarray(want[k]))
    # The packed subset: only the cohort's rows, same gather.
    sub_arrays, sub_offsets = pack.data
    assert sub_arrays["x"].shape == (4 * max_n, 5)
    got, got_sizes = fd.gather_cohort(sub_arrays, sub_offsets, ids, max_n)
    np.testing.assert_array_equal(np.asarray(got_sizes), np.asarray(want_sizes))
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
  # Padding ids (>= num_clients) read as empty clients in both layouts.
  cohort, sizes = streaming.host_gather(data, [data.num_clients, 0], max_n)
  assert sizes[0] == 0 and not cohort["x"][0].any()


def test_streamed_training_equals_packed_training(tmp_path):
  # The population lives in a FedJAX SQLite file; streamed straight from it.
  rng = np.random.default_rng(0)
  clients = _emnist_clients(rng, [4, 7, 3, 6, 5, 2], labels_max=10)
  path = str(tmp_path / "emnist.sqlite")
  sqlite_source.write_fedjax_sqlite(path, clients)
  arrays, ids, names, _, _ = sqlite_source.load_sqlite(path)
  packed = fd.FederatedData.from_client_ids(arrays, ids, len(names))
  lazy = streaming.TransformedClients(sqlite_source.SQLiteClients(path),
                                      lambda ex: sqlite_source.task_arrays("emnist", "", ex))
  model = mlp((16,), 10)
  params = model.init(jax.random.PRNGKey(0), arrays["x"][:1])
  method = fedavg(classification_loss(model), client_lr=0.1,
                  schedule=LocalSchedule(batch_size=2, epochs=1))
  opts = training.TrainOptions(rounds=4, clients_per_round=3, seed=5, eval_every=0, progress=False)
  want, want_history = training.train(method, params, packed, opts=opts)
  got, got_history = streaming.run_streamed(method, params, lazy, rounds=4, clients_per_round=3,
                                            seed=5)
  assert int(got.round) == 4
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose([h["train_loss"] for h in got_history],
                             [h["train_loss"] for h in want_history], rtol=1e-6)
  assert [h["cohort_examples"] for h in got_history] == \
      [h["cohort_examples"] for h in want_history]
  assert not np.allclose(np.asarray(jax.tree.leaves(got.params)[0]),
                         np.asarray(jax.tree.leaves(params)[0]))  # it did train


def test_stream_errors():
  data = _population()
  state = ServerState((), (), jnp.asarray(0, jnp.int32), jnp.asarray(jax.random.PRNGKey(0),
                      jnp.uint32), (), {}, ())
  with pytest.raises(ValueError, match="layout"):
    streaming.CohortStream(data, state, 2, layout="dense")
  with pytest.raises(ValueError, match="larger than"):
    streaming.CohortStream(data, state, 20)
  with pytest.raises(ValueError, match="capacity"):
    streaming.pack_cohort(data, [0, 1, 2], data.max_client_size, capacity=2)


def test_sqlite_file_errors_name_the_file(tmp_path):
  from fedjax_lab import data as data_lib
  missing = str(tmp_path / "missing.sqlite")
  with pytest.raises(FileNotFoundError, match="missing.sqlite"):
    data_lib.load_federated(f"sqlite:{missing}", "natural")
  bad = tmp_path / "bad.sqlite"
  bad.write_bytes(b"not a database" * 200)
  with pytest.raises(ValueError, match=r"bad\.sqlite.* is not an SQLite database"):
    data_lib.load_federated(f"sqlite:{bad}", "natural")
