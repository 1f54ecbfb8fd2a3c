"""Continual federated learning: a task loop over a ``TaskStream`` and its metrics.

Tasks arrive one after another; each is trained for ``rounds_per_task`` federated
rounds with the ordinary round engine (``make_round`` / ``make_multi_round``), then an
optional task-end hook updates the server state (FOT's FedProject, EWC's Fisher, GPM's
basis). After task i the global model is evaluated on every task j, which fills the
accuracy matrix ``acc[i, j]``. From it (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):

    ACC        = (1/T) sum_j acc[T-1, j]                       average final accuracy
    BWT        = 1/(T-1) sum_{j<T-1} (acc[T-1, j] - acc[j, j])    backward transfer (< 0: forgetting)
    forgetting = -BWT        (the "bwt" printed by the FOT code: positive, lower is better)
    max_forgetting = 1/(T-1) sum_{j<T-1} (max_{l<T-1} acc[l, j] - acc[T-1, j])

Scenarios: ``permuted`` and ``class`` evaluate over all classes; ``task``
(task-incremental) masks the logits to the task's classes during training and test,
which turns one shared output layer into one head per task.

All tasks share one compiled round: their arrays are padded to a common length and
the round is built for the largest client, so a method whose server state keeps static
shapes (FOT's pre-allocated bases) runs the whole stream on a single compilation.
"""
import dataclasses
import json
import math
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from fedjax_lab import algorithm as algorithm_lib
from fedjax_lab import checkpoint as checkpoint_lib
from fedjax_lab import metrics as metrics_lib
from fedjax_lab import parallel
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.data.continual import TaskStream
from fedjax_lab.data.federated import FederatedData, gather_cohort
from fedjax_lab.models import Model, from_linen
from fedjax_lab.transforms import Aggregator

MASKED_LOGIT = -1e9


# ------------------------------------------------------------------------- metrics

def continual_metrics(acc) -> dict:
  """ACC, BWT, forgetting and the running average accuracy of an accuracy matrix.

  Args:
    acc: ``[T, T]``, ``acc[i, j]`` = accuracy on task j after training task i (only
      ``j <= i`` is used).

  Returns:
    ``{'acc', 'bwt', 'forgetting', 'max_forgetting', 'average_accuracy' [T]}`` where
    ``average_accuracy[i] = mean_{j<=i} acc[i, j]``; with one task BWT and forgetting
    are 0.
  """
  acc = np.asarray(acc, np.float64)
  if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] == 0:
    raise ValueError(f"acc must be a square [T, T] matrix, got shape {acc.shape}")
  t = acc.shape[0]
  final = acc[-1]
  running = [float(acc[i, :i + 1].mean()) for i in range(t)]
  if t == 1:
    bwt = max_forgetting = 0.0
  else:
    bwt = float(np.mean(final[:-1] - np.diag(acc)[:-1]))
    best = np.array([acc[j:t - 1, j].max() for j in range(t - 1)])
    max_forgetting = float(np.mean(best - final[:-1]))
  return {"acc": float(final.mean()), "bwt": bwt, "forgetting": -bwt + 0.0,
          "max_forgetting": max_forgetting, "average_accuracy": running}


# ---------------------------------------------------------------- models and losses

class ContinualMLP(nn.Module):
  """Flatten, Dense+ReLU hidden layers, Dense output; biases optional.

  Without biases every parameter is a kernel, so gradient projection (GPM/FOT) covers
  the whole model; a bias is unprojected and can move old tasks' outputs.
  """
  hidden: Sequence[int] = (128, 128)
  num_classes: int = 10
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, use_bias=self.use_bias)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x)


def mlp(hidden: Sequence[int] = (128, 128), num_classes: int = 10, use_bias: bool = False) -> Model:
  return from_linen(ContinualMLP(tuple(hidden), num_classes, use_bias))


