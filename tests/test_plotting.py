"""Plot helpers, launch.plot and TensorBoard output, checked against the logged numbers."""
import glob
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from fedjax_lab import plotting, training
from fedjax_lab.client import LocalSchedule
from fedjax_lab.metrics import read_jsonl
from reference import linear_example_loss, linear_problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses: one device, and XLA without LLVM optimisations (compilation dominates).
SUBPROCESS_ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_event_scalars(logdir):
  """Independent reader: TFRecord framing + the Event proto -> ({(tag, step): value}, events)."""
  from tensorboardX.proto import event_pb2
  scalars, events = {}, []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]     # skip the length's crc
      offset += 12 + length + 4                             # and the payload's crc
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars, events


def assert_png(path, min_bytes=5000):
  """A PNG file that is not blank: right signature, real size, more than one colour."""
  import matplotlib.image
  with open(path, "rb") as f:
    head = f.read(8)
  assert head == PNG_SIGNATURE, path
  assert os.path.getsize(path) > min_bytes, (path, os.path.getsize(path))
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10


class ListWriter:
  def __init__(self):
    self.records = []

  def write(self, record):
    self.records.append(dict(record))


def tiny_run(workdir=None, rounds=6, writers=()):
  data, params = linear_problem((5, 3, 7, 2, 9, 4), seed=1)
  x, y = jnp.asarray(data.arrays["x"]), jnp.asarray(data.arrays["y"])

  def evaluate(p, arrays):
    residual = arrays["x"] @ p["w"] + p["b"] - arrays["y"]
    return {"loss": jnp.mean(0.5 * residual ** 2), "accuracy": jnp.mean(jnp.abs(residual) < 0.5)}

  method = fedavg(linear_example_loss, 0.05, schedule=LocalSchedule(batch_size=2))
  opts = training.TrainOptions(rounds=rounds, clients_per_round=3, eval_every=2,
                               rounds_per_call=2, workdir=workdir, progress=False,
                               writers=writers)
  return training.train(method, jax.tree.map(jnp.asarray, params), data, evaluate,
                        {"x": x, "y": y}, opts)


@pytest.fixture(scope="module")
def history():
  return tiny_run()[1]


@pytest.fixture(scope="module")
def launch_workdir(tmp_path_factory):
  """A real run directory: launch.train with --tensorboard on a small digits run."""
  workdir = tmp_path_factory.mktemp("run") / "fedavg_digits"
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--workdir={workdir}", "--tensorboard",
       "--progress=false", "--config.rounds=6", "--config.eval_every=2",
       "--config.rounds_per_call=2", "--config.num_clients=20",
       "--config.clients_per_round=5", "--config.local_epochs=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


def test_label_distribution_matches_per_client_bincount(launch_workdir):
  from launch.plot import client_data_from_config
  data = client_data_from_config(launch_workdir)
  counts = plotting.label_distribution(data, num_classes=10)
  assert counts.shape == (20, 10)
  for i in range(data.num_clients):
    np.testing.assert_array_equal(counts[i], np.bincount(data.client(i)["y"], minlength=10))
  np.testing.assert_array_equal(counts.sum(axis=1), data.client_sizes)


def test_metric_series_and_plot_metrics_draw_the_logged_numbers(history):
  rounds, values = plotting.metric_series(history, "test_loss")
  assert rounds.tolist() == [2, 4, 6]
  np.testing.assert_array_equal(values, [history[r - 1]["test_loss"] for r in (2, 4, 6)])
  fig = plotting.plot_metrics(history)
  drawn = {ax.get_title(): ax.get_lines()[0].get_data() for ax in fig.axes if ax.get_lines()}
  assert set(drawn) == {"train loss", "test loss", "test accuracy"}
  np.testing.assert_array_equal(drawn["train loss"][0], np.arange(1, 7))
  np.testing.assert_array_equal(drawn["train loss"][1], [r["train_loss"] for r in history])
  np.testing.assert_array_equal(drawn["test loss"][1], values)


