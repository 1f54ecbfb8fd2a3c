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
from algorithms.scaffold import global_control, scaffold
from fedjax_lab import checkpoint, host_states, training
from fedjax_lab.algorithm import make_round
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
  with pytest.raises(checkpoint.CheckpointError, match=r"round 2\b.*corrupt") as info:
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
  _, history, summary = common.run(config, progress=False)
  assert summary["aggregator"] == "mean" and summary["dp_rounds"] == 2
  # Poisson sampling by default: cohorts of random size in padded slots.
  assert summary["dp_sampling"] == "poisson"
  assert summary["dp_cohort_slots"] >= config.clients_per_round
  assert all(0 <= h["cohort_size"] <= summary["dp_cohort_slots"] for h in history)
  expected = privacy.report(1.0, config.clients_per_round, config.num_clients, 2,
                            summary["dp_delta"], "poisson")
  for key in ("dp_epsilon_rdp", "dp_epsilon_pld", "dp_epsilon"):
    np.testing.assert_allclose(summary[key], expected[key], rtol=1e-9)
  # Fixed-size cohorts: accounted with replace-one neighbours (RDP only).
  config.dp.sampling = "fixed"
  _, history, fixed = common.run(config, progress=False)
  assert fixed["dp_sampling"] == "fixed" and "cohort_size" not in history[-1]
  expected = privacy.report(1.0, config.clients_per_round, config.num_clients, 2,
                            fixed["dp_delta"], "fixed")
  np.testing.assert_allclose(fixed["dp_epsilon"], expected["dp_epsilon_rdp"], rtol=1e-9)
  config.dp.sampling = "poisson"
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


def scaffold_method(lr=0.05):
  return scaffold(linear_example_loss, lr, 1.0, LocalSchedule(batch_size=2, epochs=2))


def assert_trees_equal(a, b, atol=None):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    if atol is None:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("rounds_per_call,in_files", [(1, False), (3, True)])
def test_host_client_states_equal_device_and_resume_bitwise(tmp_path, rounds_per_call, in_files):
  method = scaffold_method()
  table_dir = (lambda name: str(tmp_path / name)) if in_files else (lambda name: None)
  run = lambda name, rounds, **kw: small_run(method, str(tmp_path / name), rounds,
                                             rounds_per_call=rounds_per_call, **kw)
  device, _ = run("device", 6)
  host, _ = run("host", 6, client_states="host", client_state_dir=table_dir("host_table"))
  leaf_type = np.memmap if in_files else np.ndarray
  assert all(type(x) is leaf_type for x in jax.tree.leaves(host.client_states))
  # Params, optimizer and server state, round, RNG and every table row.
  assert_trees_equal(host, device, atol=1e-6)
  moved = np.any(host.client_states["w"] != 0, axis=1)
  assert moved.sum() > 0 and np.abs(global_control(host)["w"]).max() > 1e-3
  device_lines = read_jsonl(str(tmp_path / "device" / "metrics.jsonl"))
  assert read_jsonl(str(tmp_path / "host" / "metrics.jsonl")) == device_lines
  # Killed after 3 rounds, then resumed: the table comes back from the checkpoint.
  run("resumed", 3, client_states="host", client_state_dir=table_dir("resumed_table"))
  resumed, history = run("resumed", 6, client_states="host",
                         client_state_dir=table_dir("resumed_table"))
  assert [h["round"] for h in history] == [4, 5, 6]
  assert_trees_equal(resumed, host)
  assert read_jsonl(str(tmp_path / "resumed" / "metrics.jsonl")) == device_lines
  tables = tmp_path / "resumed" / "checkpoints" / checkpoint.HOST_TABLES
  if in_files:   # memmap tables are copied next to the orbax steps, one .npy per leaf
    assert sorted(os.listdir(tables)) == ["3", "6"]
    np.testing.assert_array_equal(np.load(tables / "6" / "leaf_1.npy"),
                                  resumed.client_states["w"])
  else:          # numpy tables go into the orbax checkpoint
    assert not tables.exists()


