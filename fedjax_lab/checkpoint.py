"""Orbax checkpoints of the full server state (params, optimizer, round, RNG, client states)."""
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint directory could not be read; nothing in it was changed."""


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

  def save(self, round_: int, state) -> None:
    self._manager.save(round_, args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()

  def restore(self, template, round_: Optional[int] = None):
    """Restores into the structure of ``template``; raises CheckpointError if unreadable."""
    step = self.latest_round() if round_ is None else round_
    if step is None:
      raise CheckpointError(f"No checkpoint found in {self.directory}.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise CheckpointError(
          f"Checkpoint for round {step} in {self.directory} is corrupt or does not match "
          f"this run's state ({type(e).__name__}: {e}). The directory was left untouched; "
          f"move it away or use a new --workdir to start afresh.") from e

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
