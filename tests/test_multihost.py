"""The sharded backend across two processes (gloo collectives on CPU) equals one process.

Two worker processes of 4 CPU devices each join one run on localhost; the cohort of 5
clients is padded to 8 and split over the 8 global devices, so half the clients train
in the other process and the aggregate crosses the process boundary. Their final
states must equal the single-process vmap run computed here.
"""
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_worker as worker
from fedjax_lab import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_PROCESSES = 2
TIMEOUT_S = 150


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_workers(tmp_path):
  address = f"localhost:{free_port()}"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  # LLVM optimisations off: the workers' time is mostly compilation, which this cuts.
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={worker.LOCAL_DEVICES} "
      "--xla_backend_optimization_level=0"))
  procs = []
  for rank in range(NUM_PROCESSES):
    out = tmp_path / f"process{rank}.npz"
    cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py"), address,
           str(NUM_PROCESSES), str(rank), str(out)]
    procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True), out))
  return procs


def wait_for(procs, deadline):
  """Each worker's results; fails with every worker's stderr on error or timeout."""
  logs, failed = [], False
  for rank, (proc, out) in enumerate(procs):
    try:
      _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for other, _ in procs:   # one stuck worker blocks the others in a collective
        other.kill()
      _, err = proc.communicate()
      err = f"(killed after {TIMEOUT_S} s)\n{err}"
      failed = True
    failed |= proc.returncode != 0
    lines = [l for l in err.splitlines() if not l.startswith("[Gloo]")]
    logs.append(f"--- process {rank} (exit {proc.returncode}):\n" + "\n".join(lines[-40:]))
  if failed:
    pytest.fail("multi-process run failed:\n" + "\n".join(logs))
  return [dict(np.load(out)) for _, out in procs]


def test_two_processes_sharded_equal_one_process_vmap(tmp_path):
  procs = start_workers(tmp_path)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    expected = {}
    for name in worker.METHODS:   # computed while the workers run
      state, metrics = worker.run(name, "vmap")
      expected.update(worker.flatten(name, distributed.to_host(state)))
      expected[f"{name}/train_loss"] = np.asarray(metrics["train_loss"])
  except BaseException:
    for proc, _ in procs:
      proc.kill()
      proc.communicate()
    raise
  results = wait_for(procs, deadline)
  assert sorted(int(r["process_index"]) for r in results) == list(range(NUM_PROCESSES))
  assert all(int(r["device_count"]) == NUM_PROCESSES * worker.LOCAL_DEVICES for r in results)
  # to_host gathers rows held by the other process; differing values are caught.
  rows = np.repeat(np.arange(NUM_PROCESSES, dtype=np.float32), worker.LOCAL_DEVICES)
  checks = {"gathered_rows", "mismatch_detected"}
  for r in results:
    np.testing.assert_array_equal(r["gathered_rows"], np.repeat(rows[:, None], 2, axis=1))
    assert bool(r["mismatch_detected"])
  # SCAFFOLD's per-client control variates and global control are in the state too.
  assert any("client_states" in k for k in expected if k.startswith("scaffold/"))
  worst = 0.0
  for result in results:
    assert set(result) - {"process_index", "device_count"} - checks == set(expected)
    for key, want in expected.items():
      np.testing.assert_allclose(result[key], want, atol=1e-5, rtol=1e-5, err_msg=key)
      if np.issubdtype(want.dtype, np.floating):
        worst = max(worst, float(np.max(np.abs(result[key] - want), initial=0.0)))
  # The two processes hold the very same state.
  for key in expected:
    np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
  print(f"max |multi-process sharded - vmap| = {worst:.3g}")


def test_initialize_rejects_bad_arguments_before_touching_jax():
  with pytest.raises(ValueError, match="cpu_collectives 'nccl'.*gloo, mpi"):
    distributed.initialize("localhost:1", 2, 0, cpu_collectives="nccl")
  with pytest.raises(ValueError, match=r"process_id must be an int in \[0, 2\)"):
    distributed.initialize("localhost:1", 2, 2)
  with pytest.raises(ValueError, match="num_processes must be a positive int"):
    distributed.initialize("localhost:1", 0, 0)
  with pytest.raises(ValueError, match="local_device_count must be a positive int"):
    distributed.initialize("localhost:1", 2, 0, local_device_count=0)
  jax.devices()   # this process already runs JAX: joining now must fail clearly
  with pytest.raises(RuntimeError, match="before any JAX computation"):
    distributed.initialize("localhost:1", 2, 0)


def test_single_process_helpers_are_identities():
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int32(4)}
  replicated = distributed.replicate(tree)
  assert replicated["a"].sharding.is_fully_replicated
  assert len(replicated["a"].sharding.device_set) == jax.device_count()
  back = distributed.to_host(replicated)
  np.testing.assert_array_equal(back["a"], tree["a"])
  assert distributed.is_lead_process()
  distributed.check_same_on_all_processes(tree)   # one process: nothing to compare
  assert not np.array_equal(distributed.fingerprint(tree),
                            distributed.fingerprint({**tree, "b": np.int32(5)}))