def test_host_client_states_non_finite_loss_keeps_the_last_good_table(tmp_path):
  # SCAFFOLD at client rate 2 diverges at round 7; with 4 rounds per call, rounds 5 and
  # 6 of the failing call were finite and changed rows, which must not be kept.
  method = scaffold_method(lr=2.0)
  workdir, table_dir = str(tmp_path / "nan"), str(tmp_path / "table")
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite at round 7; the last "
                     r"good state is round 4\. It is saved"):
    small_run(method, workdir, 20, rounds_per_call=4, checkpoint_every=1000,
              client_states="host", client_state_dir=table_dir)
  # Reference: the device table after 4 and after 6 rounds.
  data, params = linear_problem((5, 3, 7, 2, 9, 4), seed=4)
  state = method.init(jax.tree.map(jnp.asarray, params), jax.random.PRNGKey(0), 6)
  round_fn = jax.jit(make_round(method, data, 3))
  states = [state]
  for _ in range(6):
    states.append(round_fn(states[-1], *data.device_arrays())[0])
  template = training.full_state(*host_states.init_host_state(
      method, state.params, jax.random.PRNGKey(0), 6, str(tmp_path / "restored")))
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert checkpointer.latest_round() == 4
  saved = checkpointer.restore(template)
  checkpointer.close()
  assert_trees_equal(saved, states[4], atol=1e-6)
  # The table files the run updated in place hold round 4 too, not round 6.
  live = {name: np.load(os.path.join(table_dir, f"leaf_{k}.npy"))
          for k, name in enumerate(("b", "w"))}
  assert_trees_equal(live, states[4].client_states, atol=1e-6)
  assert np.abs(np.asarray(states[6].client_states["w"]) - live["w"]).max() > 1e-3
  lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [line["round"] for line in lines] == [1, 2, 3, 4]


def test_client_states_option_is_checked():
  with pytest.raises(ValueError, match="Unknown client_states 'gpu'; choose one of device, host"):
    training.TrainOptions(rounds=1, clients_per_round=1, client_states="gpu")
  with pytest.raises(ValueError, match="client_state_dir .* needs client_states='host'"):
    training.TrainOptions(rounds=1, clients_per_round=1, client_state_dir="/tmp/x")


@pytest.mark.slow
def test_launch_with_host_client_states_matches_device(tmp_path):
  """SCAFFOLD on the digits default: the host table gives the device run's accuracy."""
  summaries = []
  for client_states in ("device", "host"):
    result = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config.algorithm=scaffold",
         f"--config.client_states={client_states}", "--progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    summaries.append(json.loads(result.stdout.strip().splitlines()[-1]))
  assert summaries[0]["rounds"] == summaries[1]["rounds"] == 200
  assert summaries[1]["test_accuracy"] == summaries[0]["test_accuracy"]
  np.testing.assert_allclose(summaries[1]["test_loss"], summaries[0]["test_loss"], rtol=1e-5)


def test_checkpoint_table_restores_across_forms_and_names_missing_files(tmp_path, monkeypatch):
  """A table saved as memmap files or numpy restores into a device, numpy or memmap template."""
  monkeypatch.setattr(checkpoint, "_BLOCK_BYTES", 4096)   # 256-row blocks
  rows = np.zeros((4000, 4), np.float32)
  rows[[3, 2700]] = [[1, 2, 3, 4], [5, 6, 7, 8]]

  def memmap(name, values=None):
    array = np.lib.format.open_memmap(str(tmp_path / name), mode="w+", dtype=np.float32,
                                      shape=rows.shape)
    if values is not None:
      array[...] = values
    return array

  def state(table):
    return {"params": jnp.arange(3.0), "round": jnp.int32(5), "table": table, "none": None}

  checkpointer = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  checkpointer.save(5, state(memmap("live.npy", rows)))
  files = tmp_path / "ckpt" / checkpoint.HOST_TABLES / "5"
  assert os.listdir(files) == ["leaf_0.npy"]
  assert os.stat(files / "leaf_0.npy").st_blocks * 512 < rows.nbytes / 2   # zero blocks skipped
  checkpointer.save(6, state(rows.copy()))             # an in-memory table goes into orbax
  assert not (tmp_path / "ckpt" / checkpoint.HOST_TABLES / "6").exists()
  for round_ in (5, 6):
    for template, kind in ((memmap(f"into_{round_}.npy"), np.memmap),
                           (np.zeros_like(rows), np.ndarray), (jnp.zeros(rows.shape), jax.Array)):
      restored = checkpointer.restore(state(template), round_)
      assert isinstance(restored["table"], kind) and restored["none"] is None
      np.testing.assert_array_equal(np.asarray(restored["table"]), rows)
      np.testing.assert_array_equal(restored["params"], np.arange(3.0))
      if kind is np.memmap:
        assert restored["table"] is template
  checkpointer.save(7, state(memmap("live.npy")))
  assert sorted(os.listdir(tmp_path / "ckpt" / checkpoint.HOST_TABLES)) == ["7"]   # 5 dropped
  os.remove(tmp_path / "ckpt" / checkpoint.HOST_TABLES / "7" / "leaf_0.npy")
  with pytest.raises(checkpoint.CheckpointError, match="round 7 .* lacks its client-state table"):
    checkpointer.restore(state(np.zeros_like(rows)))
  checkpointer.close()
