"""Partitioners: map each example to a client id (Flower Datasets semantics).

Each returns int64 ``[num_examples]`` client ids; pack them with
``FederatedData.from_client_ids``.
"""

from __future__ import annotations

import numpy as np


def _check_common(labels, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [num_examples], got shape {labels.shape}")
    if int(num_clients) != num_clients:
        raise ValueError(f"num_clients must be an integer, got {num_clients}")
    if num_clients <= 0:
        raise ValueError(f"num_clients must be positive, got {num_clients} (zero clients)")
    if num_clients > labels.shape[0]:
        raise ValueError(
            f"num_clients={num_clients} is more than the {labels.shape[0]} examples "
            f"(too many clients)")
    return labels


def iid(labels, num_clients: int, seed: int) -> np.ndarray:
    """Uniformly random partition into near-equal parts.

    Args:
      labels: ``[num_examples]`` (only its length is used).
      num_clients: number of clients, ``1 <= num_clients <= num_examples``.
      seed: numpy seed.

    Returns:
      int64 ``[num_examples]`` client ids; sizes differ by at most one (the first
      ``num_examples % num_clients`` clients hold one extra example).
    """
    labels = _check_common(labels, num_clients)
    n, k = labels.shape[0], int(num_clients)
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    ids = np.empty(n, dtype=np.int64)
    ids[np.random.default_rng(seed).permutation(n)] = np.repeat(np.arange(k), sizes)
    return ids


def dirichlet(labels, num_clients: int, alpha: float, seed: int, min_partition_size: int = 2,
              self_balancing: bool = False, max_tries: int = 100) -> np.ndarray:
    """Label-skewed partition: each class is split by Dirichlet proportions.

    For every class (sorted), proportions ``p ~ Dir(alpha * ones(num_clients))``
    decide how many of its examples each client gets (``floor(cumsum(p) * n_k)``
    cut points, as in Flower). With ``self_balancing``, clients already holding
    more than ``num_examples / num_clients`` examples get no share of later
    classes. The whole draw is repeated until every client holds at least
    ``min_partition_size`` examples.

    Args:
      labels: ``[num_examples]`` class labels (any sortable dtype).
      num_clients: number of clients, ``1 <= num_clients <= num_examples``.
      alpha: concentration > 0; small alpha gives strong label skew.
      seed: numpy seed.
      min_partition_size: minimum examples per client.
      self_balancing: cap clients at the average size as above.
      max_tries: number of draws before giving up.

    Returns:
      int64 ``[num_examples]`` client ids.
    """
    labels = _check_common(labels, num_clients)
    alpha = float(alpha)
    if not alpha > 0:  # also rejects NaN
        raise ValueError(f"alpha must be > 0 (Dirichlet concentration), got {alpha}")
    n, k = labels.shape[0], int(num_clients)
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")
    if min_partition_size * k > n:
        raise ValueError(
            f"min_partition_size={min_partition_size} x num_clients={k} exceeds the "
            f"{n} examples; lower min_partition_size or num_clients")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")

    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    class_rows = [np.flatnonzero(labels == c) for c in classes]
    avg = n / k
    ids = np.empty(n, dtype=np.int64)
    sizes = np.zeros(k, dtype=np.int64)
    for _ in range(max_tries):
        sizes[:] = 0
        for rows in class_rows:
            p = rng.dirichlet(np.full(k, alpha))
            if self_balancing:
                eligible = sizes <= avg  # Flower's rule: drop clients strictly above average
                p = np.where(eligible, p, 0.0)
                total = p.sum()
                # Tiny alpha can underflow every eligible share to 0; spread evenly then.
                p = p / total if total > 0 else eligible / eligible.sum()
            n_c = rows.shape[0]
            cuts = np.clip((np.cumsum(p) * n_c).astype(np.int64)[:-1], 0, n_c)
            counts = np.diff(np.concatenate([[0], cuts, [n_c]]))
            # Shuffle within the class so the split does not follow the source order.
            ids[rng.permutation(rows)] = np.repeat(np.arange(k), counts)
            sizes += counts
        if sizes.min() >= min_partition_size:
            return ids
    raise ValueError(
        f"dirichlet: after max_tries={max_tries} draws some client still had fewer than "
        f"min_partition_size={min_partition_size} examples (smallest: {sizes.min()}); "
        f"increase alpha (now {alpha}), lower num_clients (now {k}) or min_partition_size, "
        f"or raise max_tries")


def _rng_and_classes(labels, seed):
    """Numpy generator and, per sorted unique label, its rows in a random order."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    # Shuffled within each class so which rows land where does not follow the source order.
    return rng, classes, [rng.permutation(np.flatnonzero(labels == c)) for c in classes]


def _allocate_shards(class_sizes: np.ndarray, num_shards: int) -> np.ndarray:
    """Shards per class: one each, then each extra to the class whose shards are largest."""
    counts = np.ones(class_sizes.shape[0], dtype=np.int64)
    for _ in range(num_shards - counts.sum()):
        counts[np.argmax(class_sizes / counts)] += 1
    return counts


def shard(labels, num_clients: int, num_shards_per_partition: int | None, seed: int,
          shard_size: int | None = None) -> np.ndarray:
    """Pathological label skew of FedAvg: every client gets a few single-class shards.

    McMahan et al. (2017) sort the examples by label, cut them into shards and give
    each client ``num_shards_per_partition`` shards (2 shards of 300 MNIST digits for
    100 clients). Here every shard holds ONE class (a class is split into shards on
    its own), so a client sees at most as many classes as it has shards. Give either

    * ``num_shards_per_partition``: ``num_clients * num_shards_per_partition`` shards
      in all; each class gets one, and every further shard goes to the class whose
      shards are currently largest, so shard sizes are as even as the classes allow;
      or
    * ``shard_size`` (with ``num_shards_per_partition=None``): each class is cut into
      ``ceil(n_class / shard_size)`` shards (its last one smaller) and the shuffled
      shards are dealt round-robin, so clients hold ``floor`` or ``ceil`` of
      ``num_shards / num_clients`` shards.

    Unlike Flower's ``ShardPartitioner`` no example is dropped (Flower may drop an
    incomplete last shard) and no shard straddles two classes; on class sizes that
    divide evenly the two agree.

    Args:
      labels: ``[num_examples]`` class labels.
      num_clients: number of clients.
      num_shards_per_partition: shards per client, or None when ``shard_size`` is set.
      seed: numpy seed.
      shard_size: examples per shard (alternative to ``num_shards_per_partition``).

    Returns:
      int64 ``[num_examples]`` client ids.
    """
    labels = _check_common(labels, num_clients)
    n, k = labels.shape[0], int(num_clients)
    if (num_shards_per_partition is None) == (shard_size is None):
        raise ValueError(
            "shard needs exactly one of num_shards_per_partition and shard_size, got "
            f"num_shards_per_partition={num_shards_per_partition}, shard_size={shard_size}")
    rng, classes, class_rows = _rng_and_classes(labels, seed)
    class_sizes = np.array([r.shape[0] for r in class_rows], dtype=np.int64)
    if shard_size is not None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        per_class = -(-class_sizes // int(shard_size))  # ceil
        if per_class.sum() < k:
            raise ValueError(
                f"shard_size={shard_size} gives {per_class.sum()} shards, fewer than "
                f"num_clients={k}: some clients would be empty; lower shard_size")
    else:
        if num_shards_per_partition < 1:
            raise ValueError(f"num_shards_per_partition must be >= 1, got {num_shards_per_partition}")
        num_shards = k * int(num_shards_per_partition)
        if num_shards < classes.shape[0]:
            raise ValueError(
                f"{num_shards} shards (num_clients x num_shards_per_partition) cannot cover "
                f"the {classes.shape[0]} classes without mixing classes in a shard; raise "
                f"num_shards_per_partition or num_clients")
        if num_shards > n:
            raise ValueError(
                f"{num_shards} shards (num_clients x num_shards_per_partition) exceed the "
                f"{n} examples; lower num_shards_per_partition")
        per_class = _allocate_shards(class_sizes, num_shards)
    shards = [s for rows, m in zip(class_rows, per_class) for s in np.array_split(rows, m)]
    ids = np.full(n, -1, dtype=np.int64)  # -1 would mark an example left unassigned
    for position, shard_index in enumerate(rng.permutation(len(shards))):
        ids[shards[shard_index]] = position % k  # round-robin: sizes differ by at most one shard
    return ids


_CLASS_ASSIGNMENT_MODES = ("random", "deterministic", "first-deterministic")


def pathological(labels, num_clients: int, num_classes_per_partition: int, seed: int,
                 class_assignment_mode: str = "random", max_tries: int = 100) -> np.ndarray:
    """Each client holds exactly ``num_classes_per_partition`` classes (Flower semantics).

    Li, Diao, Chen, He. "Federated Learning on Non-IID Data Silos: An Experimental
    Study", ICDE 2022 (#C = k label skew). Classes (sorted) are given to clients by
    ``class_assignment_mode``:

    * ``"random"``: k distinct classes drawn per client;
    * ``"deterministic"``: client i gets classes ``(i + j) % C`` for ``j < k``;
    * ``"first-deterministic"``: class ``i % C`` plus ``k - 1`` random others.

    Then each class's examples are split evenly (``np.array_split``) among the clients
    holding it. Every example must be assigned, so a class no client drew is an
    error; the random modes redraw up to ``max_tries`` times before giving up.

    Returns:
      int64 ``[num_examples]`` client ids.
    """
    labels = _check_common(labels, num_clients)
    n, k = labels.shape[0], int(num_clients)
    if class_assignment_mode not in _CLASS_ASSIGNMENT_MODES:
        raise ValueError(f"unknown class_assignment_mode {class_assignment_mode!r}; choose one "
                         f"of {', '.join(_CLASS_ASSIGNMENT_MODES)}")
    rng, classes, class_rows = _rng_and_classes(labels, seed)
    num_classes = classes.shape[0]
    per = int(num_classes_per_partition)
    if not 1 <= per <= num_classes:
        raise ValueError(f"num_classes_per_partition must be in [1, {num_classes}] (the number "
                         f"of classes), got {num_classes_per_partition}")
    if k * per < num_classes:
        raise ValueError(
            f"{k} clients x {per} classes cannot cover all {num_classes} classes, so some "
            f"examples would have no client; raise num_clients or num_classes_per_partition")

    def draw() -> np.ndarray:  # [k, per] class indices
        if class_assignment_mode == "deterministic":
            return (np.arange(k)[:, None] + np.arange(per)[None, :]) % num_classes
        chosen = np.empty((k, per), dtype=np.int64)
        for i in range(k):
            if class_assignment_mode == "random":
                chosen[i] = rng.choice(num_classes, per, replace=False)
            else:
                first = i % num_classes
                others = np.delete(np.arange(num_classes), first)
                chosen[i] = np.concatenate([[first], rng.choice(others, per - 1, replace=False)])
        return chosen

    tries = 1 if class_assignment_mode == "deterministic" else max_tries
    for _ in range(tries):
        chosen = draw()
        holders = [np.flatnonzero((chosen == c).any(axis=1)) for c in range(num_classes)]
        unused = [classes[c].item() for c in range(num_classes) if holders[c].size == 0]
        if not unused:
            break
    else:
        raise ValueError(
            f"pathological: classes {unused[:10]} went to no client (mode "
            f"{class_assignment_mode!r}); use class_assignment_mode='first-deterministic' "
            f"with num_clients >= {num_classes}, or raise num_clients")
    ids = np.full(n, -1, dtype=np.int64)  # -1 would mark an example left unassigned
    for c, rows in enumerate(class_rows):
        if holders[c].size > rows.shape[0]:
            raise ValueError(
                f"class {classes[c]!r} has {rows.shape[0]} examples but {holders[c].size} "
                f"clients hold it; lower num_clients or num_classes_per_partition")
        for client, part in zip(holders[c], np.array_split(rows, holders[c].size)):
            ids[part] = client
    return ids


def size_partition(labels, num_clients: int, seed: int,
                   partition_id_to_size_fn) -> np.ndarray:
    """Quantity skew: client ``i`` gets a share proportional to ``fn(i + 1)``.

    Flower's ``IdToSizeFncPartitioner``: with ``u_i = fn(i)`` for ``i = 1..K``,
    client ``i - 1`` gets ``floor(n * u_i / sum(u))`` examples and the last client
    also takes the remainder. Examples are drawn in a random order (Flower cuts the
    dataset after shuffling it), so the label mix of every client is iid.

    Args:
      labels: ``[num_examples]`` (only its length is used).
      num_clients: number of clients K.
      seed: numpy seed.
      partition_id_to_size_fn: vectorised ``float [K] -> float [K]`` of ``1..K``.

    Returns:
      int64 ``[num_examples]`` client ids.
    """
    labels = _check_common(labels, num_clients)
    n, k = labels.shape[0], int(num_clients)
    units = np.asarray(partition_id_to_size_fn(np.linspace(1, k, k)), dtype=np.float64)
    if units.shape != (k,) or not np.all(np.isfinite(units)) or np.any(units < 0) or units.sum() <= 0:
        raise ValueError("partition_id_to_size_fn must map [1..K] to K finite, non-negative "
                         "numbers with a positive sum")
    sizes = (units / units.sum() * n).astype(np.int64)
    sizes[-1] += n - sizes.sum()
    if sizes.min() < 1:
        raise ValueError(
            f"with num_clients={k} and {n} examples the smallest client gets "
            f"{sizes.min()} examples (an empty client); lower num_clients")
    ids = np.full(n, -1, dtype=np.int64)  # -1 would mark an example left unassigned
    ids[np.random.default_rng(seed).permutation(n)] = np.repeat(np.arange(k), sizes)
    return ids


def linear(labels, num_clients: int, seed: int) -> np.ndarray:
    """Size skew ``n_i ~ i`` (Flower ``LinearPartitioner``); see ``size_partition``."""
    return size_partition(labels, num_clients, seed, lambda i: i)


def square(labels, num_clients: int, seed: int) -> np.ndarray:
    """Size skew ``n_i ~ i^2`` (Flower ``SquarePartitioner``); see ``size_partition``."""
    return size_partition(labels, num_clients, seed, np.square)


def exponential(labels, num_clients: int, seed: int) -> np.ndarray:
    """Size skew ``n_i ~ e^i`` (Flower ``ExponentialPartitioner``); see ``size_partition``."""
    # e^(i - K) has the same ratios as e^i and does not overflow for large K.
    return size_partition(labels, num_clients, seed, lambda i: np.exp(i - i[-1]))


def natural_id(natural_ids) -> tuple[np.ndarray, np.ndarray]:
    """One client per distinct natural id (writer, speaker, user), as Flower's ``NaturalIdPartitioner``.

    Args:
      natural_ids: ``[num_examples]`` ids of any sortable dtype (str, bytes, int).

    Returns:
      ``(client_ids, names)``: int64 ``[num_examples]`` and the sorted distinct ids
      ``[num_clients]``; client ``i`` is ``names[i]``.
    """
    natural_ids = np.asarray(natural_ids)
    if natural_ids.ndim != 1 or natural_ids.shape[0] == 0:
        raise ValueError(f"natural_ids must be a non-empty 1-D array, got shape {natural_ids.shape}")
    names, ids = np.unique(natural_ids, return_inverse=True)
    return ids.astype(np.int64).reshape(-1), names


def inner_dirichlet(labels, partition_sizes, alpha, seed: int) -> np.ndarray:
    """Clients of given sizes whose label mixes follow Dirichlet priors (Flower semantics).

    Acar et al. "Federated Learning Based on Dynamic Regularization", ICLR 2021.
    Client ``i`` draws a class prior ``q_i ~ Dir(alpha)``; then, one example at a
    time, a client that is not yet full is picked uniformly and a class is drawn
    from its prior (classes already used up get probability 0, the rest are
    renormalised), and one remaining example of that class is assigned to it.

    Args:
      labels: ``[num_examples]`` class labels.
      partition_sizes: int ``[num_clients]``; must sum to ``num_examples`` (so
        every example is assigned exactly once); zeros are allowed.
      alpha: a positive scalar, or one positive value per class (sorted labels).
      seed: numpy seed.

    Returns:
      int64 ``[num_examples]`` client ids; client ``i`` holds exactly
      ``partition_sizes[i]`` examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [num_examples], got shape {labels.shape}")
    sizes = np.asarray(partition_sizes)
    if sizes.ndim != 1 or sizes.shape[0] == 0 or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"partition_sizes must be a non-empty 1-D integer array, got {partition_sizes!r}")
    if np.any(sizes < 0):
        raise ValueError("partition_sizes must be >= 0")
    n, k = labels.shape[0], sizes.shape[0]
    if sizes.sum() != n:
        raise ValueError(f"partition_sizes sum to {sizes.sum()} but there are {n} examples; "
                         f"they must be equal so every example is assigned once")
    rng, classes, class_rows = _rng_and_classes(labels, seed)
    num_classes = classes.shape[0]
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.ndim == 0:
        alpha = np.full(num_classes, float(alpha))
    if alpha.shape != (num_classes,):
        raise ValueError(f"alpha must be a scalar or have one entry per class ({num_classes}), "
                         f"got shape {alpha.shape}")
    if not np.all(alpha > 0):  # also rejects NaN
        raise ValueError(f"alpha must be > 0 (Dirichlet concentration), got {alpha}")
    priors = rng.dirichlet(alpha, size=k)  # [k, C]
    left_in_class = np.array([r.shape[0] for r in class_rows], dtype=np.int64)
    left_in_client = sizes.astype(np.int64).copy()
    open_clients = [i for i in range(k) if left_in_client[i] > 0]
    ids = np.full(n, -1, dtype=np.int64)  # -1 would mark an example left unassigned
    for u_client, u_class in rng.random((n, 2)):
        slot = int(u_client * len(open_clients))
        client = open_clients[slot]
        available = left_in_class > 0
        cdf = np.cumsum(priors[client] * available)
        if cdf[-1] <= 0:  # all of this client's prior mass is on used-up classes
            cdf = np.cumsum(available.astype(np.float64))
        # First class whose cdf exceeds the draw: never one with zero probability.
        c = int(np.searchsorted(cdf, u_class * cdf[-1], side="right"))
        if c >= num_classes or not available[c]:  # float rounding at the top of the cdf
            c = int(np.flatnonzero(available)[-1])
        left_in_class[c] -= 1
        ids[class_rows[c][left_in_class[c]]] = client
        left_in_client[client] -= 1
        if left_in_client[client] == 0:
            open_clients[slot] = open_clients[-1]
            open_clients.pop()
    return ids


