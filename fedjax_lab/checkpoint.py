"""Orbax checkpoints of the full server state (params, optimizer, round, RNG, client states).

Leaves are saved by orbax and come back as they went in: ``jax.Array`` leaves as
arrays on the default device, numpy leaves (a client-state table kept on the host)
as numpy. ``np.memmap`` leaves (a table in files, larger than host memory) do not go
through orbax: each is copied to ``<directory>/host_tables/<round>/leaf_<k>.npy``
(all-zero blocks skipped, so copies stay sparse) before the orbax step is written,
and a restore copies them back into the memmaps of the template, in place. A
round's table files are removed when orbax drops the round (``max_to_keep``). A
table saved in one form restores into another (device, numpy or memmap template).

Every save is verified: once orbax has finished writing round r, a SHA-256 of the saved
leaves (values, dtypes, shapes; memmap tables excepted) goes to
``<directory>/digests/<r>.json``, and a restore recomputes it. ``restore_latest_valid``
takes the newest checkpoint that reads back and matches its digest: a corrupt or
unreadable newer one is moved aside to ``<directory>.corrupt/<r>-<time>`` (never
deleted), with one line saying which and why.

Saves are asynchronous when every leaf is a ``jax.Array`` (immutable, so training may go
on while orbax writes): ``save`` returns once orbax holds its host copy, and the digest is
written when the write completes (at the next save, restore or ``close``). A state with
numpy or memmap tables, which the loop updates in place, is saved synchronously.
"""
import datetime
import hashlib
import json
import os
import shutil
import sys
from typing import Optional

import jax
import numpy as np

HOST_TABLES = "host_tables"
DIGESTS = "digests"
_BLOCK_BYTES = 64 << 20   # rows copied at a time between memmaps


def _ocp():
  """orbax.checkpoint, imported when a run first checkpoints (its import is a quarter
  of a second of every run's start-up, most of which never checkpoint)."""
  import orbax.checkpoint as ocp
  return ocp


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


def digest(tree) -> str:
  """SHA-256 of a state's leaves in order (dtype, shape and bytes; memmaps skipped)."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    if isinstance(x, np.memmap):
      continue
    a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


class Checkpointer:
  """Saves and restores ``ServerState`` pytrees under ``directory``, step = round."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f"Checkpoint path {self.directory} exists and is not a directory.")
    try:
      ocp = _ocp()
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
    except Exception as e:  # orbax raises many types for unreadable directories
      raise CheckpointError(f"Could not open checkpoint directory {self.directory}: {e}") from e
    self._pending = None   # (round, digest) of a save orbax is still writing

  def latest_round(self) -> Optional[int]:
    self.wait_until_finished()
    return self._manager.latest_step()

  def wait_until_finished(self) -> None:
    """Blocks until the last save is on disk, then writes its digest."""
    self._manager.wait_until_finished()
    if self._pending is not None:
      round_, sha = self._pending
      self._pending = None
      self._write_digest(round_, sha)

  def _write_digest(self, round_: int, sha: str) -> None:
    # Written only once the step is complete on disk: a digest always names a whole step.
    os.makedirs(os.path.join(self.directory, DIGESTS), exist_ok=True)
    path = self._digest_path(round_)
    with open(path + ".tmp", "w") as f:
      json.dump({"round": round_, "sha256": sha}, f)
    os.replace(path + ".tmp", path)
    self._prune_tables()

  def _tables_dir(self, round_: int) -> str:
    return os.path.join(self.directory, HOST_TABLES, str(round_))

  def save(self, round_: int, state) -> None:
    """Saves ``state`` as step ``round_`` (a round already saved is left as it is)."""
    self.wait_until_finished()
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
    self._manager.save(round_, args=_ocp().args.StandardSave(tree))
    self._pending = (round_, digest(tree))
    if memmaps or not all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)):
      self.wait_until_finished()

  def _digest_path(self, round_: int) -> str:
    return os.path.join(self.directory, DIGESTS, f"{round_}.json")

  def saved_digest(self, round_: int) -> Optional[str]:
    """The digest written after round ``round_``'s save (None: none was written)."""
    try:
      with open(self._digest_path(round_)) as f:
        return json.load(f)["sha256"]
    except (OSError, ValueError, KeyError):
      return None

  def _set_aside(self, round_: int) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = os.path.join(self.directory + ".corrupt", f"{round_}-{stamp}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(round_)), target)
    if os.path.exists(self._digest_path(round_)):
      shutil.move(self._digest_path(round_), os.path.join(target, "digest.json"))
    self._manager.reload()
    return target

  def restore_latest_valid(self, template):
    """``(state, round)`` from the newest checkpoint that restores and matches its digest.

    Newer checkpoints that fail are moved aside (``<directory>.corrupt``) with one line
    each on stderr. Raises CheckpointError (naming every round tried and why) if none
    is usable.
    """
    self.wait_until_finished()
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self.restore(template, step)
      except CheckpointError as e:
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        reason = f"corrupt or unreadable: {type(cause).__name__}: {first}"
      else:
        expected = self.saved_digest(step)
        if expected is None or expected == digest(_without_memmaps(state)[0]):
          for bad, why in failures:
            where = self._set_aside(bad)
            print(f"warning: checkpoint round {bad} in {self.directory} is unusable ({why}); "
                  f"moved to {where}; resuming from round {step}.", file=sys.stderr)
          return state, step
        reason = "its content does not match the digest written when it was saved"
      failures.append((step, reason))
    tried = "; ".join(f"round {s}: {why}" for s, why in failures)
    raise CheckpointError(f"No usable checkpoint in {self.directory} ({tried}). Nothing was "
                          f"changed; use a new --workdir to start afresh.")

  def _prune_tables(self) -> None:
    kept = {str(step) for step in self._manager.all_steps()}
    root = os.path.join(self.directory, HOST_TABLES)
    for name in os.listdir(root) if os.path.isdir(root) else ():
      if name not in kept:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    digests = os.path.join(self.directory, DIGESTS)
    for name in os.listdir(digests) if os.path.isdir(digests) else ():
      if name.split(".")[0] not in kept:
        os.remove(os.path.join(digests, name))

  def restore(self, template, round_: Optional[int] = None):
    """Restores into the structure of ``template``; raises CheckpointError if unreadable.

    ``np.memmap`` leaves of ``template`` are filled in place and returned as they are;
    numpy leaves come back as new numpy arrays, other leaves as ``jax.Array``. A table
    may change form between save and restore (device, numpy, memmap files); going to
    or from files then passes the table through host memory once.
    """
    self.wait_until_finished()
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
      if isinstance(x, np.generic):   # a numpy scalar (orbax has no such type)
        return _ocp().utils.to_shape_dtype_struct(jax.numpy.asarray(x))
      return _ocp().utils.to_shape_dtype_struct(x)

    try:
      restored = self._manager.restore(step, args=_ocp().args.StandardRestore(
          jax.tree.unflatten(treedef, [abstract(x) for x in leaves])))
      restored_leaves = jax.tree.flatten(restored, is_leaf=_is_none)[0]
      if len(restored_leaves) != len(leaves):
        raise ValueError(f"{len(restored_leaves)} leaves saved, {len(leaves)} expected")
    except Exception as e:
      first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
      raise CheckpointError(
          f"Checkpoint for round {step} in {self.directory} is corrupt or does not match "
          f"this run's state ({type(e).__name__}: {first}). The directory was left "
          f"untouched; use a new --workdir to start afresh.") from e
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
    self.wait_until_finished()
    self._manager.close()
