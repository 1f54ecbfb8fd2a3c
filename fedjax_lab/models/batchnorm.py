"""An MLP with batch normalisation after each hidden layer (FedBN's local statistics).

``apply(variables, x)`` normalises with the running statistics (evaluation);
``apply(variables, x, train=True, mask=m, mutable=['batch_stats'])`` with the
statistics of the batch's real rows ``m`` and returns the updated running ones.
"""
from typing import Sequence

import flax.linen as nn

from fedjax_lab.models import Model, from_linen


class MLPBN(nn.Module):
  """Flatten, then [Dense -> BatchNorm -> ReLU] per hidden layer, then Dense."""
  hidden: Sequence[int] = (200,)
  num_classes: int = 10
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.Dense(width)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(
          x, mask=None if mask is None else mask[:, None])
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x)


def mlp_bn(hidden: Sequence[int] = (200,), num_classes: int = 10, momentum: float = 0.9) -> Model:
  return from_linen(MLPBN(tuple(hidden), num_classes, momentum))
