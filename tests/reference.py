"""Independent numpy references and tiny problems shared by the tests."""
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.algorithm import make_round
from fedjax_lab.data.federated import FederatedData


def linear_problem(sizes, dim=3, seed=0):
  """Linear regression clients: returns (FederatedData, init params dict of numpy)."""
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.normal(size=(n, dim)).astype(np.float32)
  y = (x @ rng.normal(size=dim) + 0.3 * rng.normal(size=n)).astype(np.float32)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  data = FederatedData({"x": x, "y": y}, offsets)
  params = {"w": rng.normal(size=dim).astype(np.float32), "b": np.float32(0.5)}
  return data, params


def linear_example_loss(params, batch, rng):
  """0.5 (x.w + b - y)^2 per example."""
  del rng
  residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
  return 0.5 * residual ** 2


def linear_grad(params, x, y):
  """Mean-loss gradient of linear_example_loss over the rows of x, in numpy (float64)."""
  residual = x @ params["w"] + params["b"] - y
  return {"w": x.T @ residual / len(y), "b": np.mean(residual)}


def to_numpy(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def local_sgd(params, x, y, lr, batch_size, epochs, mu=0.0, correction=None):
  """Unshuffled mini-batch SGD (last batch partial), optional FedProx term and SCAFFOLD correction.

  Returns (final params, number of steps).
  """
  start = to_numpy(params)
  w = dict(start)
  steps = 0
  for _ in range(epochs):
    for lo in range(0, len(y), batch_size):
      g = linear_grad(w, x[lo:lo + batch_size], y[lo:lo + batch_size])
      for k in w:
        g[k] = g[k] + mu * (w[k] - start[k])
        if correction is not None:
          g[k] = g[k] + correction[k]
        w[k] = w[k] - lr * g[k]
      steps += 1
  return w, steps


def reddi_init(params, tau, initial_v=None):
  """Algorithm 2's starting moments (m, v) in float64: m = 0, v = tau^2 (or ``initial_v``)."""
  x = to_numpy(params)
  v0 = tau ** 2 if initial_v is None else initial_v
  return ({k: np.zeros_like(v) for k, v in x.items()},
          {k: np.full_like(v, v0) for k, v in x.items()})


def reddi_step(kind, x, m, v, delta, lr, b1, b2, tau):
  """One server step of Reddi et al. (ICLR 2021), Algorithm 2, in float64.

  ``delta`` is the averaged client update Delta_t (not the pseudo-gradient):
      m = b1 m + (1 - b1) Delta
      adagrad: v = v + Delta^2;  adam: v = b2 v + (1 - b2) Delta^2
      yogi:    v = v - (1 - b2) Delta^2 sign(v - Delta^2)
      x = x + lr m / (sqrt(v) + tau)
  Returns (x, m, v).
  """
  x2, m2, v2 = {}, {}, {}
  for k in x:
    d = np.asarray(delta[k], np.float64)
    m2[k] = b1 * m[k] + (1 - b1) * d
    if kind == "adagrad":
      v2[k] = v[k] + d * d
    elif kind == "adam":
      v2[k] = b2 * v[k] + (1 - b2) * d * d
    elif kind == "yogi":
      v2[k] = v[k] - (1 - b2) * d * d * np.sign(v[k] - d * d)
    else:
      raise ValueError(kind)
    x2[k] = np.asarray(x[k], np.float64) + lr * m2[k] / (np.sqrt(v2[k]) + tau)
  return x2, m2, v2


def tree_close(a, b, atol):
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64),
                               atol=atol, rtol=0, err_msg=f"leaf {k}")


def rounds_with_metrics(method, data, params, rounds, clients_per_round=None, seed=0,
                        backend="vmap", **round_options):
  """(states after 0..rounds jitted rounds, each round's metrics); vmap and full
  participation by default, ``round_options`` go to ``make_round``."""
  clients_per_round = clients_per_round or data.num_clients
  round_fn = jax.jit(make_round(method, data, clients_per_round, backend, **round_options))
  state = method.init(params, jax.random.PRNGKey(seed), data.num_clients)
  arrays, offsets = data.device_arrays()
  states, metrics = [state], []
  for _ in range(rounds):
    state, m = round_fn(state, arrays, offsets)
    states.append(state)
    metrics.append(m)
  return states, metrics


def run_rounds(method, data, params, rounds, clients_per_round=None, seed=0, backend="vmap"):
  """States after 0..rounds jitted rounds (vmap and full participation by default)."""
  return rounds_with_metrics(method, data, params, rounds, clients_per_round, seed, backend)[0]