def mask_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Logits of classes outside ``class_mask`` (``[C]`` or ``[B, C]``) set to -1e9."""
  return jnp.where(class_mask, logits, MASKED_LOGIT)


def classification_loss(model: Model, class_masks: Optional[np.ndarray] = None):
  """Per-example cross-entropy ``(params, batch, rng) -> [B]``.

  With ``class_masks [T, C]`` (task-incremental) each example's logits are masked to
  the classes of its task ``batch['task']``: the other heads get no gradient.
  """
  table = None if class_masks is None else jnp.asarray(class_masks, bool)

  def example_loss(params, batch, rng):
    del rng
    logits = model.apply(params, batch["x"])
    if table is not None:
      logits = mask_logits(logits, table[batch["task"]])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  return example_loss


def make_evaluator(model: Model, batch_size: int = 1024):
  """Jitted ``evaluate(params, arrays, class_mask [C]) -> {'accuracy', 'loss'}``.

  The logits are masked with ``class_mask`` (all True: no masking).
  """
  @jax.jit
  def evaluate(params, arrays, class_mask):
    x, y = arrays["x"], arrays["y"]
    n = x.shape[0]
    chunks = max(math.ceil(n / batch_size), 1)
    pad = chunks * batch_size - n
    xs = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((chunks, batch_size) + x.shape[1:])
    ys = jnp.pad(y, (0, pad)).reshape(chunks, batch_size)
    ms = (jnp.arange(chunks * batch_size) < n).reshape(chunks, batch_size)

    def chunk(args):
      xb, yb, mb = args
      logits = mask_logits(model.apply(params, xb), class_mask)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return jnp.sum(jnp.where(mb, loss, 0.0)), jnp.sum((jnp.argmax(logits, -1) == yb) & mb)

    losses, corrects = jax.lax.map(chunk, (xs, ys, ms))
    return {"accuracy": jnp.sum(corrects) / n, "loss": jnp.sum(losses) / n}

  return evaluate


def evaluate_all(evaluate, params, stream: TaskStream) -> np.ndarray:
  """Accuracy on each task's test set: ``[T]``."""
  return np.array([float(evaluate(params, {"x": t.test["x"], "y": t.test["y"]},
                                  jnp.asarray(t.class_mask))["accuracy"]) for t in stream])


# ------------------------------------------------- task-boundary statistics over clients

def make_client_statistic(client_fn: Callable, aggregator: Aggregator,
                          backend: parallel.BackendLike = "vmap") -> Callable:
  """A federated statistic computed once at a task boundary (not a training round).

  Args:
    client_fn: ``(shared, (data, size, rng)) -> (message, weight, outputs)`` for one
      client, ``data`` its arrays padded to ``[max_examples, ...]``.
    aggregator: reduces the messages (e.g. a secure sum, a weighted mean).
    backend: a ``parallel.Backend`` or its name (``loop``/``vmap``/``sharded``).

  Returns:
    ``stat(shared, arrays, offsets, ids, rng, max_examples) -> aggregate``;
    ``backend.jit``-ed (``max_examples`` static): jitted except on the loop backend.
  """
  backend = parallel.get_backend(backend)
  mapper = backend.make_mapper(client_fn, aggregator)

  def run(shared, arrays, offsets, ids, rng, max_examples):
    cohort, sizes = gather_cohort(arrays, offsets, ids, max_examples)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(ids)
    result, _, _ = mapper(shared, (cohort, sizes, keys), aggregator.init(), client_ids=ids)
    return result

  return backend.jit(run, static_argnums=5)


def run_client_statistic(stat: Callable, shared, data: FederatedData, rng, clients: int = 0,
                         samples: int = 0, backend: parallel.BackendLike = "vmap"):
  """Runs ``stat`` over ``clients`` clients drawn from ``data`` (0: all), each using its
  first ``samples`` examples (0: all). ``backend`` is ``stat``'s (it pads the cohort).

  Each client's data is padded to a power of two (rows masked), so the tasks of a
  stream mostly share one compilation of ``stat``.
  """
  n = data.num_clients
  if clients < 0 or clients > n:
    raise ValueError(f"clients={clients} must be in [0, {n}] (0 means every client).")
  if clients:
    ids = np.sort(np.random.default_rng(np.asarray(rng)).choice(n, clients, replace=False))
  else:
    ids = np.arange(n)
  padded = parallel.get_backend(backend).padded_cohort_size(len(ids))
  ids = np.concatenate([ids, np.full(padded - len(ids), n)]).astype(np.int32)
  # Padded to a power of two so tasks with slightly different client sizes share one
  # compiled program; the padding rows are masked.
  max_examples = 1 << max(int(data.max_client_size) - 1, 0).bit_length()
  if samples:
    max_examples = min(samples, max_examples)
  arrays, offsets = data.device_arrays()
  return stat(shared, arrays, offsets, jnp.asarray(ids), rng, int(max_examples))


# ------------------------------------------------------------------------ task loop

TaskEndHook = Callable[[ServerState, object, int, jax.Array], tuple[ServerState, dict]]


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """How to run a stream.

  Attributes:
    rounds_per_task: federated rounds on each task.
    clients_per_round: cohort size.
    backend: a ``parallel.Backend`` or its name (``loop``/``vmap``/``sharded``).
    seed: run seed (cohorts, client shuffles, task-end randomness).
    eval_every: evaluate all tasks every this many rounds inside a task (0: only at
      task ends); gives accuracy-per-task curves.
    rounds_per_call: rounds per jitted ``lax.scan`` chunk.
    workdir: metrics.jsonl, a checkpoint after every task, and resume.
    progress: show a progress bar.
  """
  rounds_per_task: int
  clients_per_round: int
  backend: parallel.BackendLike = "vmap"
  seed: int = 0
  eval_every: int = 0
  rounds_per_call: int = 10
  workdir: Optional[str] = None
  progress: bool = True