# ------------------------------------------------- within-client splits, held-out clients


def within_client_split(client_ids, test_fraction: float, seed: int) -> np.ndarray:
    """Each client's own train / test split (personalized FL evaluates on it).

    Client i with n_i examples puts ``round(n_i * test_fraction)`` of them, at random,
    in its test split, but keeps at least one for training when n_i >= 2.

    Args:
      client_ids: int ``[num_examples]`` client ids (a partitioner's output).
      test_fraction: share of each client's examples held out, in ``[0, 1)``.
      seed: numpy seed.

    Returns:
      bool ``[num_examples]``: True for the rows in their client's test split.
    """
    client_ids = np.asarray(client_ids)
    if client_ids.ndim != 1:
        raise ValueError(f"client_ids must be 1-D, got shape {client_ids.shape}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = np.zeros(client_ids.shape[0], bool)
    for client in np.unique(client_ids):
        rows = rng.permutation(np.flatnonzero(client_ids == client))
        n_test = int(round(rows.shape[0] * float(test_fraction)))
        n_test = min(n_test, max(rows.shape[0] - 1, 0))
        test[rows[:n_test]] = True
    return test


def held_out_clients(num_clients: int, count: int, seed: int) -> np.ndarray:
    """``count`` client ids drawn at random (sorted) that never train.

    The participation gap compares the global model on them with the participating
    clients' own test splits (Yuan et al., ICLR 2022).
    """
    if not 0 <= int(count) < int(num_clients):
        raise ValueError(f"held_out_clients must be in [0, num_clients={num_clients}), got {count} "
                         f"(at least one client must train)")
    return np.sort(np.random.default_rng(seed).permutation(int(num_clients))[:int(count)])
