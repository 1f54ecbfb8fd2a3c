"""The peers' arithmetic against fedjax_lab; run_peers' error handling (no venvs, no network)."""
import json

import jax
import numpy as np
import pytest

import launch.peers as peers
from algorithms.fedavg import fedavg
from fedjax_lab import models
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data import FederatedData, digits
from launch.peers import flower_peer
from reference import run_rounds

SIZES = (30, 23, 12)   # one full client, two with a partial last batch


def _digits_clients(sizes):
  arrays = digits()
  n = sum(sizes)
  x = arrays["x"][:n].reshape(n, 64)
  ids = np.repeat(np.arange(len(sizes)), sizes)
  return FederatedData.from_client_ids({"x": x, "y": arrays["y"][:n]}, ids, len(sizes))


def _as_list(params):
  p = params["params"]
  return [np.asarray(p["Dense_0"]["kernel"]), np.asarray(p["Dense_0"]["bias"]),
          np.asarray(p["Dense_1"]["kernel"]), np.asarray(p["Dense_1"]["bias"])]


def test_flower_client_round_equals_fedjax_lab_fedavg_round():
  data = _digits_clients(SIZES)
  model = models.mlp((128,))
  params = model.init(jax.random.PRNGKey(0), data.arrays["x"][:1])
  method = fedavg(models.classification_loss(model), client_lr=0.1, server_lr=1.0,
                  schedule=LocalSchedule(batch_size=10, epochs=1, shuffle=False))
  ours = _as_list(run_rounds(method, data, params, 1)[-1].params)
  clients = [(data.client(i)["x"], data.client(i)["y"]) for i in range(data.num_clients)]
  theirs = flower_peer.fedavg_round(_as_list(params), clients, lr=0.1, batch_size=10)
  moved = max(np.max(np.abs(a - b)) for a, b in zip(theirs, _as_list(params)))
  assert moved > 1e-2   # the round does something measurable
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
  # Weighting by example counts matters here: the uniform average lands elsewhere.
  locals_ = [flower_peer.local_sgd(_as_list(params), x, y, 0.1, 10) for x, y in clients]
  uniform = flower_peer.weighted_average([(p, 1) for p in locals_])
  assert max(np.max(np.abs(a - b)) for a, b in zip(uniform, theirs)) > 1e-4


def test_flower_local_sgd_is_sequential_minibatch_sgd():
  """One step by hand in numpy: the first batch's mean cross-entropy gradient."""
  data = _digits_clients((10,))
  x, y = data.client(0)["x"].astype(np.float64), data.client(0)["y"]
  rng = np.random.default_rng(0)
  params = [rng.normal(size=(64, 128)) * 0.1, np.zeros(128), rng.normal(size=(128, 10)) * 0.1,
            np.zeros(10)]
  w1, b1, w2, b2 = params
  pre = x @ w1 + b1
  h = np.maximum(pre, 0)
  logits = h @ w2 + b2
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dlogits = (p - np.eye(10)[y]) / len(y)
  dh = dlogits @ w2.T * (pre > 0)
  grads = [x.T @ dh, dh.sum(0), h.T @ dlogits, dlogits.sum(0)]
  expected = [a - 0.5 * g for a, g in zip(params, grads)]
  got = flower_peer.local_sgd([a.astype(np.float32) for a in params], x.astype(np.float32), y,
                              0.5, 10)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_workload_arrays_are_the_benchmark_population():
  arrays = peers.workload_arrays()
  assert arrays["x"].shape == (50, 30, 64) and arrays["y"].shape == (50, 30)
  assert arrays["w1"].shape == (64, 128) and arrays["b2"].shape == (10,)
  assert arrays["eval_x"].shape == (1797, 64)
  # Every client row is a real digit (rows of the evaluation set).
  every = {row.tobytes() for row in arrays["eval_x"]}
  assert all(row.tobytes() in every for row in arrays["x"].reshape(-1, 64)[:100])


def _fake_run(responses):
  calls = []

  def run(cmd, timeout, cwd=None):
    calls.append(list(cmd))
    return responses(cmd)
  return run, calls


@pytest.fixture
def small_workload(monkeypatch):
  fake = {k: np.zeros((2, 2), np.float32) for k in ("x", "y", "eval_x", "eval_y")}
  monkeypatch.setattr(peers, "workload_arrays", lambda data=None: fake)


def test_failed_install_is_a_row(monkeypatch, tmp_path, small_workload):
  error = "ERROR: No matching distribution found for jaxlib==0.4.30"
  run, _ = _fake_run(lambda cmd: (1, "", error))
  monkeypatch.setattr(peers, "_run", run)
  rows = peers.run_peers(str(tmp_path / "work"), 3, names=("fedjax",),
                         root=str(tmp_path / "venvs"))
  assert rows[0]["ok"] is False and rows[0]["stage"] == "install"
  assert error in rows[0]["error"]


def test_failed_or_timed_out_run_is_a_row(monkeypatch, tmp_path, small_workload):
  monkeypatch.setattr(peers, "ensure_venv", lambda peer, root=None, timeout=0: "/venv/bin/python")
  trace = "Traceback (most recent call last):\n  ...\nRuntimeError: Ray could not start"
  outcomes = iter([(1, "", trace), (None, "", "timed out after 900 s"), (0, "no json here", "")])
  monkeypatch.setattr(peers, "_run", lambda cmd, timeout, cwd=None: next(outcomes))
  rows = peers.run_peers(str(tmp_path), 3, names=("flower", "fedjax", "flower"))
  assert [r["ok"] for r in rows] == [False, False, False]
  assert rows[0]["stage"] == "run"
  assert rows[0]["error"].endswith("RuntimeError: Ray could not start")
  assert rows[1]["stage"] == "run" and "timed out" in rows[1]["error"]
  assert rows[2]["stage"] == "parse"


def test_peer_json_becomes_figures_and_ratios(monkeypatch, tmp_path, small_workload):
  monkeypatch.setattr(peers, "ensure_venv", lambda peer, root=None, timeout=0: "/venv/bin/python")
  line = json.dumps({"system": "fedjax_default", "c10_s_per_round": 0.004,
                     "c50_s_per_round": 0.02, "accuracy": 0.8})
  run, calls = _fake_run(lambda cmd: (0, "log line\n" + line + "\n", "warnings"))
  monkeypatch.setattr(peers, "_run", run)
  rows = peers.run_peers(str(tmp_path), 5, names=("fedjax",))
  assert rows[0]["ok"] and rows[0]["system"] == "fedjax_default"
  assert calls[0][0] == "/venv/bin/python" and calls[0][1].endswith("fedjax_peer.py")
  assert "--repeats=5" in calls[0]
  bench = [{"workload": "peers_digits_c10", "ours_vmap_s_per_round": 0.001,
            "ours_vmap_rpc10_s_per_round": 0.0008},
           {"workload": "peers_digits_c50", "ours_vmap_s_per_round": 0.004}]
  peers.add_peer_ratios(bench, rows + [{"system": "flower", "ok": False, "error": "x"}])
  assert bench[0]["fedjax_default_over_ours"] == pytest.approx(5.0)
  assert bench[1]["fedjax_default_over_ours"] == pytest.approx(5.0)
  assert "flower_over_ours" not in bench[0]


def test_unknown_peer_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="choose from"):
    peers.run_peers(str(tmp_path), 3, names=("pysyft",))
