"""The run directory: fingerprints, one writer, verified checkpoints with fallback, metrics
cut back on resume, divergence, one-line messages."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from fedjax_lab import checkpoint, training
from fedjax_lab.client import LocalSchedule
from launch import common
from launch import workdir as workdir_lib
from launch.configs import fedavg_digits
from reference import linear_example_loss, linear_problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = fedavg_digits.get_config()
  config.num_clients, config.clients_per_round, config.rounds = 10, 3, 4
  config.checkpoint_every, config.eval_every, config.rounds_per_call = 2, 2, 1
  config.update(overrides)
  return config


def snapshot(directory):
  """Every file under ``directory`` with its bytes."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def run_in(workdir, config, resume="auto"):
  with workdir_lib.open_run(str(workdir), config, resume):
    return common.run(config, str(workdir), progress=False)


def test_a_changed_config_stops_before_anything_changes(tmp_path):
  run_in(tmp_path, tiny_config())
  before = snapshot(tmp_path)
  for key, value in [("seed", 1), ("num_clients", 12), ("client_lr", 0.5)]:
    with pytest.raises(workdir_lib.WorkdirError, match=rf"{key}: .* -> "):
      run_in(tmp_path, tiny_config(**{key: value, "rounds": 6}))
    assert snapshot(tmp_path) == before
  # Resume-safe keys may change: the run continues from round 4.
  state, history, _ = run_in(tmp_path, tiny_config(rounds=6, eval_every=3))
  assert int(state.round) == 6 and [h["round"] for h in history] == [5, 6]
  with pytest.raises(workdir_lib.WorkdirError, match="--resume=never"):
    run_in(tmp_path, tiny_config(rounds=8), resume="never")
  with pytest.raises(workdir_lib.WorkdirError, match="holds no checkpoint"):
    run_in(tmp_path / "empty", tiny_config(), resume="require")


def test_fingerprint_ignores_only_the_resume_safe_keys():
  a = workdir_lib.fingerprint(tiny_config())
  b = workdir_lib.fingerprint(tiny_config(rounds=99, eval_every=7, checkpoint_every=5,
                                          rounds_per_call=3))
  assert a == b and "rounds" not in a and a["seed"] == 0 and a["dp.noise_multiplier"] == 0.0
  assert workdir_lib.differences(a, workdir_lib.fingerprint(tiny_config(seed=2))) == [
      "seed: 0 -> 2"]


@pytest.mark.parametrize("script,args,output", [
    ("launch.train", ["--progress=false"], "metrics.jsonl"),
    ("launch.hypergradient", ["--wrt=client_lr"], "hypergradient.json"),
    ("launch.sweep", ["--sweep=client_lr:0.1,0.2"], "runs.jsonl"),
    ("launch.sweep_lr", ["--lrs=0.1,1"], "sweep.csv")])
