"""One rounds loop: launch scripts run through training.train's checkpoints and NaN guard."""
import os

import numpy as np
import pytest

import algorithms
from fedjax_lab import training
from launch import zeroth_order


def tiny_fedzo(**overrides):
  config = algorithms.example_config("fedzo")
  config.dim, config.num_clients, config.clients_per_round = 6, 3, 3
  config.local_steps, config.num_directions = 2, 3
  config.update(overrides)
  return config


def test_zeroth_order_checkpoints_at_every_multiple_whatever_rounds_per_call(tmp_path):
  # rounds_per_call=10 and checkpoint_every=25: the loop stops at 10, 20, 25, 30, ...
  config = tiny_fedzo(rounds=50, rounds_per_call=10, checkpoint_every=25)
  state, history, _ = zeroth_order.run(config, str(tmp_path), progress=False)
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved == [25, 50]
  assert [h["round"] for h in history] == list(range(1, 51))
  # Resuming from round 25 gives the uninterrupted run's numbers.
  resumed_dir = tmp_path / "resumed"
  zeroth_order.run(tiny_fedzo(rounds=25, rounds_per_call=10, checkpoint_every=25),
                   str(resumed_dir), progress=False)
  resumed, rest, _ = zeroth_order.run(config, str(resumed_dir), progress=False)
  assert [h["round"] for h in rest] == list(range(26, 51))
  np.testing.assert_array_equal(np.asarray(resumed.params), np.asarray(state.params))
  assert rest[-1]["objective"] == history[-1]["objective"]


def test_zeroth_order_stops_on_a_non_finite_loss_naming_the_round(tmp_path):
  config = tiny_fedzo(rounds=6, rounds_per_call=3, checkpoint_every=3, client_optimizer="sgd",
                      client_lr=float("nan"))
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite at round \d+; the last "
                                                        r"good state is round \d+"):
    zeroth_order.run(config, str(tmp_path), progress=False)
