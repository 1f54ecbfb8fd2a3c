"""The benchmarks' populations and models (no flags: importable from tests and peers)."""
import numpy as np

from fedjax_lab import models
from fedjax_lab.data import FederatedData, digits, dirichlet


def synthetic_population(num_clients, examples_per_client, shape, num_classes=10, seed=0):
  """Uniform random inputs; ``examples_per_client`` is a count or a (low, high) range."""
  rng = np.random.default_rng(seed)
  if isinstance(examples_per_client, tuple):
    sizes = rng.integers(examples_per_client[0], examples_per_client[1] + 1, size=num_clients)
  else:
    sizes = np.full(num_clients, examples_per_client)
  n = int(sizes.sum())
  x = rng.uniform(size=(n,) + shape).astype(np.float32)
  y = rng.integers(0, num_classes, size=n).astype(np.int32)
  ids = np.repeat(np.arange(num_clients), sizes)
  return FederatedData.from_client_ids({"x": x, "y": y}, ids, num_clients)


def digits_population(num_clients, seed=0):
  arrays = digits()
  ids = dirichlet(arrays["y"], num_clients, 0.5, seed)
  return FederatedData.from_client_ids(arrays, ids, num_clients)


def equal_digits_population(num_clients, per_client, seed=0):
  arrays = digits()
  idx = np.random.default_rng(seed).permutation(len(arrays["y"]))[:num_clients * per_client]
  ids = np.repeat(np.arange(num_clients), per_client)
  return FederatedData.from_client_ids({k: v[idx] for k, v in arrays.items()}, ids, num_clients)


class PfLCnn(models.nn.Module):
  """pfl-research's CIFAR-10 CNN: conv32-conv64-pool-dense128 (no dropout)."""

  @models.nn.compact
  def __call__(self, x):
    nn = models.nn
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)
