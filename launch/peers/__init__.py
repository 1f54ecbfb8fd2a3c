"""Peer simulators (FedJAX, Flower) timed on the peers' digits workload.

Each peer runs in its own virtual environment (FedJAX needs jax 0.4.30; Flower brings
Ray), created on demand under ``~/.cache/fedjax_lab/peers/<name>`` (or
``$FEDJAX_LAB_PEERS_DIR/<name>``) and reused afterwards. The workload is written once as an
.npz (clients ``x [K, n, 64]``, ``y [K, n]``, evaluation digits, the starting MLP), each
peer script reads it, trains, and prints one JSON line. ``run_peers`` never raises for a
peer: a failed install or run becomes a row with ``ok: False`` and the error's last lines.

    rows = run_peers("/tmp/peers", repeats=5)
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ENV_VAR = "FEDJAX_LAB_PEERS_DIR"
COHORTS = (10, 50)


@dataclasses.dataclass(frozen=True)
class Peer:
  name: str             # venv folder and row "system" prefix
  script: str           # file in this folder, run with the venv's python
  requirements: tuple   # pip requirement strings
  check: str            # python statement that must succeed in a ready venv


PEERS = {
    "fedjax": Peer("fedjax", "fedjax_peer.py",
                   ("fedjax==0.0.17", "jax==0.4.30", "jaxlib==0.4.30", "dm-haiku==0.0.12",
                    "optax==0.2.2", "chex==0.1.86", "numpy<2", "scipy<1.14"),
                   "import fedjax, haiku"),
    "flower": Peer("flower", "flower_peer.py",
                   ("flwr[simulation]==1.42.*", "jax", "optax"),
                   "import flwr, ray, jax"),
}


def peers_dir(root: Optional[str] = None) -> str:
  return root or os.environ.get(ENV_VAR) or os.path.join(
      os.path.expanduser("~"), ".cache", "fedjax_lab", "peers")


def _run(cmd: Sequence[str], timeout: float, cwd: Optional[str] = None) -> tuple:
  """(returncode or None on timeout, stdout, stderr); kills the whole process group on timeout
  so that helpers a peer started (Ray) do not outlive it."""
  proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=cwd, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    return None, out, err + f"\ntimed out after {timeout:.0f} s"


def _tail(text: str, lines: int = 15) -> str:
  return "\n".join(text.strip().splitlines()[-lines:])


def ensure_venv(peer: Peer, root: Optional[str] = None, timeout: float = 1800) -> str:
  """Path of the peer venv's python, creating and installing the venv if needed.

  A venv that already passes ``peer.check`` is reused untouched. Raises RuntimeError with
  the tail of pip's output if creation or installation fails.
  """
  venv = os.path.join(peers_dir(root), peer.name)
  python = os.path.join(venv, "bin", "python")
  if os.path.exists(python):
    rc, _, _ = _run([python, "-c", peer.check], timeout=300)
    if rc == 0:
      return python
  else:
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    rc, out, err = _run([sys.executable, "-m", "venv", venv], timeout=300)
    if rc != 0:
      raise RuntimeError(f"python -m venv {venv} failed:\n{_tail(out + err)}")
  rc, out, err = _run([python, "-m", "pip", "install", *peer.requirements], timeout=timeout)
  if rc != 0:
    raise RuntimeError(f"pip install {' '.join(peer.requirements)} failed:\n{_tail(out + err)}")
  rc, out, err = _run([python, "-c", peer.check], timeout=300)
  if rc != 0:
    raise RuntimeError(f"installed, but `{peer.check}` fails:\n{_tail(out + err)}")
  return python


def workload_arrays(data=None, seed: int = 0) -> dict:
  """The peers' workload as plain arrays.

  Args:
    data: a ``FederatedData`` of equal-size clients with ``x [N, 8, 8, 1]`` and ``y``;
      None builds the benchmark's (50 digits clients of 30 examples; the benchmark itself
      passes its population, since it runs as ``__main__``).
    seed: init seed of the MLP (the benchmark's init uses 0).
  Returns:
    ``x float32 [K, n, 64]``, ``y int32 [K, n]``, ``eval_x [1797, 64]``/``eval_y`` (all
    digits), and the starting MLP ``w1 [64, 128]``, ``b1``, ``w2 [128, 10]``, ``b2``
    (fedjax_lab's init of ``models.mlp((128,))``).
  """
  import jax
  from fedjax_lab import models
  from fedjax_lab.data import digits
  if data is None:
    from launch.workloads import equal_digits_population
    data = equal_digits_population(50, 30)
  clients = [data.client(i) for i in range(data.num_clients)]
  sizes = {len(c["y"]) for c in clients}
  if len(sizes) != 1:
    raise ValueError(f"The peers' workload needs equal-size clients, got sizes {sorted(sizes)}.")
  x = np.stack([c["x"].reshape(len(c["y"]), -1) for c in clients]).astype(np.float32)
  y = np.stack([c["y"] for c in clients]).astype(np.int32)
  params = models.mlp((128,)).init(jax.random.PRNGKey(seed), data.arrays["x"][:1])["params"]
  every = digits()
  return {"x": x, "y": y,
          "eval_x": every["x"].reshape(len(every["y"]), -1).astype(np.float32),
          "eval_y": every["y"].astype(np.int32),
          "w1": np.asarray(params["Dense_0"]["kernel"]),
          "b1": np.asarray(params["Dense_0"]["bias"]),
          "w2": np.asarray(params["Dense_1"]["kernel"]),
          "b2": np.asarray(params["Dense_1"]["bias"])}


def _parse(stdout: str) -> dict:
  """The last line of stdout that is a JSON object."""
  for line in reversed(stdout.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      return json.loads(line)
  raise ValueError("no JSON line in the peer's output")


def run_peer(peer: Peer, npz_path: str, repeats: int, root: Optional[str] = None,
             timeout: float = 900, install_timeout: float = 1800) -> dict:
  """One peer's row; never raises (errors become ``ok: False`` rows)."""
  row = {"system": peer.name, "ok": False}
  start = time.perf_counter()
  try:
    python = ensure_venv(peer, root, install_timeout)
  except Exception as e:   # a peer that does not install must not stop the benchmark
    row.update(stage="install", error=_tail(str(e)))
    return row
  row["setup_s"] = time.perf_counter() - start
  cmd = [python, os.path.join(HERE, peer.script), f"--data={npz_path}",
         f"--repeats={max(repeats, 3)}", "--cohorts=" + ",".join(map(str, COHORTS))]
  start = time.perf_counter()
  try:
    rc, out, err = _run(cmd, timeout=timeout, cwd=os.path.dirname(npz_path))
  except Exception as e:
    row.update(stage="run", error=f"{type(e).__name__}: {e}")
    return row
  row["wall_s"] = time.perf_counter() - start
  if rc != 0:
    row.update(stage="run", returncode=rc, error=_tail(err or out))
    return row
  try:
    result = _parse(out)
  except ValueError as e:
    row.update(stage="parse", error=f"{e}:\n{_tail(out + err)}")
    return row
  row.update(result, ok=True)
  row["system"] = result.get("system", peer.name)
  return row


def run_peers(workdir: str, repeats: int, names: Sequence[str] = ("fedjax", "flower"),
              data=None, root: Optional[str] = None, timeout: float = 900) -> list:
  """Times each peer on the peers' digits workload; one row per peer, never raises.

  Args:
    workdir: folder for the workload .npz (created if missing).
    repeats: timed rounds per cohort (at least 3; median reported).
    names: peers to run, keys of ``PEERS``.
    data: optional ``FederatedData`` (see ``workload_arrays``).
    root: venv folder (default ``peers_dir()``).
    timeout: seconds allowed for each peer's run (installation has its own limit).
  Returns:
    rows with ``system``, ``ok`` and, when ok, ``c10_s_per_round``, ``c50_s_per_round``,
    ``c*_warmup_s``, ``accuracy``, ``checksum``; otherwise ``stage`` and ``error``.
  """
  unknown = [n for n in names if n not in PEERS]
  if unknown:
    raise ValueError(f"Unknown peers {unknown}; choose from {sorted(PEERS)}.")
  os.makedirs(workdir, exist_ok=True)
  npz_path = os.path.abspath(os.path.join(workdir, "peers_digits.npz"))
  try:
    np.savez(npz_path, **workload_arrays(data))
  except Exception as e:
    return [{"system": n, "ok": False, "stage": "data", "error": f"{type(e).__name__}: {e}"}
            for n in names]
  return [run_peer(PEERS[n], npz_path, repeats, root, timeout) for n in names]


def add_peer_ratios(rows: list, peer_rows: list, prefix: str = "peers_digits_c") -> None:
  """Puts each peer's seconds/round and ``<system>_over_ours`` into the benchmark rows.

  ``rows`` are the benchmark's rows; the row of workload ``peers_digits_c10`` gets the
  peers' cohort-10 figures, and so on. "ours" is the faster of the two vmap timings
  (``rounds_per_call`` 1 and 10) of that row, measured in the same run.
  """
  by_name = {r.get("workload"): r for r in rows}
  for peer in peer_rows:
    if not peer.get("ok"):
      continue
    for cohort in COHORTS:
      row = by_name.get(f"{prefix}{cohort}")
      seconds = peer.get(f"c{cohort}_s_per_round")
      ours = [row[k] for k in ("ours_vmap_s_per_round", "ours_vmap_rpc10_s_per_round")
              if row and k in row]
      if row is None or seconds is None or not ours:
        continue
      row[f"{peer['system']}_s_per_round"] = seconds
      for end in ("min", "max"):   # the spread of the peer's timed rounds
        if f"c{cohort}_s_per_round_{end}" in peer:
          row[f"{peer['system']}_s_per_round_{end}"] = peer[f"c{cohort}_s_per_round_{end}"]
      row[f"{peer['system']}_over_ours"] = seconds / min(ours)