class StreamResult(NamedTuple):
  """What a stream run returns.

  Attributes:
    state: final server state.
    acc: ``[T, T]`` accuracy matrix.
    metrics: ``continual_metrics(acc)``.
    history: per-round records (train metrics, ``task``, and at evaluations
      ``test_accuracy`` per task).
    task_info: per task, what the task-end hook reported (basis sizes, ...).
    traces: how many times the round was traced (compiled) during this run (0 when
      an earlier run of the same method compiled it); None on a backend that does
      not compile rounds (loop).
  """
  state: ServerState
  acc: np.ndarray
  metrics: dict
  history: list
  task_info: list
  traces: Optional[int]


def _pad_rows(arrays: dict, length: int) -> dict:
  out = {}
  for name, a in arrays.items():
    a = np.asarray(a)
    pad = np.zeros((length - a.shape[0],) + a.shape[1:], a.dtype)
    out[name] = jnp.asarray(np.concatenate([a, pad]))
  return out


def _check_stream(stream: TaskStream, opts: StreamOptions) -> None:
  if len(stream) == 0:
    raise ValueError("The task stream is empty.")
  counts = {t.train.num_clients for t in stream}
  if len(counts) != 1:
    raise ValueError(f"All tasks need the same number of clients, got {sorted(counts)}.")
  names = {tuple(sorted(t.train.arrays)) for t in stream}
  if len(names) != 1:
    raise ValueError(f"All tasks need the same array names, got {sorted(names)}.")
  if opts.rounds_per_task < 1:
    raise ValueError(f"rounds_per_task must be >= 1, got {opts.rounds_per_task}.")


def _chunks(rounds: int, opts: StreamOptions) -> list[int]:
  """Chunk lengths inside one task: stops at every evaluation and every rounds_per_call."""
  stops = {rounds}
  step = max(opts.rounds_per_call, 1)
  stops.update(range(step, rounds, step))
  if opts.eval_every:
    stops.update(range(opts.eval_every, rounds, opts.eval_every))
  bounds = [0] + sorted(stops)
  return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


_ROUNDS_CACHE: dict = {}
_ROUNDS_CACHE_SIZE = 8


def _compiled_rounds(algorithm: FederatedAlgorithm, template: FederatedData,
                     clients_per_round: int, backend: parallel.Backend):
  """``(run_rounds, trace_counter)`` for a method and population shape.

  The jitted rounds are kept (a few entries), so running the same method again, e.g.
  a baseline next to FOT in a notebook or a resumed stream, does not recompile. The
  counter counts how often the round is traced, i.e. compiled.
  """
  try:
    key = (algorithm, template.num_clients, template.max_client_size, clients_per_round, backend)
    hash(key)
  except TypeError:          # a method holding an unhashable field: no caching
    key = None
  if key is not None and key in _ROUNDS_CACHE:
    return _ROUNDS_CACHE[key]
  round_fn = algorithm_lib.make_round(algorithm, template, clients_per_round, backend)
  traces = [0]

  def counted_round(state, arrays, offsets):
    traces[0] += 1          # runs only while tracing under jit
    return round_fn(state, arrays, offsets)

  entry = (backend.scan_rounds(counted_round), traces)
  if key is not None:
    if len(_ROUNDS_CACHE) >= _ROUNDS_CACHE_SIZE:
      _ROUNDS_CACHE.pop(next(iter(_ROUNDS_CACHE)))
    _ROUNDS_CACHE[key] = entry
  return entry


