"""Models: the core only needs ``init(rng, sample_x) -> params`` and ``apply(params, x) -> logits``.

Any flax (linen or nnx), haiku or plain-jax model fits through ``Model``.
"""
from typing import Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lab.types import Params


class Model(NamedTuple):
  """``apply`` is the evaluation (deterministic) forward; ``train_apply(params, x, rng)``
  the training one of models with dropout (None: ``apply``)."""
  init: Callable[[jax.Array, jax.Array], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  train_apply: Optional[Callable[[Params, jax.Array, jax.Array], jax.Array]] = None


def from_linen(module: nn.Module) -> Model:
  """Wraps a linen module; params are its full variables dict."""
  return Model(init=lambda rng, x: module.init(rng, x), apply=module.apply)


class MLP(nn.Module):
  """Flattens the input, then dense layers with ReLU."""
  hidden: Sequence[int] = (200,)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class ContinualMLP(nn.Module):
  """Flatten, Dense+ReLU hidden layers, Dense output; biases optional (continual FL).

  Without biases every parameter is a kernel, so gradient projection (GPM/FOT) covers
  the whole model; a bias is unprojected and can move old tasks' outputs.
  """
  hidden: Sequence[int] = (128, 128)
  num_classes: int = 10
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, use_bias=self.use_bias)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x)


class DropoutMLP(nn.Module):
  """Dense+ReLU+Dropout hidden layers with biases, Dense output.

  FOT's permuted-MNIST model (``model/mlp.py`` of its code): 784-400-400-400-10,
  dropout 0.2 after the first hidden layer and 0.5 after the others.
  """
  hidden: Sequence[int] = (400, 400, 400)
  num_classes: int = 10
  dropout: Sequence[float] = (0.2, 0.5, 0.5)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width, rate in zip(self.hidden, self.dropout):
      x = nn.relu(nn.Dense(width)(x))
      x = nn.Dropout(rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def dropout_mlp(hidden: Sequence[int] = (400, 400, 400), num_classes: int = 10,
                dropout: Sequence[float] = (0.2, 0.5, 0.5)) -> Model:
  """``DropoutMLP``: ``apply`` without dropout (evaluation), ``train_apply`` with it."""
  if len(dropout) != len(hidden):
    raise ValueError(f"dropout needs one rate per hidden layer: {len(hidden)} layers, "
                     f"got {len(dropout)} rates.")
  module = DropoutMLP(tuple(hidden), num_classes, tuple(float(r) for r in dropout))
  return Model(init=lambda rng, x: module.init(rng, x), apply=module.apply,
               train_apply=lambda params, x, rng: module.apply(params, x, train=True,
                                                               rngs={"dropout": rng}))


class CNN(nn.Module):
  """Conv(3x3)-ReLU-MaxPool blocks, then a dense head (the FedAvg paper's CNN shape)."""
  features: Sequence[int] = (32, 64)
  dense: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.features:
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_classes)(x)


def mlp(hidden: Sequence[int] = (200,), num_classes: int = 10) -> Model:
  return from_linen(MLP(tuple(hidden), num_classes))


def cnn(features: Sequence[int] = (32, 64), dense: int = 128, num_classes: int = 10) -> Model:
  return from_linen(CNN(tuple(features), dense, num_classes))


def continual_mlp(hidden: Sequence[int] = (128, 128), num_classes: int = 10,
                  use_bias: bool = False) -> Model:
  """``ContinualMLP``, the model of the continual-learning streams (``launch/continual.py``)."""
  return from_linen(ContinualMLP(tuple(hidden), num_classes, use_bias))


MODELS = {"mlp": mlp, "cnn": cnn}


def get(name: str, **kwargs) -> Model:
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
  return MODELS[name](**kwargs)


def classification_loss(model: Model):
  """Per-example softmax cross-entropy ``(params, batch, rng) -> [B]`` for the oracles."""
  def example_loss(params, batch, rng):
    del rng
    logits = model.apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  return example_loss
