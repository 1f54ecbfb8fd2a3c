"""Evaluation of the global model and metric logs (JSONL)."""
import json
import math
import os
import sys
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import attacks as attacks_lib
from fedjax_lab.models import Model


def chunked_sums(fn: Callable, arrays: Mapping, batch_size: int) -> dict:
  """``fn``'s sums over ``arrays`` in chunks of ``batch_size`` rows (padded, masked).

  The one batched evaluation loop: every evaluator is a ``fn(batch, mask, index) ->
  {name: sum over the chunk}`` whose ``mask`` bool ``[batch_size]`` marks the real rows
  (padding rows are zeros) and ``index`` is the chunk's number (e.g. for a key).
  Chunks run one after another (``lax.map``), so memory stays bounded.

  Returns:
    ``{name: total over all rows}``.
  """
  n = jax.tree.leaves(arrays)[0].shape[0]
  chunks = max(math.ceil(n / batch_size), 1)
  pad = chunks * batch_size - n

  def split(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((chunks, batch_size) + a.shape[1:])

  batches = {k: split(v) for k, v in arrays.items()}
  masks = (jnp.arange(chunks * batch_size) < n).reshape(chunks, batch_size)
  sums = jax.lax.map(lambda args: fn(*args), (batches, masks, jnp.arange(chunks)))
  return {k: jnp.sum(v) for k, v in sums.items()}


def classification_sums(logits: jax.Array, y: jax.Array, mask: jax.Array) -> dict:
  """Summed cross-entropy and correct predictions of the masked rows."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return {"loss": jnp.sum(jnp.where(mask, loss, 0.0)),
          "accuracy": jnp.sum((jnp.argmax(logits, -1) == y) & mask)}


def make_evaluator(model: Model, batch_size: int = 1024):
  """Returns jitted ``evaluate(params, arrays) -> {'accuracy', 'loss'}``.

  ``arrays`` holds ``'x'`` and integer ``'y'``; examples are processed in chunks of
  ``batch_size`` (padded and masked) so memory stays bounded.
  """
  @jax.jit
  def evaluate(params, arrays):
    def chunk(batch, mask, index):
      del index
      return classification_sums(model.apply(params, batch["x"]), batch["y"], mask)

    sums = chunked_sums(chunk, {"x": arrays["x"], "y": arrays["y"]}, batch_size)
    n = arrays["x"].shape[0]
    return {"accuracy": sums["accuracy"] / n, "loss": sums["loss"] / n}

  return evaluate


def robust_attacks(eps: float, norm: str = "linf", pgd_steps: int = 20,
                   pgd_step_size: Optional[float] = None, rand_init: bool = True,
                   fgsm: bool = True, clip_min: Optional[float] = 0.0,
                   clip_max: Optional[float] = 1.0) -> dict:
  """The standard white-box evaluation: ``{'fgsm': FGSM, 'pgd<k>': PGD-k}`` at radius ``eps``.

  ``pgd_step_size`` defaults to ``eps / 8``: PGD-20 then travels 2.5 eps in total,
  enough to cross the ball from a random start. FGSM is one step of size eps.
  """
  if pgd_steps < 1:
    raise ValueError(f"pgd_steps must be >= 1 for robust evaluation, got {pgd_steps}.")
  step = eps / 8 if pgd_step_size is None else pgd_step_size
  result = {}
  if fgsm:
    result["fgsm"] = attacks_lib.fgsm(eps, norm, clip_min, clip_max)
  result[f"pgd{pgd_steps}"] = attacks_lib.PGD(eps, step, pgd_steps, norm, rand_init,
                                               clip_min, clip_max)
  return result


def make_robust_evaluator(model: Model, attacks: Mapping[str, Callable],
                          robust: Optional[str] = None, batch_size: int = 1024,
                          seed: int = 0):
  """Returns ``evaluate(params, arrays, rng=None)``: clean and attacked accuracy of a model.

  For each ``name, attack`` in ``attacks`` (e.g. ``robust_attacks(0.2)``) the test
  inputs are attacked white-box against the model's softmax cross-entropy, and
  the result holds ``'<name>_accuracy'``; ``'robust_accuracy'`` is the accuracy
  under ``attacks[robust]`` (default: the last attack, the strongest by convention).
  ``'accuracy'`` and ``'loss'`` are the clean ones, as ``make_evaluator`` reports.

  Examples are processed in chunks of ``batch_size`` (padded, masked); chunk c uses
  the key ``fold_in(rng, c)`` for the attacks' random starts, and ``rng`` defaults to
  ``PRNGKey(seed)``, so repeated evaluations of the same params agree.
  """
  if not attacks:
    raise ValueError("make_robust_evaluator needs at least one attack.")
  names = list(attacks)
  robust = names[-1] if robust is None else robust
  if robust not in attacks:
    raise ValueError(f"robust={robust!r} is not one of the attacks: {', '.join(names)}.")

  @jax.jit
  def evaluate_with_key(params, arrays, rng):
    def chunk(batch, mask, index):
      xb, yb = batch["x"], batch["y"]
      example_loss = lambda inputs: optax.softmax_cross_entropy_with_integer_labels(
          model.apply(params, inputs), yb)
      sums = classification_sums(model.apply(params, xb), yb, mask)
      key = jax.random.fold_in(rng, index)
      for i, name in enumerate(names):
        x_adv = attacks[name](example_loss, xb, jax.random.fold_in(key, i))
        predicted = jnp.argmax(model.apply(params, x_adv), -1)
        sums[f"{name}_accuracy"] = jnp.sum((predicted == yb) & mask)
      return sums

    sums = chunked_sums(chunk, {"x": arrays["x"], "y": arrays["y"]}, batch_size)
    n = arrays["x"].shape[0]
    result = {k: v / n for k, v in sums.items()}
    result["robust_accuracy"] = result[f"{robust}_accuracy"]
    return result

  def evaluate(params, arrays, rng=None):
    rng = jax.random.PRNGKey(seed) if rng is None else rng
    return evaluate_with_key(params, arrays, rng)

  return evaluate


def to_python(metrics: Mapping) -> dict:
  """Device scalars -> plain Python numbers for JSON."""
  out = {}
  for key, value in metrics.items():
    value = np.asarray(value)
    out[key] = value.item() if value.ndim == 0 else value.tolist()
  return out


def _move_aside(path: str, copy: bool = False) -> str:
  """Moves (or copies) ``path`` to ``path.<timestamp>``; returns the new name."""
  import datetime
  import shutil
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
  target = f"{path}.{stamp}"
  (shutil.copy2 if copy else shutil.move)(path, target)
  return target


class JsonlWriter:
  """Appends one JSON object per line; on resume drops lines past the restored round."""

  def __init__(self, path: str, resume_round: Optional[int] = None):
    self.path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not os.path.exists(path):
      return
    if resume_round is None:     # a fresh start: the old file is kept beside, not deleted
      moved = _move_aside(path)
      print(f"warning: {path} is from an earlier run; moved to {moved}.", file=sys.stderr)
      return
    with open(path) as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for i, line in enumerate(lines):
      try:
        record = json.loads(line)
      except ValueError as e:
        if i == len(lines) - 1:   # a write cut short by a crash
          print(f"warning: {path}: dropped a torn last line (line {i + 1}).", file=sys.stderr)
          break
        raise ValueError(f"{path}: line {i + 1} is not JSON ({e}); fix or move the file "
                         f"before resuming.") from e
      if record.get("round", 0) <= resume_round:
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
      moved = _move_aside(path, copy=True)
      print(f"warning: {path} cut back to round {resume_round} (the restored checkpoint); "
            f"the full file is kept as {moved}.", file=sys.stderr)
      with open(path, "w") as f:
        f.writelines(kept)

  def write(self, record: Mapping) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
