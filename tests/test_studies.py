"""Studies: each vmapped run equals launch.train's single run; one compile; frozen divergence;
chunked and resumed studies equal one go; launch.sweep's grid, checks and outputs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import studies, training
from launch import common, sweep
from launch.configs import fedavg_digits


def small_config(algorithm="fedavg"):
  config = fedavg_digits.get_config()
  config.algorithm = algorithm
  config.num_clients, config.clients_per_round, config.hidden = 20, 4, (16,)
  config.local_epochs, config.batch_size = 1, 16
  config.rounds, config.eval_every, config.checkpoint_every = 4, 2, 0
  return config


def single(config, values):
  """launch.train's summary for ``config`` with ``values`` (the single-run reference)."""
  _, history, summary = common.run(sweep.run_config(config, values), None, progress=False)
  return history, summary


@pytest.mark.parametrize("algorithm,extra,shard_runs", [
    # FedAvg's runs split over conftest's 8 CPU devices (4 runs padded to 8); the
    # unsharded study's runs equal their single runs in the divergence test below.
    ("fedavg", {}, True),
    pytest.param("fedprox", {"prox_mu": [0.01, 0.3]}, False, marks=pytest.mark.slow),
    pytest.param("scaffold", {}, False, marks=pytest.mark.slow)])
def test_each_run_equals_the_single_run(algorithm, extra, shard_runs):
  config = small_config(algorithm)
  sweeps = {"client_lr": [0.05, 0.2], **extra, "seed": [0, 3]}
  before = sweep.compile_counts()
  rows, result = sweep.run_study(config, sweeps, shard_runs=shard_runs)
  assert sweep.rounds_compiles(before, sweep.compile_counts()) == 1
  assert result.compiles == 1
  if shard_runs:   # the state lives on the 8 devices
    assert len(jax.tree.leaves(result.state.params)[0].sharding.device_set) == 8
  assert len(rows) == 2 * 2 * (2 if extra else 1)
  # Two runs of the grid against their single runs (different rate, seed and mu).
  # FedAvg: two runs; the others: the last (other rate, seed and mu than the first).
  for index in ((0, len(rows) - 1) if algorithm == "fedavg" else (len(rows) - 1,)):
    run = {k: rows[index][k] for k in sweeps}
    history, summary = single(config, run)
    assert abs(rows[index]["test_loss"] - summary["test_loss"]) < 1e-5, run
    assert abs(rows[index]["test_accuracy"] - summary["test_accuracy"]) < 1e-6
    np.testing.assert_allclose(result.train_loss[index], [h["train_loss"] for h in history],
                               rtol=1e-5, atol=1e-6)
    evals = [h["test_loss"] for h in history if "test_loss" in h]
    np.testing.assert_allclose(result.test["loss"][index], evals, rtol=1e-5, atol=1e-6)
  assert result.eval_rounds == (2, 4)
  assert not result.diverged.any()
  # The values make different runs.
  assert len({round(r["test_loss"], 6) for r in rows}) == len(rows)