def run_stream(algorithm: FederatedAlgorithm, stream: TaskStream, init_params, evaluate,
               opts: StreamOptions, on_task_end: Optional[TaskEndHook] = None) -> StreamResult:
  """Trains ``algorithm`` on the tasks of ``stream`` in order.

  Args:
    algorithm: any federated method (FedAvg fine-tuning, FedProx, FOT, ...).
    stream: the tasks.
    init_params: initial global params.
    evaluate: ``(params, arrays, class_mask) -> {'accuracy', ...}`` (``make_evaluator``).
    opts: run options.
    on_task_end: ``(state, task, task_index, rng) -> (state, info)``, called after
      task ``task_index`` is trained and evaluated (row ``acc[task_index]``); it
      prepares the next task (FOT's FedProject, EWC's Fisher, GPM's basis).

  Returns:
    A ``StreamResult``.
  """
  _check_stream(stream, opts)
  num_tasks, rounds = len(stream), opts.rounds_per_task
  template = max(stream, key=lambda t: t.train.max_client_size).train
  backend = parallel.get_backend(opts.backend)
  run_rounds, traces = _compiled_rounds(algorithm, template, opts.clients_per_round, backend)
  traces_before = traces[0]
  length = max(t.train.num_examples for t in stream)
  offsets = [jnp.asarray(t.train.client_offsets, jnp.int32) for t in stream]
  state = algorithm.init(init_params, jax.random.PRNGKey(opts.seed), stream.num_clients)
  hook_key = jax.random.fold_in(jax.random.PRNGKey(opts.seed), 0x5EED)

  acc_rows, task_info, history = [], [], []
  checkpointer, writer, side_path = None, None, None
  if opts.workdir:
    os.makedirs(opts.workdir, exist_ok=True)
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(opts.workdir, "checkpoints"))
    side_path = os.path.join(opts.workdir, "continual.json")
    resumed = checkpointer.latest_round()
    if resumed is not None:
      done = _resume_rows(side_path, resumed, rounds)
      state = checkpointer.restore(state)
      acc_rows, task_info = done["acc_rows"], done["task_info"]
    writer = metrics_lib.JsonlWriter(os.path.join(opts.workdir, "metrics.jsonl"), resumed)

  first_task = len(acc_rows)
  bar = tqdm.tqdm(total=num_tasks * rounds, initial=first_task * rounds, disable=not opts.progress,
                  desc=algorithm.name, unit="round", dynamic_ncols=True)
  try:
    for t in range(first_task, num_tasks):
      task = stream[t]
      arrays = _pad_rows(task.train.arrays, length)
      bar.set_description(f"{algorithm.name} task {t + 1}/{num_tasks}")
      done_rounds = 0
      for chunk_len in _chunks(rounds, opts):
        new_state, chunk = run_rounds(state, arrays, offsets[t], chunk_len)
        chunk = {k: np.asarray(v) for k, v in chunk.items()}
        bad = np.flatnonzero(~np.isfinite(chunk["train_loss"]))
        if bad.size:
          raise FloatingPointError(
              f"Training loss became non-finite in task {t} at round "
              f"{int(state.round) + int(bad[0]) + 1}; lower the learning rates.")
        state = new_state
        done_rounds += chunk_len
        start = int(state.round) - chunk_len
        records = [{"round": start + i + 1, "task": t,
                    **{k: v[i].item() for k, v in chunk.items()}} for i in range(chunk_len)]
        if opts.eval_every and done_rounds % opts.eval_every == 0 and done_rounds < rounds:
          records[-1]["test_accuracy"] = evaluate_all(evaluate, state.params, stream).tolist()
        history.extend(records)
        if writer:
          for record in records:
            writer.write(record)
        bar.update(chunk_len)
        bar.set_postfix(loss=f"{records[-1]['train_loss']:.4f}")
      row = evaluate_all(evaluate, state.params, stream)
      acc_rows.append(row.tolist())
      history[-1]["test_accuracy"] = row.tolist()
      info = {}
      if on_task_end is not None:
        state, info = on_task_end(state, task, t, jax.random.fold_in(hook_key, t))
      task_info.append(info)
      record = {"round": int(state.round), "task_end": t, "acc_row": row.tolist(), **info}
      if writer:
        writer.write(record)
      bar.set_postfix(acc=f"{row[:t + 1].mean():.3f}")
      if checkpointer:
        # Rows first: a resume truncates them to the checkpoint's task count.
        with open(side_path, "w") as f:
          json.dump({"acc_rows": acc_rows, "task_info": task_info}, f)
        checkpointer.save(int(state.round), state)
  finally:
    bar.close()
    if checkpointer:
      checkpointer.close()
  acc = np.asarray(acc_rows, np.float64)
  return StreamResult(state, acc, continual_metrics(acc), history, task_info,
                      traces[0] - traces_before if backend.compiled else None)


def _resume_rows(side_path: str, resumed_round: int, rounds_per_task: int) -> dict:
  if resumed_round % rounds_per_task:
    raise checkpoint_lib.CheckpointError(
        f"The checkpoint at round {resumed_round} is not at a task end (rounds_per_task="
        f"{rounds_per_task}); use a new --workdir.")
  try:
    with open(side_path) as f:
      done = json.load(f)
  except (OSError, ValueError) as e:
    raise checkpoint_lib.CheckpointError(f"Cannot read {side_path} to resume: {e}") from e
  tasks = resumed_round // rounds_per_task
  if len(done.get("acc_rows", ())) < tasks:
    raise checkpoint_lib.CheckpointError(
        f"{side_path} holds {len(done.get('acc_rows', ()))} accuracy rows, the checkpoint "
        f"is after {tasks} tasks.")
  return {"acc_rows": done["acc_rows"][:tasks], "task_info": done["task_info"][:tasks]}
