"""Orbax checkpoints of the full server state (params, optimizer, round, RNG, client states).

Leaves are saved by orbax and come back as they went in: ``jax.Array`` leaves as
arrays on the default device, numpy leaves (a client-state table kept on the host)
as numpy. ``np.memmap`` leaves (a table in files, larger than host memory) do not go
through orbax: each is copied to ``<directory>/host_tables/<round>/leaf_<k>.npy``
(all-zero blocks skipped, so copies stay sparse) before the orbax step is written,
and a restore copies them back into the memmaps of the template, in place. A
round's table files are removed when orbax drops the round (``max_to_keep``). A
table saved in one form restores into another (device, numpy or memmap template).
"""
import os
import shutil
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

HOST_TABLES = "host_tables"
_BLOCK_BYTES = 64 << 20   # rows copied at a time between memmaps


class CheckpointError(RuntimeError):
  """A checkpoint directory could not be read; nothing in it was changed."""


def _copy_rows(src: np.ndarray, dst: np.ndarray) -> None:
  """``dst[...] = src`` block by block, skipping blocks that are zero in both (sparse files)."""
  row_bytes = max(int(np.prod(src.shape[1:])) * src.dtype.itemsize, 1)
  step = max(1, _BLOCK_BYTES // row_bytes)
  for start in range(0, src.shape[0], step):
    block = src[start:start + step]
    if np.any(block) or np.any(dst[start:start + step]):
      dst[start:start + step] = block


def _is_none(x) -> bool:
  return x is None


def _without_memmaps(tree):
  """``(tree with None for every np.memmap leaf, the memmaps in leaf order)``."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_none)
  memmaps = [x for x in leaves if isinstance(x, np.memmap)]
  kept = [None if isinstance(x, np.memmap) else x for x in leaves]
  return jax.tree.unflatten(treedef, kept), memmaps


class Checkpointer:
  """Saves and restores ``ServerState`` pytrees under ``directory``, step = round."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f"Checkpoint path {self.directory} exists and is not a directory.")
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
    except Exception as e:  # orbax raises many types for unreadable directories
      raise CheckpointError(f"Could not open checkpoint directory {self.directory}: {e}") from e

  def latest_round(self) -> Optional[int]:
    return self._manager.latest_step()

  def _tables_dir(self, round_: int) -> str:
    return os.path.join(self.directory, HOST_TABLES, str(round_))

  def save(self, round_: int, state) -> None:
    """Saves ``state`` as step ``round_`` (a round already saved is left as it is)."""
    if round_ in self._manager.all_steps():
      return
    tree, memmaps = _without_memmaps(state)
    if memmaps:
      # Table files first: an orbax step on disk always has its table next to it.
      final = self._tables_dir(round_)
      partial = final + ".partial"
      shutil.rmtree(partial, ignore_errors=True)
      os.makedirs(partial)
      for k, table in enumerate(memmaps):
        table.flush()
        copy = np.lib.format.open_memmap(os.path.join(partial, f"leaf_{k}.npy"), mode="w+",
                                         dtype=table.dtype, shape=table.shape)
        _copy_rows(table, copy)
        copy.flush()
        del copy
      shutil.rmtree(final, ignore_errors=True)
      os.rename(partial, final)
    self._manager.save(round_, args=ocp.args.StandardSave(tree))
    self._manager.wait_until_finished()
    self._prune_tables()

  def _prune_tables(self) -> None:
    root = os.path.join(self.directory, HOST_TABLES)
    if not os.path.isdir(root):
      return
    kept = {str(step) for step in self._manager.all_steps()}
    for name in os.listdir(root):
      if name not in kept:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)

  def restore(self, template, round_: Optional[int] = None):
    """Restores into the structure of ``template``; raises CheckpointError if unreadable.

    ``np.memmap`` leaves of ``template`` are filled in place and returned as they are;
    numpy leaves come back as new numpy arrays, other leaves as ``jax.Array``. A table
    may change form between save and restore (device, numpy, memmap files); going to
    or from files then passes the table through host memory once.
    """
    step = self.latest_round() if round_ is None else round_
    if step is None:
      raise CheckpointError(f"No checkpoint found in {self.directory}.")
    leaves, treedef = jax.tree.flatten(template, is_leaf=_is_none)
    tables = self._tables_dir(step)
    in_files = os.path.isdir(tables)

    def abstract(x):
      if x is None or (isinstance(x, np.memmap) and in_files):
        return None   # not read by orbax
      if isinstance(x, np.memmap):   # a numpy template (restores numpy) that takes no memory
        return np.lib.stride_tricks.as_strided(np.zeros((), x.dtype), x.shape,
                                               (0,) * x.ndim)
      if type(x) is np.ndarray:   # pylint: disable=unidiomatic-typecheck
        return x                  # restores as numpy: a host table stays on the host
      return ocp.utils.to_shape_dtype_struct(x)

    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(
          jax.tree.unflatten(treedef, [abstract(x) for x in leaves])))
      restored_leaves = jax.tree.flatten(restored, is_leaf=_is_none)[0]
      if len(restored_leaves) != len(leaves):
        raise ValueError(f"{len(restored_leaves)} leaves saved, {len(leaves)} expected")
    except Exception as e:
      raise CheckpointError(
          f"Checkpoint for round {step} in {self.directory} is corrupt or does not match "
          f"this run's state ({type(e).__name__}: {e}). The directory was left untouched; "
          f"move it away or use a new --workdir to start afresh.") from e
    # Leaves that orbax did not hold were saved as table files, in leaf order.
    missing = [i for i, (r, t) in enumerate(zip(restored_leaves, leaves))
               if r is None and t is not None]
    for k, index in enumerate(missing):
      path = os.path.join(tables, f"leaf_{k}.npy")
      try:
        saved = np.load(path, mmap_mode="r")
      except (OSError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint for round {step} in {self.directory} lacks its client-state table "
            f"file {path} ({type(e).__name__}: {e}); move the directory away or use a new "
            "--workdir to start afresh.") from e
      target = leaves[index]
      if saved.shape != target.shape or saved.dtype != target.dtype:
        raise CheckpointError(
            f"Client-state table file {path} holds {saved.dtype}{list(saved.shape)}, this "
            f"run's table {target.dtype}{list(target.shape)}.")
      if isinstance(target, np.memmap):
        _copy_rows(saved, target)
        target.flush()
        restored_leaves[index] = target
      elif type(target) is np.ndarray:   # pylint: disable=unidiomatic-typecheck
        restored_leaves[index] = np.array(saved)
      else:
        restored_leaves[index] = jax.numpy.asarray(saved)
    for index, target in enumerate(leaves):   # orbax read these for memmap leaves
      if isinstance(target, np.memmap) and restored_leaves[index] is not target:
        _copy_rows(restored_leaves[index], target)
        target.flush()
        restored_leaves[index] = target
    return jax.tree.unflatten(treedef, restored_leaves)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
