"""One rounds loop: launch scripts run through training.train's checkpoints and NaN guard."""
import os

import jax
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
  # rounds_per_call=4 and checkpoint_every=6 (neither divides the other): the loop
  # stops at 4, 6, 8, 12, ...; a loop stepping by 4 alone would save only at 12.
  config = tiny_fedzo(rounds=18, rounds_per_call=4, checkpoint_every=6)
  state, history, _ = zeroth_order.run(config, str(tmp_path), progress=False)
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved == [6, 12, 18]
  assert [h["round"] for h in history] == list(range(1, 19))
  # Resuming from round 6 gives the uninterrupted run's numbers.
  resumed_dir = tmp_path / "resumed"
  zeroth_order.run(tiny_fedzo(rounds=6, rounds_per_call=4, checkpoint_every=6),
                   str(resumed_dir), progress=False)
  resumed, rest, _ = zeroth_order.run(config, str(resumed_dir), progress=False)
  assert [h["round"] for h in rest] == list(range(7, 19))
  np.testing.assert_array_equal(np.asarray(resumed.params), np.asarray(state.params))
  assert rest[-1]["objective"] == history[-1]["objective"]


def test_zeroth_order_stops_on_a_non_finite_loss_naming_the_round(tmp_path):
  config = tiny_fedzo(rounds=6, rounds_per_call=3, checkpoint_every=3, client_optimizer="sgd",
                      client_lr=float("nan"))
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite at round \d+; the last "
                                                        r"good state is round \d+"):
    zeroth_order.run(config, str(tmp_path), progress=False)


class EveryThree(training.Action):
  """Stops the loop at multiples of 3 and records where it was called."""

  def __init__(self):
    self.calls = []

  def next_stop(self, current):
    return (current // 3 + 1) * 3

  def __call__(self, loop):
    self.calls.append(loop.round)
    loop.records[-1]["seen_by_action"] = 1


def test_actions_add_stops_and_leave_the_numbers_unchanged():
  from algorithms.fedavg import fedavg
  from fedjax_lab.client import LocalSchedule
  from reference import linear_example_loss, linear_problem
  data, params = linear_problem((5, 3, 7, 4))
  method = fedavg(linear_example_loss, 0.1, schedule=LocalSchedule(batch_size=2, epochs=1))
  opts = training.TrainOptions(rounds=10, clients_per_round=2, rounds_per_call=4,
                               eval_every=0, progress=False)
  action = EveryThree()
  state, history = training.train(method, params, data, opts=opts, actions=(action,))
  assert action.calls == [3, 6, 9, 10]
  assert [h["round"] for h in history if "seen_by_action" in h] == [3, 6, 9, 10]
  plain, _ = training.train(method, params, data, opts=opts)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("backend", ["vmap", "sharded"])
def test_one_compilation_whatever_the_eval_and_checkpoint_cadence(tmp_path, backend):
  import dataclasses
  from algorithms.fedavg import fedavg
  from fedjax_lab.client import LocalSchedule
  from reference import linear_example_loss, linear_problem
  data, params = linear_problem((5, 3, 7, 4))
  method = fedavg(linear_example_loss, 0.1, schedule=LocalSchedule(batch_size=2, epochs=1))
  # Chunks of 4, cut at multiples of 6 (eval) and 5 (checkpoints): lengths 4, 1, 1, 4, 2, ...
  opts = training.TrainOptions(rounds=23, clients_per_round=2, rounds_per_call=4,
                               eval_every=6, checkpoint_every=5, progress=False,
                               backend=backend, workdir=str(tmp_path))
  evaluate = lambda p, _: {"loss": 0.0, "accuracy": 0.0}
  loop = training.run_loop(method, params, data, evaluate, {}, opts)
  assert loop.traces == 1
  assert [h["round"] for h in loop.history] == list(range(1, 24))
  # The same rounds one per call: identical numbers.
  single = training.run_loop(method, params, data, evaluate, {},
                             dataclasses.replace(opts, rounds_per_call=1, workdir=None))
  for a, b in zip(jax.tree.leaves(loop.state.params), jax.tree.leaves(single.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose([h["train_loss"] for h in loop.history],
                             [h["train_loss"] for h in single.history], rtol=1e-6)
