"""The rounds loop: resume equals an uninterrupted run, clear errors, launch script."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import algorithms
from algorithms.fedopt import fedopt
from algorithms.scaffold import scaffold
from fedjax_lab import checkpoint, training
from fedjax_lab.client import LocalSchedule
from fedjax_lab.metrics import read_jsonl
from launch import common
from launch.configs import fedavg_digits
from reference import linear_example_loss, linear_problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_run(method, workdir, rounds, **kwargs):
  data, params = linear_problem((5, 3, 7, 2, 9, 4), seed=4)
  opts = training.TrainOptions(rounds=rounds, clients_per_round=3, workdir=workdir,
                               progress=False, **kwargs)
  return training.train(method, jax.tree.map(jnp.asarray, params), data, opts=opts)


@pytest.mark.parametrize("rounds_per_call", [1, 3])
def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, rounds_per_call):
  method = scaffold(linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=2, epochs=2))
  straight, _ = small_run(method, str(tmp_path / "a"), 10, rounds_per_call=rounds_per_call)
  small_run(method, str(tmp_path / "b"), 5, rounds_per_call=rounds_per_call)   # "killed" after 5
  resumed, history = small_run(method, str(tmp_path / "b"), 10, rounds_per_call=rounds_per_call)
  assert int(resumed.round) == 10 and [h["round"] for h in history] == list(range(6, 11))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lines = read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
  assert [line["round"] for line in lines] == list(range(1, 11))


def test_donated_state_gives_the_same_run_and_leaves_params_usable(tmp_path):
  method = scaffold(linear_example_loss, 0.05, 1.0, LocalSchedule(batch_size=2, epochs=2))
  data, params = linear_problem((5, 3, 7, 2, 9, 4), seed=4)
  params = jax.tree.map(jnp.asarray, params)
  runs = []
  for donate in (False, True):
    opts = training.TrainOptions(rounds=6, clients_per_round=3, rounds_per_call=2,
                                 progress=False, donate_state=donate)
    runs.append(training.train(method, params, data, opts=opts)[0])
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(params))
  # With donation a non-finite round names the last checkpoint as the last good state.
  diverging = algorithms.fedavg.fedavg(linear_example_loss, 50.0, 1.0, LocalSchedule(batch_size=2))
  with pytest.raises(training.NonFiniteLossError, match=r"last checkpoint is round 2 in"):
    small_run(diverging, str(tmp_path / "nan"), 100, checkpoint_every=2, donate_state=True)


def test_resume_restores_server_optimizer_state(tmp_path):
  method = fedopt(linear_example_loss, "adam", 0.05, 0.01, LocalSchedule(batch_size=2))
  straight, _ = small_run(method, str(tmp_path / "a"), 6)
  small_run(method, str(tmp_path / "b"), 2)
  resumed, _ = small_run(method, str(tmp_path / "b"), 6)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_loss_stops_with_round_and_keeps_last_good_state(tmp_path):
  # A huge learning rate makes linear regression diverge to inf/NaN within a few rounds.
  method = algorithms.fedavg.fedavg(linear_example_loss, 50.0, 1.0, LocalSchedule(batch_size=2))
  workdir = str(tmp_path / "nan")
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite at round (\d+)") as info:
    small_run(method, workdir, 100, checkpoint_every=1000)
  bad_round = int(re.search(r"at round (\d+)", str(info.value)).group(1))
  assert bad_round > 1
  saved = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_round()
  assert saved == bad_round - 1
  lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert all(np.isfinite(line["train_loss"]) for line in lines)
  assert lines[-1]["round"] == bad_round - 1


def test_corrupt_checkpoint_is_reported_and_left_untouched(tmp_path):
  method = algorithms.fedavg.fedavg(linear_example_loss, 0.05)
  workdir = str(tmp_path / "run")
  small_run(method, workdir, 2)
  step_dir = os.path.join(workdir, "checkpoints", "2")
  corrupted = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "wb") as f:
        f.write(b"not a checkpoint")
      corrupted.append(path)
  with pytest.raises(checkpoint.CheckpointError, match="round 2 .* corrupt") as info:
    small_run(method, workdir, 4)
  assert os.path.join(workdir, "checkpoints") in str(info.value)
  assert all(open(p, "rb").read() == b"not a checkpoint" for p in corrupted)


def test_checkpoint_path_that_is_a_file_is_named(tmp_path):
  path = tmp_path / "ckpt"
  path.write_text("x")
  with pytest.raises(checkpoint.CheckpointError, match="not a directory"):
    checkpoint.Checkpointer(str(path))


def test_bad_config_errors_name_the_problem():
  config = fedavg_digits.get_config()
  config.algorithm = "fedavgg"
  with pytest.raises(ValueError, match="Unknown algorithm 'fedavgg'.*fedavg"):
    common.build(config)
  config = fedavg_digits.get_config()
  config.clients_per_round = 101
  config.rounds = 1
  with pytest.raises(ValueError, match="clients_per_round=101 is larger than the population of num_clients=100"):
    common.run(config, progress=False)
  config = fedavg_digits.get_config()
  config.num_clients = 0
  with pytest.raises(ValueError, match="zero clients"):
    common.build(config)


def test_default_launch_reaches_90_percent_and_prints_json_last(tmp_path):
  """The README's first command: FedAvg on digits, Dirichlet(0.5), 100 clients, 10 per round."""
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--workdir={tmp_path}", "--progress=false"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["algorithm"] == "fedavg" and summary["rounds"] == 200
  assert summary["test_accuracy"] >= 0.90, summary
  assert summary["wall_s"] < 120
  for key in ("test_loss", "wall_s"):
    assert key in summary
  assert len(read_jsonl(str(tmp_path / "metrics.jsonl"))) == 200


