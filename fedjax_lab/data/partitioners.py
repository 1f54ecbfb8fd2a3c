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
