"""Packed federated datasets and cohort gathering.

All examples live in one set of arrays sorted by client, plus ``client_offsets``;
client ``i`` owns rows ``offsets[i]:offsets[i + 1]``. Picking a cohort is then a
single gather that can run inside ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def _check_lengths(arrays: Mapping[str, np.ndarray], expected: int | None = None) -> int:
    """Returns the common leading length of ``arrays``; ValueError if they differ."""
    if not arrays:
        raise ValueError("arrays is empty: need at least one named array")
    lengths = {name: np.shape(a)[0] if np.ndim(a) else None for name, a in arrays.items()}
    if any(n is None for n in lengths.values()):
        scalars = [k for k, n in lengths.items() if n is None]
        raise ValueError(f"arrays must have a leading example axis; scalar entries: {scalars}")
    distinct = set(lengths.values())
    if len(distinct) != 1:
        raise ValueError(f"arrays have different numbers of examples: {lengths}")
    (n,) = distinct
    if expected is not None and n != expected:
        raise ValueError(
            f"arrays have {n} examples but {expected} were expected "
            f"(client_ids / client_offsets length mismatch)")
    return int(n)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays don't compare/hash as values
class FederatedData:
    """Examples of all clients packed into shared arrays.

    Attributes:
      arrays: name -> array ``[num_examples, ...]``, rows sorted by client.
      client_offsets: int64 ``[num_clients + 1]``; client ``i`` owns rows
        ``client_offsets[i]:client_offsets[i + 1]``.
    """

    arrays: Mapping[str, np.ndarray]
    client_offsets: np.ndarray

    def __post_init__(self):
        arrays = {k: np.asarray(v) for k, v in self.arrays.items()}
        offsets = np.asarray(self.client_offsets)
        if offsets.ndim != 1 or offsets.shape[0] < 1:
            raise ValueError(f"client_offsets must be 1-D with >= 1 entry, got shape {offsets.shape}")
        if not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(f"client_offsets must be integers, got dtype {offsets.dtype}")
        offsets = offsets.astype(np.int64)
        if offsets[0] != 0:
            raise ValueError(f"client_offsets must start at 0, got {offsets[0]}")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("client_offsets must be non-decreasing")
        _check_lengths(arrays, expected=int(offsets[-1]))
        object.__setattr__(self, "arrays", arrays)
        object.__setattr__(self, "client_offsets", offsets)

    @property
    def num_clients(self) -> int:
        return int(self.client_offsets.shape[0] - 1)

    @property
    def num_examples(self) -> int:
        return int(self.client_offsets[-1])

    @property
    def client_sizes(self) -> np.ndarray:
        """int64 ``[num_clients]``: examples per client."""
        return np.diff(self.client_offsets)

    @property
    def max_client_size(self) -> int:
        return int(self.client_sizes.max()) if self.num_clients else 0

    def client(self, i: int) -> dict[str, np.ndarray]:
        """Rows of client ``i``: name -> ``[client_sizes[i], ...]`` (views, no copy)."""
        i = int(i)
        if not 0 <= i < self.num_clients:
            raise IndexError(f"client {i} out of range [0, {self.num_clients})")
        lo, hi = self.client_offsets[i], self.client_offsets[i + 1]
        return {k: v[lo:hi] for k, v in self.arrays.items()}

    @classmethod
    def from_client_ids(cls, arrays: Mapping[str, np.ndarray], client_ids: np.ndarray,
                        num_clients: int) -> "FederatedData":
        """Packs examples by client id.

        Args:
          arrays: name -> array ``[num_examples, ...]`` in any order.
          client_ids: int ``[num_examples]``, each in ``[0, num_clients)``.
          num_clients: number of clients (clients may be empty).

        Returns:
          FederatedData whose rows are stably sorted by client id, so each client
          keeps its examples in their original relative order.
        """
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        client_ids = np.asarray(client_ids)
        num_clients = int(num_clients)
        if num_clients <= 0:
            raise ValueError(f"num_clients must be positive, got {num_clients} (zero clients)")
        if client_ids.ndim != 1:
            raise ValueError(f"client_ids must be 1-D, got shape {client_ids.shape}")
        if client_ids.size and not np.issubdtype(client_ids.dtype, np.integer):
            raise ValueError(f"client_ids must be integers, got dtype {client_ids.dtype}")
        n = _check_lengths(arrays, expected=client_ids.shape[0])
        client_ids = client_ids.astype(np.int64)
        if n and (client_ids.min() < 0 or client_ids.max() >= num_clients):
            bad = client_ids[(client_ids < 0) | (client_ids >= num_clients)]
            raise ValueError(
                f"client_ids must lie in [0, {num_clients}); found out-of-range ids "
                f"{np.unique(bad)[:10].tolist()}")
        order = np.argsort(client_ids, kind="stable")
        counts = np.bincount(client_ids, minlength=num_clients)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls({k: v[order] for k, v in arrays.items()}, offsets)

    def device_arrays(self) -> tuple[dict[str, jax.Array], jax.Array]:
        """Returns ``(arrays as jnp, client_offsets as int32 [num_clients + 1])`` for gather_cohort."""
        if self.num_examples >= np.iinfo(np.int32).max:
            raise ValueError(f"{self.num_examples} examples do not fit int32 offsets; stream cohorts instead")
        return ({k: jnp.asarray(v) for k, v in self.arrays.items()},
                jnp.asarray(self.client_offsets, dtype=jnp.int32))


def _cohort_rows(client_offsets, cohort_ids, max_examples: int) -> tuple[jax.Array, jax.Array]:
    """(first row, size capped at ``max_examples``; 0 for padding ids) of each client."""
    offsets = jnp.asarray(client_offsets).astype(jnp.int32)
    ids = jnp.asarray(cohort_ids).astype(jnp.int32)
    num_clients = offsets.shape[0] - 1
    valid = (ids >= 0) & (ids < num_clients)
    safe = jnp.clip(ids, 0, max(num_clients - 1, 0))
    start = jnp.take(offsets, safe, mode="clip")
    stop = jnp.take(offsets, safe + 1, mode="clip")
    return start, jnp.where(valid, jnp.minimum(stop - start, max_examples), 0).astype(jnp.int32)


def cohort_sizes(client_offsets: jax.Array, cohort_ids: jax.Array, max_examples: int) -> jax.Array:
    """The ``sizes`` of ``gather_cohort(arrays, client_offsets, cohort_ids, max_examples)``
    without gathering the rows."""
    return _cohort_rows(client_offsets, cohort_ids, int(max_examples))[1]


def gather_cohort(arrays: Mapping[str, jax.Array], client_offsets: jax.Array,
                  cohort_ids: jax.Array, max_examples: int) -> tuple[dict[str, jax.Array], jax.Array]:
    """Gathers a padded cohort from packed arrays (pure jnp; jit/vmap-safe).

    Args:
      arrays: name -> ``[num_examples, ...]``, rows sorted by client.
      client_offsets: int ``[num_clients + 1]``.
      cohort_ids: int ``[C]``. The value ``num_clients`` marks a padding client
        (size 0, all rows zero); so does any other out-of-range id.
      max_examples: static row budget per client. Larger clients are truncated to
        their first ``max_examples`` rows.

    Returns:
      ``(cohort, sizes)``: cohort maps name -> ``[C, max_examples, ...]`` where row
      ``j`` of client ``c`` is ``arrays[offsets[id] + j]`` for ``j < sizes[c]`` and
      zeros otherwise; ``sizes`` is int32 ``[C]`` (already capped at max_examples).
    """
    max_examples = int(max_examples)
    start, sizes = _cohort_rows(client_offsets, cohort_ids, max_examples)
    j = jnp.arange(max_examples, dtype=jnp.int32)
    mask = j[None, :] < sizes[:, None]  # [C, max_examples]
    cohort = {}
    for name, a in arrays.items():
        a = jnp.asarray(a)
        last = max(a.shape[0] - 1, 0)
        # Clipped indices keep the gather in bounds; the mask zeroes what they fetched.
        rows = jnp.clip(start[:, None] + j[None, :], 0, last)
        g = jnp.take(a, rows, axis=0, mode="clip")
        m = mask.reshape(mask.shape + (1,) * (g.ndim - 2))
        cohort[name] = jnp.where(m, g, jnp.zeros((), g.dtype))
    return cohort, sizes


def _split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, test) row indices, each sorted ascending."""
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = int(round(n * float(test_fraction)))
    if n_test >= n:
        raise ValueError(f"test_fraction={test_fraction} leaves no training examples out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    # Sorted so both splits keep the source order (deterministic, easy to inspect).
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def train_test_split(arrays: Mapping[str, np.ndarray], test_fraction: float,
                     seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random split of examples.

    Args:
      arrays: name -> ``[n, ...]``.
      test_fraction: share of examples in the test split, in ``[0, 1)``;
        the test split gets ``round(n * test_fraction)`` rows.
      seed: numpy seed for the permutation.

    Returns:
      ``(train, test)`` dicts with the same names, ``[n_train, ...]`` and ``[n_test, ...]``.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = _check_lengths(arrays)
    train_idx, test_idx = _split_indices(n, test_fraction, seed)
    return ({k: v[train_idx] for k, v in arrays.items()},
            {k: v[test_idx] for k, v in arrays.items()})