def test_launch_reports_unknown_algorithm_without_traceback():
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config.algorithm=nope", "--progress=false"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "Unknown algorithm 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_launch_wires_attack_aggregator_and_dp_epsilon():
  from fedjax_lab import privacy
  from launch.configs import robust_digits
  config = robust_digits.get_config()
  config.rounds, config.eval_every = 2, 2
  config.aggregator, config.attack, config.malicious_fraction = "mean", "none", 0.0
  config.dp.clip, config.dp.noise_multiplier = 0.5, 1.0
  _, _, summary = common.run(config, progress=False)
  assert summary["aggregator"] == "mean" and summary["dp_rounds"] == 2
  q = config.clients_per_round / config.num_clients
  expected = privacy.epsilon(1.0, q, 2, summary["dp_delta"], "rdp")
  np.testing.assert_allclose(summary["dp_epsilon_rdp"], expected, rtol=1e-9)
  # The same config with the mean replaced by the median is a different aggregation.
  config.dp.clip, config.dp.noise_multiplier = None, None
  config.aggregator = "median"
  _, _, median = common.run(config, progress=False)
  assert "dp_epsilon_rdp" not in median and median["aggregator"] == "median"


def test_launch_trains_a_char_model_on_leaf_shakespeare(tmp_path):
  path = tmp_path / "shakespeare.json"
  rng = np.random.default_rng(0)
  users = {f"u{i}": {"x": ["".join(rng.choice(list("abcd"), 8)) for _ in range(6)],
                     "y": list(rng.choice(list("abcd"), 6))} for i in range(4)}
  path.write_text(json.dumps({"users": list(users), "num_samples": [6] * 4, "user_data": users}))
  config = fedavg_digits.get_config()
  config.data, config.partition, config.num_clients = f"leaf:{path}", "natural", 4
  config.clients_per_round, config.rounds, config.eval_every, config.rounds_per_call = 2, 2, 2, 1
  state, history, summary = common.run(config, progress=False)
  assert summary["rounds"] == 2 and np.isfinite(summary["test_loss"])
  # Chance level for a 4-letter alphabet plus special tokens: the loss is a real cross-entropy.
  assert 0.5 < summary["test_loss"] < 10
  assert "Embed" in str(jax.tree.map(lambda x: x.shape, state.params))
