"""The one-gradient round (fedjax_lab.one_step): rounds of one local SGD step per client
compute the weighted mean of the clients' deltas as one gradient of the cohort's loss."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from algorithms.fedavg import fedavg
from algorithms.fedavgm import fedavgm
from algorithms.fedopt import fedopt
from algorithms.fedsgd import fedsgd
from fedjax_lab import aggregate, parallel
from fedjax_lab.algorithm import make_round, takes_one_gradient_round
from fedjax_lab.client import LocalSchedule
from tests import reference

SIZES = [5, 9, 3, 12, 7, 1]


def _rounds(method, data, params, rounds=3, clients_per_round=4, backend="vmap"):
  states, metrics = reference.rounds_with_metrics(method, data, params, rounds,
                                                  clients_per_round, seed=3, backend=backend)
  return states[-1], metrics


def _mapped(method):
  return dataclasses.replace(method, one_step_sgd=None)


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_one_step_fedavg_equals_numpy_fedavg(weighting):
  data, params = reference.linear_problem(SIZES, dim=4)
  lr, server_lr = 0.1, 0.7
  method = fedavg(reference.linear_example_loss, lr, server_lr,
                  LocalSchedule(batch_size=16, epochs=1), weighting)
  assert takes_one_gradient_round(method, "vmap", data.max_client_size)
  state = method.init(params, jax.random.PRNGKey(0), data.num_clients)
  round_fn = jax.jit(make_round(method, data, data.num_clients))
  new_state, metrics = round_fn(state, *data.device_arrays())

  x = reference.to_numpy(params)
  total = {k: np.zeros_like(v) for k, v in x.items()}
  weight_sum, loss_sum = 0.0, 0.0
  for i in range(data.num_clients):
    c = data.client(i)
    w_i = len(c["y"]) if weighting == "num_examples" else 1.0
    g = reference.linear_grad(x, np.float64(c["x"]), np.float64(c["y"]))
    for k in x:
      total[k] += w_i * (-lr * g[k])
    residual = c["x"] @ x["w"] + x["b"] - c["y"]
    loss_sum += w_i * np.mean(0.5 * residual ** 2)
    weight_sum += w_i
  expected = {k: x[k] + server_lr * total[k] / weight_sum for k in x}
  reference.tree_close(new_state.params, expected, atol=1e-5)
  np.testing.assert_allclose(float(metrics["train_loss"]), loss_sum / weight_sum, rtol=1e-5)
  assert int(metrics["local_steps"]) == data.num_clients


@pytest.mark.parametrize("make", [
    lambda loss: fedavg(loss, 0.2, 1.0, LocalSchedule(batch_size=None, epochs=1)),
    lambda loss: fedopt(loss, "adam", 0.2, 0.05, LocalSchedule(batch_size=32, epochs=1)),
    lambda loss: fedavgm(loss, 0.2, 1.0, 0.9, LocalSchedule(batch_size=32, epochs=1)),
    lambda loss: fedsgd(loss, 0.2, 1.0),
], ids=["fedavg", "fedadam", "fedavgm", "fedsgd"])
def test_one_gradient_round_equals_the_mapped_clients(make):
  data, params = reference.linear_problem(SIZES, dim=4, seed=1)
  method = make(reference.linear_example_loss)
  assert takes_one_gradient_round(method, "vmap", data.max_client_size)
  fused, fused_metrics = _rounds(method, data, params)
  mapped, mapped_metrics = _rounds(_mapped(method), data, params)
  reference.tree_close(fused.params, mapped.params, atol=1e-6)
  for a, b in zip(fused_metrics, mapped_metrics):
    np.testing.assert_allclose(float(a["train_loss"]), float(b["train_loss"]), rtol=1e-6)
    assert int(a["local_steps"]) == int(b["local_steps"])


def _dropout_loss(params, batch, rng):
  """A loss that reads its key: inputs dropped at rate 0.5 (the batch's key)."""
  keep = jax.random.bernoulli(rng, 0.5, batch["x"].shape)
  residual = (batch["x"] * keep * 2.0) @ params["w"] + params["b"] - batch["y"]
  return 0.5 * residual ** 2


@pytest.mark.parametrize("schedule", [LocalSchedule(batch_size=16, epochs=1),
                                      LocalSchedule(batch_size=8, steps=1)],
                         ids=["epoch", "steps=1"])
def test_a_loss_that_reads_its_key_sees_each_clients_own_batch_and_key(schedule):
  data, params = reference.linear_problem(SIZES, dim=4, seed=2)
  method = fedavg(_dropout_loss, 0.1, 1.0, schedule)
  assert takes_one_gradient_round(method, "vmap", data.max_client_size)
  fused, _ = _rounds(method, data, params)
  mapped, _ = _rounds(_mapped(method), data, params)
  reference.tree_close(fused.params, mapped.params, atol=1e-6)
  # The keys matter here: the same rounds with another seed differ.
  other = method.init(params, jax.random.PRNGKey(4), data.num_clients)
  other, _ = jax.jit(make_round(method, data, 4))(other, *data.device_arrays())
  assert not np.allclose(np.asarray(other.params["w"]), np.asarray(fused.params["w"]))


def test_the_shortcut_is_taken_only_where_it_is_exact():
  data, _ = reference.linear_problem(SIZES, dim=4)
  n = data.max_client_size
  loss = reference.linear_example_loss
  one = fedavg(loss, 0.1, 1.0, LocalSchedule(batch_size=16, epochs=1))
  assert takes_one_gradient_round(one, "vmap", n)
  assert takes_one_gradient_round(one, parallel.VmapBackend(), n)
  # Backends that do not vectorise the cohort on one device keep the clients mapped.
  assert not takes_one_gradient_round(one, "loop", n)
  assert not takes_one_gradient_round(one, "sharded", n)
  # More than one local step: the clients' models differ after the first.
  assert not takes_one_gradient_round(
      fedavg(loss, 0.1, 1.0, LocalSchedule(batch_size=4, epochs=1)), "vmap", n)
  assert not takes_one_gradient_round(
      fedavg(loss, 0.1, 1.0, LocalSchedule(batch_size=16, epochs=2)), "vmap", n)
  # Any replaced piece or hook turns it off, even one equal in value.
  for change in ({"client_tx": optax.sgd(0.1)}, {"client_tx": optax.adam(0.1)},
                 {"aggregator": aggregate.weighted_mean()},
                 {"aggregator": aggregate.coordinate_median()},
                 {"step_limit": lambda down: jnp.int32(1)},
                 {"client_final": lambda local, down, row: ({"delta": local.params}, row)},
                 {"init_client_state": lambda p: jnp.zeros(())},
                 {"one_step_sgd": None}):
    assert not takes_one_gradient_round(dataclasses.replace(one, **change), "vmap", n), change
  # The server side is free: another server optimizer keeps it.
  assert takes_one_gradient_round(dataclasses.replace(one, server_tx=optax.adam(0.1)), "vmap", n)


def test_one_gradient_round_matches_the_loop_backend_on_an_mlp():
  # The flat path (one batch of every client's rows) on a flax model, against the
  # clients run one by one.
  from fedjax_lab import models
  rng = np.random.default_rng(0)
  sizes = [6, 2, 8, 5]
  x = rng.normal(size=(sum(sizes), 4, 4, 1)).astype(np.float32)
  y = rng.integers(0, 3, size=sum(sizes)).astype(np.int32)
  from fedjax_lab.data.federated import FederatedData
  data = FederatedData({"x": x, "y": y}, np.concatenate([[0], np.cumsum(sizes)]))
  model = models.mlp((8,), num_classes=3)
  params = model.init(jax.random.PRNGKey(0), x[:1])
  method = fedavg(models.classification_loss(model), 0.3, 1.0,
                  LocalSchedule(batch_size=8, epochs=1))
  fused, _ = _rounds(method, data, params, clients_per_round=3)
  looped, _ = _rounds(method, data, params, clients_per_round=3, backend="loop")
  for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(looped.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
