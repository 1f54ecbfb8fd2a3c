"""Hypergradients: jax.grad of the final test loss through the rounds against central finite
differences of launch.train's test loss (and of the same run's loss, a quick version)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import metrics as metrics_lib
from fedjax_lab import studies
from launch import hypergradient, sweep
from test_studies import single, small_config


def test_grad_matches_finite_differences_of_the_same_run():
  config = small_config()
  config.rounds = 2
  build, exp, _, slots = sweep.study_setup(config, ["client_lr", "server_lr"])
  evaluate = metrics_lib.make_evaluator(exp.model)
  arrays, offsets = exp.train_data.device_arrays()
  args = (jnp.int32(0), arrays, offsets, exp.test_arrays)
  full = studies.final_loss(build, exp.train_data, evaluate, rounds=2, clients_per_round=slots)
  loss = jax.jit(full)
  hp = {"client_lr": jnp.float32(0.1), "server_lr": jnp.float32(1.0)}
  # The loss is launch.train's test loss.
  assert abs(float(loss(hp, *args)) - single(config, {})[1]["test_loss"]) < 1e-5
  grad = jax.jit(jax.grad(full))(hp, *args)
  for key in hp:
    h = 1e-4 * float(hp[key])   # the loss is rough on the 1% scale: a small step
    up, down = dict(hp), dict(hp)
    up[key], down[key] = hp[key] + h, hp[key] - h
    finite = (float(loss(up, *args)) - float(loss(down, *args))) / (2 * h)
    # atol: float32 differences of a loss near 2 resolve about 2.4e-7 / 2h = 1.2e-3.
    np.testing.assert_allclose(float(grad[key]), finite, rtol=0.02, atol=2e-3)
  assert abs(float(grad["client_lr"])) > 0.1   # a slope the check can see
  with pytest.raises(ValueError, match="truncate"):
    studies.final_loss(build, exp.train_data, evaluate, rounds=2, clients_per_round=slots,
                       truncate=3)


@pytest.mark.slow
def test_grad_matches_finite_differences_of_launch_train_over_10_rounds():
  config = small_config()
  config.rounds, config.eval_every = 10, 10
  at = hypergradient.hypergradient(config, ["client_lr", "server_lr"])
  values = {"client_lr": 0.1, "server_lr": 1.0}
  test_loss, grad = at(values)
  assert abs(test_loss - single(config, {})[1]["test_loss"]) < 1e-5
  for key, value in values.items():
    # The loss is rough on the 1% scale (10 rounds of SGD): a small step.
    h = 1e-4 * value
    finite = (single(config, {key: value + h})[1]["test_loss"] -
              single(config, {key: value - h})[1]["test_loss"]) / (2 * h)
    np.testing.assert_allclose(grad[key], finite, rtol=0.02)
  # Truncated to the last 3 rounds: another (biased) number.
  _, truncated = hypergradient.hypergradient(config, ["client_lr"], truncate=3)(values)
  assert abs(truncated["client_lr"] - grad["client_lr"]) > 1e-3