def test_a_second_process_on_a_held_workdir_fails_naming_the_owner(tmp_path, script, args,
                                                                   output):
  lock = workdir_lib.acquire_lock(str(tmp_path))      # this test process is the owner
  try:
    result = subprocess.run(
        [sys.executable, "-m", script, f"--workdir={tmp_path}", "--config.rounds=1", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert f"in use by pid {os.getpid()}" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / output)
  finally:
    workdir_lib.release_lock(lock)
  assert not os.path.exists(lock)


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  with open(tmp_path / workdir_lib.LOCK, "w") as f:
    json.dump({"pid": gone.pid, "host": os.uname().nodename, "started": "then"}, f)
  lock = workdir_lib.acquire_lock(str(tmp_path))
  assert f"left by pid {gone.pid}" in capsys.readouterr().err
  with open(lock) as f:
    assert json.load(f)["pid"] == os.getpid()
  workdir_lib.release_lock(lock)


def _linear_run(workdir, rounds):
  data, params = linear_problem((5, 3, 7, 4))
  method = fedavg(linear_example_loss, 0.1, schedule=LocalSchedule(batch_size=2, epochs=1))
  opts = training.TrainOptions(rounds=rounds, clients_per_round=2, checkpoint_every=2,
                               eval_every=0, progress=False, workdir=workdir)
  return training.train(method, params, data, opts=opts)


def _largest_data_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns
           if os.sep + "d" + os.sep in os.path.join(r, n)]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip_one_byte",
                                    pytest.param("truncate", marks=pytest.mark.slow)])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, damage,
                                                                        capsys):
  uninterrupted, _, _ = common.run(tiny_config(rounds=8), progress=False)
  workdir = str(tmp_path)
  run_in(workdir, tiny_config(rounds=6))           # checkpoints 2, 4, 6
  path = _largest_data_file(os.path.join(workdir, "checkpoints", "6"))
  with open(path, "rb") as f:
    blob = bytearray(f.read())
  if damage == "flip_one_byte":
    blob[len(blob) // 2] ^= 0x01
  else:
    blob = blob[:len(blob) // 2]
  with open(path, "wb") as f:
    f.write(bytes(blob))
  state, history, _ = run_in(workdir, tiny_config(rounds=8))
  err = capsys.readouterr().err
  assert "checkpoint round 6" in err and "resuming from round 4" in err
  assert [h["round"] for h in history] == [5, 6, 7, 8]
  # Nothing deleted: the damaged round is kept beside the checkpoints.
  aside = os.listdir(os.path.join(workdir, "checkpoints.corrupt"))
  assert len(aside) == 1 and aside[0].startswith("6-")
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_valid_checkpoint_is_one_clear_error(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  state = {"w": np.arange(4.0)}
  ckpt.save(1, state)
  with open(ckpt._digest_path(1), "w") as f:            # a digest the data cannot match
    json.dump({"round": 1, "sha256": "0" * 64}, f)
  with pytest.raises(checkpoint.CheckpointError, match=r"No usable checkpoint.*round 1: its "
                                                        r"content does not match"):
    ckpt.restore_latest_valid(state)
  assert checkpoint.digest({"w": np.arange(4.0)}) == checkpoint.digest(
      {"w": jax.numpy.arange(4.0, dtype=jax.numpy.float64)
       if jax.config.jax_enable_x64 else np.arange(4.0)})
  ckpt.close()


def test_device_states_save_asynchronously_and_host_tables_synchronously(tmp_path):
  device_state = {"w": jax.numpy.arange(6.0), "round": jax.numpy.asarray(3)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  ckpt.save(3, device_state)
  # Orbax may still be writing: the digest (written by us once it is done) must wait.
  assert not os.path.exists(ckpt._digest_path(3))
  ckpt.close()
  again = checkpoint.Checkpointer(str(tmp_path / "c"))
  assert again.saved_digest(3) == checkpoint.digest(device_state)
  restored, step = again.restore_latest_valid(device_state)
  assert step == 3 and np.array_equal(restored["w"], np.arange(6.0))
  # A numpy table may be updated in place by the next round: saved before save returns.
  host_state = {"w": np.arange(6.0), "round": jax.numpy.asarray(4)}
  again.save(4, host_state)
  assert again.saved_digest(4) == checkpoint.digest(host_state)
  again.close()


def test_resume_drops_a_torn_metrics_line_and_cuts_back_keeping_a_copy(tmp_path, capsys):
  workdir = str(tmp_path)
  _linear_run(workdir, 4)
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics, "a") as f:
    f.write('{"round": 5, "train_loss": 0.1}\n{"round": 6, "trai')   # a crash mid-write
  _linear_run(workdir, 6)
  err = capsys.readouterr().err
  assert "torn last line" in err and metrics in err and "cut back to round 4" in err
  rounds = [json.loads(line)["round"] for line in open(metrics)]
  assert rounds == [1, 2, 3, 4, 5, 6]
  copies = [n for n in os.listdir(workdir) if n.startswith("metrics.jsonl.")]
  assert len(copies) == 1 and open(os.path.join(workdir, copies[0])).read().endswith('"trai')


def test_a_fresh_start_moves_old_metrics_aside(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 1}\n')
  from fedjax_lab import metrics as metrics_lib
  metrics_lib.JsonlWriter(str(path), None)
  assert not path.exists()
  assert [p.read_text() for p in tmp_path.iterdir()] == ['{"round": 1}\n']


def test_divergence_is_flagged_from_the_losses():
  history = [{"round": r, "train_loss": v} for r, v in enumerate([2.0, 1.0, 25.0, 3.0], 1)]
  assert common.divergence(history, 10.0) == {"diverged": True, "diverged_round": 3}
  assert common.divergence(history, 20.0) == {"diverged": False, "diverged_round": None}
  assert common.divergence([{"round": 1, "train_loss": float("nan")}], 0)["diverged"]
  # Blown up from the first round: the final test loss against the initial model's.
  flat = [{"round": r, "train_loss": 1e5} for r in (1, 2)]
  assert common.divergence(flat, 10.0, {"initial_test_loss": 2.3, "test_loss": 1e5,
                                        "rounds": 2}) == {"diverged": True, "diverged_round": 2}


def test_a_huge_learning_rate_is_reported_diverged():
  _, history, summary = common.run(tiny_config(client_lr=1e6, rounds=3), progress=False)
  assert common.divergence(history, 10.0, summary)["diverged"]
  assert summary["test_loss"] > 10 * summary["initial_test_loss"]


def test_unknown_keys_and_names_are_one_line_before_data_loads():
  config = tiny_config()
  message = workdir_lib.unknown_override(["x", "--config.client_lrr=1"], config)
  assert message.startswith("error: unknown config key 'client_lrr'") and "client_lr" in message
  assert workdir_lib.unknown_override(["x", "--config.dp.clip=1", "--config.rounds=3"],
                                      config) is None
  for key, value in [("algorithm", "fedavgg"), ("partition", "dirichlett"), ("model", "vit")]:
    with pytest.raises(ValueError, match=f"Unknown {key} '{value}'"):
      common.check_names(tiny_config(**{key: value}))


def test_compilation_cache_flag_fills_the_directory_and_a_rerun_loads_from_it(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  cache = tmp_path / "cache"
  args = [sys.executable, "-m", "launch.train", "--progress=false", "--config.rounds=2",
          "--config.num_clients=10", "--config.clients_per_round=3",
          f"--compilation_cache={cache}", "--verbose_logs"]
  first, second = (subprocess.run(args, cwd=REPO, env={**env, "JAX_LOG_COMPILES": "1"},
                                  capture_output=True, text=True, timeout=600)
                   for _ in range(2))
  assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
  summaries = [json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, second)]
  for s in summaries:
    s.pop("wall_s")
  assert summaries[0] == summaries[1]
  assert len(os.listdir(cache)) >= 3             # the round, the evaluator, the init
  assert "Persistent compilation cache hit" not in first.stderr
  # The config's rounds_per_call = 10: the rounds are scan_rounds' padded scan.
  assert "Persistent compilation cache hit for 'jit_run_padded'" in second.stderr, \
      second.stderr[-3000:]
