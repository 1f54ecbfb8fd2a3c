"""Pictures of runs and of federated data, and TensorBoard scalars.

Shared by the notebooks and ``launch/plot.py``. A run's history is the list of
per-round records that ``training.train`` returns and writes to ``metrics.jsonl``:
``{'round': r, 'train_loss': ..., 'test_accuracy': ... (eval rounds only), ...}``.

Every plot helper returns a ``matplotlib.figure.Figure`` built without pyplot, so
nothing depends on a display or on pyplot's global state: ``save_figure`` renders
it with the Agg backend (headless machines, launch scripts), and in a notebook a
figure left as a cell's last value is displayed as a PNG, with or without
``%matplotlib inline``.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:   # only for annotations: plotting a log needs no JAX
  from fedjax_lab.data.federated import FederatedData

History = Sequence[Mapping]
HistoryLike = Union[History, str, os.PathLike]

# The curves drawn when no keys are given (those a run logged).
_DEFAULT_KEYS = ("train_loss", "test_loss", "test_accuracy")


class PlotFigure(Figure):
  """A ``Figure`` that IPython displays as a PNG even when pyplot was never imported."""

  def _repr_png_(self) -> bytes:
    buffer = io.BytesIO()
    self.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def load_history(source: HistoryLike) -> list[dict]:
  """A run's records from a list, a ``metrics.jsonl`` path or a workdir holding one.

  Raises:
    FileNotFoundError: naming the path when no metrics file exists there.
  """
  if not isinstance(source, (str, os.PathLike)):
    return [dict(record) for record in source]
  path = os.fspath(source)
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No metrics file at {path}; run launch.train with --workdir "
                            f"to write one.")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def metric_series(history: HistoryLike, key: str) -> tuple[np.ndarray, np.ndarray]:
  """``(rounds int64 [T], values float64 [T])`` of the records that hold ``key``.

  Test metrics are only in the records of evaluation rounds, so ``T`` may be
  smaller than the number of rounds.
  """
  records = [r for r in load_history(history) if _is_number(r.get(key))]
  rounds = np.array([r["round"] for r in records], np.int64)
  values = np.array([r[key] for r in records], np.float64)
  return rounds, values


def label_distribution(data: FederatedData, num_classes: Optional[int] = None) -> np.ndarray:
  """Examples of each class held by each client, int64 ``[num_clients, num_classes]``.

  Args:
    data: the federated population; ``data.arrays['y']`` holds integer labels ``[n]``.
    num_classes: number of columns (default: largest label + 1).
  """
  from fedjax_lab.data import label_counts   # pylint: disable=import-outside-toplevel
  if "y" not in data.arrays:
    raise ValueError(f"No label array 'y' in the data; it has {', '.join(sorted(data.arrays))}.")
  if num_classes is None:
    labels = np.asarray(data.arrays["y"])
    num_classes = int(labels.max()) + 1 if labels.size else 1
  return label_counts(data, num_classes)


def plot_metrics(history: HistoryLike, keys: Optional[Sequence[str]] = None,
                 title: Optional[str] = None) -> Figure:
  """Curves of one run against the round, one panel per metric.

  Args:
    history: records, a ``metrics.jsonl`` path or a workdir.
    keys: metrics to draw (default: those of ``train_loss, test_loss,
      test_accuracy`` the run logged).
    title: figure title.
  """
  records = load_history(history)
  keys = _pick_keys([records], keys)
  fig, axes = _panels(len(keys))
  for ax, key in zip(axes, keys):
    rounds, values = metric_series(records, key)
    ax.plot(rounds, values, marker="o" if len(rounds) < 30 else None, markersize=3)
    _label(ax, key)
  if title:
    fig.suptitle(title)
  return fig


def plot_comparison(runs: Mapping[str, HistoryLike],
                    keys: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Figure:
  """Several runs side by side: one panel per metric, one line per run.

  Args:
    runs: label -> records, ``metrics.jsonl`` path or workdir.
    keys: metrics to draw (default: those of ``test_accuracy, train_loss,
      test_loss`` that any run logged).
    title: figure title.
  """
  if not runs:
    raise ValueError("plot_comparison needs at least one run.")
  loaded = {name: load_history(h) for name, h in runs.items()}
  keys = _pick_keys(loaded.values(), keys,
                    default=("test_accuracy", "train_loss", "test_loss"))
  fig, axes = _panels(len(keys))
  for ax, key in zip(axes, keys):
    for name, records in loaded.items():
      rounds, values = metric_series(records, key)
      ax.plot(rounds, values, label=name)
    _label(ax, key)
    ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  return fig


def plot_client_statistics(data: FederatedData, num_classes: Optional[int] = None,
                           max_clients: int = 100) -> Figure:
  """Examples per client (bars) and each client's label mix (heatmap).

  Args:
    data: the federated population.
    num_classes: columns of the heatmap (default: largest label + 1).
    max_clients: draw only the first ``max_clients`` clients.
  """
  counts = label_distribution(data, num_classes)[:max_clients]
  sizes = counts.sum(axis=1)
  fig = PlotFigure(figsize=(11, 4), layout="constrained")
  left, right = fig.subplots(1, 2, width_ratios=(1, 1.3))
  left.bar(np.arange(len(sizes)), sizes, width=1.0)
  left.set_xlabel("client")
  left.set_ylabel("examples")
  left.set_title(f"examples per client (mean {sizes.mean():.1f}, max {sizes.max()})")
  fractions = counts / np.maximum(sizes[:, None], 1)
  image = right.imshow(fractions.T, aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=0.0, vmax=1.0)
  right.set_xlabel("client")
  right.set_ylabel("class")
  right.set_title("share of each class per client")
  fig.colorbar(image, ax=right, label="fraction of the client's examples")
  return fig


def save_figure(fig: Figure, path: Union[str, os.PathLike], dpi: int = 100) -> str:
  """Writes ``fig`` as a PNG (Agg backend), creating the folder; returns the path."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=dpi, format="png")
  return path


