"""Evaluation of the global model and metric logs (JSONL)."""
import json
import math
import os
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.models import Model


def make_evaluator(model: Model, batch_size: int = 1024):
  """Returns jitted ``evaluate(params, arrays) -> {'accuracy', 'loss'}``.

  ``arrays`` holds ``'x'`` and integer ``'y'``; examples are processed in chunks of
  ``batch_size`` (padded and masked) so memory stays bounded.
  """
  @jax.jit
  def evaluate(params, arrays):
    x, y = arrays["x"], arrays["y"]
    n = x.shape[0]
    chunks = math.ceil(n / batch_size)
    pad = chunks * batch_size - n
    mask = jnp.arange(chunks * batch_size) < n
    xs = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((chunks, batch_size) + x.shape[1:])
    ys = jnp.pad(y, (0, pad)).reshape(chunks, batch_size)
    ms = mask.reshape(chunks, batch_size)

    def chunk(args):
      xb, yb, mb = args
      logits = model.apply(params, xb)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      correct = jnp.argmax(logits, -1) == yb
      return jnp.sum(jnp.where(mb, loss, 0.0)), jnp.sum(correct & mb)

    losses, corrects = jax.lax.map(chunk, (xs, ys, ms))
    return {"accuracy": jnp.sum(corrects) / n, "loss": jnp.sum(losses) / n}

  return evaluate


def to_python(metrics: Mapping) -> dict:
  """Device scalars -> plain Python numbers for JSON."""
  out = {}
  for key, value in metrics.items():
    value = np.asarray(value)
    out[key] = value.item() if value.ndim == 0 else value.tolist()
  return out


class JsonlWriter:
  """Appends one JSON object per line; on resume drops lines past the restored round."""

  def __init__(self, path: str, resume_round: Optional[int] = None):
    self.path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if resume_round is not None and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("round", 0) <= resume_round]
      with open(path, "w") as f:
        f.writelines(kept)
    elif resume_round is None and os.path.exists(path):
      os.remove(path)

  def write(self, record: Mapping) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