def test_each_plot_helper_writes_a_non_empty_png(history, launch_workdir, tmp_path):
  from launch.plot import client_data_from_config
  other = [dict(r, train_loss=2 * r["train_loss"]) for r in history]
  figures = {
      "metrics": plotting.plot_metrics(history, title="tiny"),
      "metrics_from_workdir": plotting.plot_metrics(launch_workdir),
      "comparison": plotting.plot_comparison({"a": history, "b": other}),
      "clients": plotting.plot_client_statistics(client_data_from_config(launch_workdir)),
  }
  for name, fig in figures.items():
    path = plotting.save_figure(fig, tmp_path / "out" / f"{name}.png")
    assert_png(path)
  # Notebooks display the figures through _repr_png_, without pyplot.
  assert figures["metrics"]._repr_png_().startswith(PNG_SIGNATURE)
  comparison = figures["comparison"]
  loss_ax = [ax for ax in comparison.axes if ax.get_title() == "train loss"][0]
  first, second = (line.get_data()[1] for line in loss_ax.get_lines())
  np.testing.assert_allclose(second, 2 * first)
  assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["a", "b"]


def test_plot_errors_name_the_problem(history, tmp_path):
  with pytest.raises(ValueError, match="Unknown metric.*nope.*train_loss"):
    plotting.plot_metrics(history, keys=["nope"])
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    plotting.load_history(str(tmp_path))
  with pytest.raises(ValueError, match="at least one run"):
    plotting.plot_comparison({})


def test_launch_plot_turns_a_workdir_into_pngs(launch_workdir, tmp_path):
  second = tmp_path / "second_run"
  second.mkdir()
  shutil.copy(os.path.join(launch_workdir, "metrics.jsonl"), second / "metrics.jsonl")
  out = tmp_path / "plots"
  result = subprocess.run(
      [sys.executable, "-m", "launch.plot", f"--workdir={launch_workdir}",
       f"--compare={second}", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  written = result.stdout.split()
  assert sorted(os.path.basename(p) for p in written) == [
      "clients.png", "comparison.png", "metrics.png"]
  for path in written:
    assert_png(path)
  from launch.plot import make_plots
  with pytest.raises(FileNotFoundError, match="No metrics file"):
    make_plots(str(tmp_path / "absent"), str(out))


def test_tensorboard_scalars_equal_the_jsonl_values(launch_workdir):
  records = read_jsonl(os.path.join(launch_workdir, "metrics.jsonl"))
  assert [r["round"] for r in records] == list(range(1, 7))
  scalars, _ = read_event_scalars(os.path.join(launch_workdir, "tensorboard"))
  expected = {(k, r["round"]): v for r in records for k, v in r.items() if k != "round"}
  assert set(scalars) == set(expected)
  assert {k for k, _ in expected} >= {"train_loss", "test_accuracy", "test_loss"}
  for key, value in expected.items():
    assert scalars[key] == np.float32(value), key    # TensorBoard stores float32


def test_writers_hook_gets_the_records_and_tensorboard_purges_on_resume(tmp_path, history):
  unhooked = history
  listed = ListWriter()
  logdir = str(tmp_path / "tb")
  workdir = str(tmp_path / "run")
  with plotting.TensorBoardWriter(logdir) as tb:
    _, history = tiny_run(workdir, rounds=3, writers=[listed, tb])
  assert listed.records == history
  assert listed.records == read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["train_loss"] for r in history] == [r["train_loss"] for r in unhooked[:3]]
  with plotting.TensorBoardWriter(logdir) as tb:
    _, resumed = tiny_run(workdir, rounds=5, writers=[tb])
  assert [r["round"] for r in resumed] == [4, 5]
  scalars, events = read_event_scalars(logdir)
  starts = [e.step for e in events if e.HasField("session_log")]
  assert starts == [1, 4]     # each writer asks TensorBoard to drop steps >= its first round
  all_records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  for record in all_records:
    assert scalars[("train_loss", record["round"])] == np.float32(record["train_loss"])