class TensorBoardWriter:
  """Writes the numeric fields of round records as TensorBoard scalars (tensorboardX).

  Use it as a ``TrainOptions.writers`` entry (or with ``training.extra_writers``):
  each field but ``round`` becomes the scalar of that tag at step ``round``. The
  event file is opened at the first record with ``purge_step`` = that round, so
  after a resume TensorBoard drops the events a killed run wrote past its last
  checkpoint, as ``metrics.jsonl`` does.
  """

  def __init__(self, logdir: Union[str, os.PathLike], flush_secs: int = 10):
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("TensorBoard output needs tensorboardX: pip install tensorboardX") from e
    self._summary_writer_cls = tensorboardX.SummaryWriter
    self.logdir = os.fspath(logdir)
    self.flush_secs = flush_secs
    self._writer = None

  def write(self, record: Mapping) -> None:
    """Adds every numeric field of ``record`` but ``round`` at step ``record['round']``."""
    step = int(record["round"])
    if self._writer is None:
      self._writer = self._summary_writer_cls(self.logdir, purge_step=step,
                                              flush_secs=self.flush_secs)
    for key, value in record.items():
      if key != "round" and _is_number(value):
        self._writer.add_scalar(key, float(value), step)

  def flush(self) -> None:
    """Writes pending events to disk (they are also flushed every ``flush_secs``)."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file; a later ``write`` opens a new one."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pick_keys(histories: Iterable[History], keys: Optional[Sequence[str]],
               default: Sequence[str] = _DEFAULT_KEYS) -> list[str]:
  present = set()
  for records in histories:
    for record in records:
      present.update(k for k, v in record.items() if _is_number(v))
  if keys is None:
    keys = [k for k in default if k in present]
    if not keys:
      raise ValueError(f"The run has none of the metrics {', '.join(default)}; pass keys=... "
                       f"from {', '.join(sorted(present - {'round'})) or 'nothing'}.")
    return keys
  missing = [k for k in keys if k not in present]
  if missing:
    raise ValueError(f"Unknown metric(s) {', '.join(missing)}; the run logged "
                     f"{', '.join(sorted(present - {'round'}))}.")
  return list(keys)


def _panels(count: int):
  columns = min(count, 3)
  rows = math.ceil(count / columns)
  fig = PlotFigure(figsize=(4.2 * columns, 3.3 * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
  for ax in axes[count:]:
    ax.set_visible(False)
  return fig, axes[:count]


def _label(ax, key: str) -> None:
  ax.set_title(key.replace("_", " "))
  ax.set_xlabel("round")
  ax.grid(alpha=0.3)