def test_a_diverging_run_is_frozen_and_the_others_go_on():
  config = small_config()
  rows, result = sweep.run_study(config, {"server_lr": [1.0, 1e12]})
  good, bad = rows
  assert not good["diverged"] and good["test_loss"] is not None
  assert bad["diverged"] and bad["test_loss"] is None
  # The single run stops at the same round and keeps the state before it.
  with pytest.raises(training.NonFiniteLossError, match=f"round {bad['diverged_round']};"):
    single(config, {"server_lr": 1e12})
  first = bad["diverged_round"]
  assert 2 <= first <= config.rounds   # a run that trained a while before diverging
  assert np.isnan(result.train_loss[1, first - 1:]).all()
  assert np.isfinite(result.train_loss[1, :first - 1]).all()
  assert int(result.state.round[1]) == first - 1
  frozen = jax.tree.map(lambda x: x[1], result.state.params)
  config.rounds, config.server_lr = first - 1, 1e12
  exp = common.build(config)
  state, _ = training.train(exp.algorithm, exp.init_params, exp.train_data, opts=training.TrainOptions(
      rounds=first - 1, clients_per_round=config.clients_per_round, seed=config.seed,
      progress=False, eval_every=0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               frozen, state.params)
  # The good run is that of a study without the bad one (same program, other runs).
  assert abs(good["test_loss"] - single(small_config(), {"server_lr": 1.0})[1]["test_loss"]) < 1e-5


@pytest.mark.slow
def test_chunked_and_resumed_study_equals_one_go(tmp_path):
  config = small_config()
  build, exp, sampler, slots = sweep.study_setup(config, ["client_lr"])
  from fedjax_lab import metrics as metrics_lib
  evaluate = metrics_lib.make_evaluator(exp.model)
  hp, seeds = {"client_lr": [0.05, 0.1, 0.2, 0.3, 0.15]}, [0, 1, 2, 3, 4]
  kw = dict(clients_per_round=slots, eval_every=2)
  whole = studies.train_many(build, hp, seeds, exp.train_data, evaluate, exp.test_arrays,
                             rounds=4, **kw)
  # Interrupted after 2 rounds, resumed to 4, 2 runs vectorised at a time (3 groups).
  workdir = str(tmp_path / "study")
  part = studies.train_many(build, hp, seeds, exp.train_data, evaluate, exp.test_arrays,
                            rounds=2, workdir=workdir, checkpoint_every=2, runs_per_chunk=2, **kw)
  assert part.train_loss.shape == (5, 2)
  resumed = studies.train_many(build, hp, seeds, exp.train_data, evaluate, exp.test_arrays,
                               rounds=4, workdir=workdir, checkpoint_every=2, runs_per_chunk=2,
                               **kw)
  np.testing.assert_allclose(resumed.train_loss, whole.train_loss, rtol=1e-6)
  for k in whole.test:
    np.testing.assert_allclose(resumed.test[k], whole.test[k], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               resumed.state.params, whole.state.params)
  with pytest.raises(ValueError, match="other hyper-parameters or seeds"):
    studies.train_many(build, {"client_lr": [0.05, 0.1, 0.2, 0.3, 0.4]}, seeds, exp.train_data,
                       evaluate, exp.test_arrays, rounds=6, workdir=workdir, checkpoint_every=2,
                       **kw)


def test_grid_parsing_and_the_keys_a_study_can_vary():
  sweeps = sweep.parse_sweeps(["client_lr:0.1,0.3", "seed:0,1,2"])
  assert sweeps == {"client_lr": [0.1, 0.3], "seed": [0, 1, 2]}
  runs = sweep.grid(sweeps)
  assert len(runs) == 6 and runs[0] == {"client_lr": 0.1, "seed": 0}
  assert runs[-1] == {"client_lr": 0.3, "seed": 2}
  for bad, match in (["client_lr"], "KEY:V1"), (["seed:0.5"], "integers"), \
                    (["client_lr:a"], "numbers"), (["seed:1", "seed:2"], "twice"):
    with pytest.raises(ValueError, match=match):
      sweep.parse_sweeps(bad)
  config = small_config()
  for key in ("local_epochs", "data_seed", "nope"):
    with pytest.raises(ValueError, match=repr(key)):
      sweep.check_vmappable(config, [key])
  sweep.check_vmappable(config, ["client_lr", "server_lr", "prox_mu", "seed"])


def test_outputs_runs_jsonl_and_plot(tmp_path):
  rows = [{"client_lr": lr, "seed": s, "test_accuracy": None if lr > 1 else 0.5 + lr,
           "test_loss": None if lr > 1 else 1.0, "diverged": lr > 1, "diverged_round": None,
           "curve": [[2, 0.3], [4, 0.5]] if lr < 1 else []}
          for lr in (0.1, 0.3, 10.0) for s in (0, 1)]
  path = sweep.write_runs(rows, str(tmp_path / "runs.jsonl"))
  lines = [json.loads(line) for line in open(path)]
  assert lines[0] == {"client_lr": 0.1, "seed": 0, "test_accuracy": 0.6, "test_loss": 1.0,
                      "diverged": False, "diverged_round": None}
  assert lines[-1]["diverged"] and lines[-1]["test_accuracy"] is None
  sweeps = {"client_lr": [0.1, 0.3, 10.0], "seed": [0, 1]}
  assert os.path.getsize(sweep.plot(rows, sweeps, str(tmp_path / "a.png"))) > 1000
  two = [{**r, "server_lr": 1.0} for r in rows]
  assert os.path.getsize(sweep.plot(two, {"client_lr": [0.1, 0.3, 10.0], "server_lr": [1.0],
                                          "seed": [0, 1]}, str(tmp_path / "b.png"))) > 1000


@pytest.mark.slow
def test_runs_sharded_over_devices_equal_the_unsharded_study():
  # conftest gives 8 CPU devices; 5 runs over 4 of them, one run vectorised at a time:
  # padding (to 8), groups on each device and the shard_map all take part.
  config = small_config()
  config.rounds, config.eval_every = 2, 2
  build, exp, _, slots = sweep.study_setup(config, ["client_lr"])
  from fedjax_lab import metrics as metrics_lib
  evaluate = metrics_lib.make_evaluator(exp.model)
  hp, seeds = {"client_lr": [0.05, 0.1, 0.2, 0.3, 0.15]}, [0, 1, 2, 3, 4]
  kw = dict(rounds=2, clients_per_round=slots, eval_every=2)
  whole = studies.train_many(build, hp, seeds, exp.train_data, evaluate, exp.test_arrays, **kw)
  mesh = studies.runs_mesh(jax.devices()[:4])
  sharded = studies.train_many(build, hp, seeds, exp.train_data, evaluate, exp.test_arrays,
                               mesh=mesh, runs_per_chunk=1, **kw)
  assert sharded.compiles == 1
  np.testing.assert_allclose(sharded.train_loss, whole.train_loss, rtol=1e-6)
  for k in whole.test:
    np.testing.assert_allclose(sharded.test[k], whole.test[k], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               sharded.state.params, whole.state.params)
  # The program really runs on the 4 devices (one shard of runs each).
  program = studies.make_program(build, exp.train_data, slots, evaluate, 2, mesh=mesh)
  arrays, offsets = exp.train_data.device_arrays()
  hlo = program.lower(*studies._stack_hparams(hp, seeds), None, arrays, offsets,
                      exp.test_arrays, start=0, stop=2, last=True).as_text()
  assert "num_partitions = 4" in hlo
  with pytest.raises(ValueError, match="one axis 'runs'"):
    studies.make_program(build, exp.train_data, slots, evaluate, 2,
                         mesh=jax.sharding.Mesh(np.array(jax.devices()[:2]), ("clients",)))
