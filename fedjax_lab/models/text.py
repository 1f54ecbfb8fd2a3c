"""Small text models and their per-token masked losses.

``char_lm`` is the Shakespeare next-character model of the FedAvg/FedJAX
benchmarks (embedding, stacked LSTMs, a dense head over the vocabulary);
``text_classifier`` (embedding, LSTM, masked mean-pool, dense) is for Sent140-style
sentiment. Inputs are int token ids ``[B, L]`` with ``PAD = 0`` as padding
(``fedjax_lab.data.text``).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lab import metrics as metrics_lib
from fedjax_lab.models import Model, from_linen

PAD = 0  # same as fedjax_lab.data.text.PAD (not imported: models stay independent of data)


class CharLM(nn.Module):
  """Embedding -> LSTM layers -> Dense(vocab): logits ``[B, L, vocab_size]``."""
  vocab_size: int
  embed_dim: int = 8
  hidden: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, x):
    h = nn.Embed(self.vocab_size, self.embed_dim)(x)
    for width in self.hidden:
      h = nn.RNN(nn.OptimizedLSTMCell(width))(h)
    return nn.Dense(self.vocab_size)(h)


class TextClassifier(nn.Module):
  """Embedding -> LSTM -> mean over non-PAD positions -> Dense: logits ``[B, num_classes]``."""
  vocab_size: int
  num_classes: int = 2
  embed_dim: int = 32
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    mask = (x != PAD).astype(jnp.float32)[..., None]
    h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(nn.Embed(self.vocab_size, self.embed_dim)(x))
    pooled = jnp.sum(h * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return nn.Dense(self.num_classes)(pooled)


def char_lm(vocab_size: int, embed_dim: int = 8, hidden: Sequence[int] = (256, 256)) -> Model:
  """Next-token model; FedJAX's Shakespeare model is ``char_lm(vocab, 8, (256, 256))``."""
  return from_linen(CharLM(vocab_size, embed_dim, tuple(hidden)))


def text_classifier(vocab_size: int, num_classes: int = 2, embed_dim: int = 32,
                    hidden: int = 64) -> Model:
  return from_linen(TextClassifier(vocab_size, num_classes, embed_dim, hidden))


def token_losses(logits: jax.Array, targets: jax.Array, pad_id: int = PAD):
  """Per-token cross-entropy ``[B, L]`` and the mask ``targets != pad_id`` ``[B, L]``."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = targets != pad_id
  return jnp.where(mask, losses, 0.0), mask


def sequence_loss(model: Model, pad_id: int = PAD):
  """Per-example loss ``(params, batch, rng) -> [B]`` for the gradient oracles.

  Example ``b``'s loss is the mean cross-entropy over its non-PAD targets
  ``batch['y'][b]`` (0 for a row of padding only). The oracle then averages these
  over the batch's real examples, so every row weighs the same; rows are full
  except a client's last, so this is close to the mean over all tokens.
  """
  def example_loss(params, batch, rng):
    del rng
    losses, mask = token_losses(model.apply(params, batch["x"]), batch["y"], pad_id)
    return jnp.sum(losses, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)
  return example_loss


def make_sequence_evaluator(model: Model, pad_id: int = PAD, batch_size: int = 256):
  """Jitted ``evaluate(params, arrays) -> {'accuracy', 'loss', 'num_tokens'}`` per token.

  Loss and accuracy are averaged over every non-PAD target in ``arrays['y']``
  ``[N, L]`` (token-weighted), in chunks of ``batch_size`` rows.
  """
  @jax.jit
  def evaluate(params, arrays):
    def chunk(batch, rows, index):
      del index
      logits = model.apply(params, batch["x"])
      losses, mask = token_losses(logits, batch["y"], pad_id)
      mask = mask & rows[:, None]     # padding rows hold no targets
      return {"loss": jnp.sum(jnp.where(mask, losses, 0.0)),
              "accuracy": jnp.sum((jnp.argmax(logits, -1) == batch["y"]) & mask),
              "num_tokens": jnp.sum(mask)}

    sums = metrics_lib.chunked_sums(chunk, {"x": arrays["x"], "y": arrays["y"]}, batch_size)
    total = jnp.maximum(sums["num_tokens"], 1)
    return {"accuracy": sums["accuracy"] / total, "loss": sums["loss"] / total,
            "num_tokens": sums["num_tokens"]}

  return evaluate
