"""Federated data: packed client arrays, partitioners and built-in sources."""

from __future__ import annotations

import numpy as np

from fedjax_lab.data.federated import FederatedData, gather_cohort, train_test_split
from fedjax_lab.data.federated import _split_indices
from fedjax_lab.data.partitioners import dirichlet, iid
from fedjax_lab.data.sources import digits, synthetic, synthetic_models

__all__ = [
    "FederatedData", "gather_cohort", "train_test_split", "iid", "dirichlet", "digits",
    "synthetic", "synthetic_models", "load_federated", "DATA_NAMES", "PARTITION_NAMES",
]

DATA_NAMES = ("digits", "synthetic")
PARTITION_NAMES = ("iid", "dirichlet", "natural")


def _partition(labels, partition, num_clients, alpha, seed, min_partition_size):
    if partition == "iid":
        return iid(labels, num_clients, seed)
    return dirichlet(labels, num_clients, alpha, seed, min_partition_size=min_partition_size)


def load_federated(data: str = "digits", partition: str = "dirichlet", num_clients: int = 100,
                   alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.2,
                   min_partition_size: int = 2, synthetic_alpha: float = 1.0,
                   synthetic_beta: float = 1.0) -> tuple[FederatedData, dict[str, np.ndarray]]:
    """Loads a built-in dataset as (federated train set, centralized test set).

    digits: split train/test, then partition the train labels with ``iid`` or
    ``dirichlet(alpha)``. synthetic: FedProx Synthetic(synthetic_alpha,
    synthetic_beta) with ``num_clients`` users; ``"natural"`` keeps each user as a
    client, ``"iid"``/``"dirichlet"`` re-partition the train labels. The test set
    is a random ``test_fraction`` of all examples in both cases.

    Returns:
      ``(train, test)``: train is a FederatedData with ``num_clients`` clients and
      arrays ``x [n_train, ...]``, ``y int32 [n_train]``; test is
      ``{'x': [n_test, ...], 'y': [n_test]}``.
    """
    if data not in DATA_NAMES:
        raise ValueError(f"unknown data {data!r}; known names: {', '.join(DATA_NAMES)}")
    if partition not in PARTITION_NAMES:
        raise ValueError(f"unknown partition {partition!r}; known names: {', '.join(PARTITION_NAMES)}")
    # Independent seeds for generation, split and partition.
    gen_seed, split_seed, part_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))

    if data == "digits":
        if partition == "natural":
            raise ValueError("digits has no natural partition; use one of: iid, dirichlet")
        arrays, natural_ids = digits(), None
    else:
        if num_clients <= 0:
            raise ValueError(f"num_clients must be positive, got {num_clients} (zero clients)")
        arrays, natural_ids = synthetic(synthetic_alpha, synthetic_beta, num_clients=num_clients,
                                        seed=gen_seed)

    train_idx, test_idx = _split_indices(arrays["y"].shape[0], test_fraction, split_seed)
    train = {k: v[train_idx] for k, v in arrays.items()}
    test = {k: v[test_idx] for k, v in arrays.items()}
    if partition == "natural":
        ids = natural_ids[train_idx]
    else:
        ids = _partition(train["y"], partition, num_clients, alpha, part_seed, min_partition_size)
    return FederatedData.from_client_ids(train, ids, num_clients), test
