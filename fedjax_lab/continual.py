"""Continual federated learning: task streams on the rounds loop, and their metrics.

Tasks arrive one after another; each is trained for ``rounds_per_task`` federated
rounds by ``training.train``'s loop (the stream is one of its periodic actions), then an
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
import os
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import checkpoint as checkpoint_lib
from fedjax_lab import metrics as metrics_lib
from fedjax_lab import parallel
from fedjax_lab import training
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.data.continual import TaskStream
from fedjax_lab.data.federated import FederatedData, gather_cohort
from fedjax_lab.models import Model
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


# --------------------------------------------------------- losses and evaluation

def mask_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Logits of classes outside ``class_mask`` (``[C]`` or ``[B, C]``) set to -1e9."""
  return jnp.where(class_mask, logits, MASKED_LOGIT)


def classification_loss(model: Model, class_masks: Optional[np.ndarray] = None):
  """Per-example cross-entropy ``(params, batch, rng) -> [B]``.

  Models with dropout train through ``model.train_apply`` with the step's rng.
  With ``class_masks [T, C]`` (task-incremental) each example's logits are masked to
  the classes of its task ``batch['task']``: the other heads get no gradient.
  """
  table = None if class_masks is None else jnp.asarray(class_masks, bool)

  def example_loss(params, batch, rng):
    if getattr(model, "train_apply", None) is None:
      logits = model.apply(params, batch["x"])
    else:                                   # dropout: a fresh mask every step
      logits = model.train_apply(params, batch["x"], rng)
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
    def chunk(batch, mask, index):
      del index
      logits = mask_logits(model.apply(params, batch["x"]), class_mask)
      return metrics_lib.classification_sums(logits, batch["y"], mask)

    sums = metrics_lib.chunked_sums(chunk, {"x": arrays["x"], "y": arrays["y"]}, batch_size)
    n = arrays["x"].shape[0]
    return {"accuracy": sums["accuracy"] / n, "loss": sums["loss"] / n}

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


class _TaskStream(training.Action):
  """The stream as an action of the rounds loop: task data, evaluations, task ends."""

  def __init__(self, stream: TaskStream, opts: StreamOptions, evaluate, on_task_end,
               side_path: Optional[str], name: str):
    self.stream, self.opts, self.evaluate = stream, opts, evaluate
    self.on_task_end, self.side_path, self.name = on_task_end, side_path, name
    self.length = max(t.train.num_examples for t in stream)
    self.offsets = [jnp.asarray(t.train.client_offsets, jnp.int32) for t in stream]
    self.hook_key = jax.random.fold_in(jax.random.PRNGKey(opts.seed), 0x5EED)
    self.acc_rows, self.task_info = [], []

  def next_stop(self, current):
    # Chunks restart at every task: stops at the task's multiples of rounds_per_call
    # and eval_every, and at its end.
    rounds = self.opts.rounds_per_task
    task_start = current // rounds * rounds
    stops = [task_start + rounds]
    for every in (max(self.opts.rounds_per_call, 1), self.opts.eval_every):
      if every:
        stops.append(task_start + ((current - task_start) // every + 1) * every)
    return min(stops)

  def _use_task(self, loop, t):
    loop.arrays = _pad_rows(self.stream[t].train.arrays, self.length)
    loop.offsets = self.offsets[t]
    loop.bar.set_description(f"{self.name} task {t + 1}/{len(self.stream)}")

  def start(self, loop):
    if loop.resumed_from is not None:
      done = _resume_rows(self.side_path, loop.resumed_from, self.opts.rounds_per_task)
      self.acc_rows, self.task_info = done["acc_rows"], done["task_info"]
    self._use_task(loop, min(loop.round // self.opts.rounds_per_task, len(self.stream) - 1))

  def __call__(self, loop):
    rounds = self.opts.rounds_per_task
    t = (loop.round - 1) // rounds
    for record in loop.records:
      record["task"] = t
    done_rounds = loop.round - t * rounds
    if done_rounds < rounds:
      if self.opts.eval_every and done_rounds % self.opts.eval_every == 0:
        loop.records[-1]["test_accuracy"] = evaluate_all(self.evaluate, loop.state.params,
                                                         self.stream).tolist()
      loop.bar.set_postfix(loss=f"{loop.records[-1]['train_loss']:.4f}")
      return
    row = evaluate_all(self.evaluate, loop.state.params, self.stream)
    self.acc_rows.append(row.tolist())
    loop.records[-1]["test_accuracy"] = row.tolist()
    info = {}
    if self.on_task_end is not None:
      loop.state, info = self.on_task_end(loop.state, self.stream[t], t,
                                          jax.random.fold_in(self.hook_key, t))
    self.task_info.append(info)
    loop.write({"round": loop.round, "task_end": t, "acc_row": row.tolist(), **info})
    loop.bar.set_postfix(acc=f"{row[:t + 1].mean():.3f}")
    if self.side_path:
      # Rows before the checkpoint: a resume truncates them to the checkpoint's tasks.
      with open(self.side_path, "w") as f:
        json.dump({"acc_rows": self.acc_rows, "task_info": self.task_info}, f)
    if t + 1 < len(self.stream):
      self._use_task(loop, t + 1)


def run_stream(algorithm: FederatedAlgorithm, stream: TaskStream, init_params, evaluate,
               opts: StreamOptions, on_task_end: Optional[TaskEndHook] = None) -> StreamResult:
  """Trains ``algorithm`` on the tasks of ``stream`` in order, on ``training.train``'s loop.

  Args:
    algorithm: any federated method (FedAvg fine-tuning, FedProx, FOT, ...).
    stream: the tasks.
    init_params: initial global params.
    evaluate: ``(params, arrays, class_mask) -> {'accuracy', ...}`` (``make_evaluator``).
    opts: run options.
    on_task_end: ``(state, task, task_index, rng) -> (state, info)``, called after
      task ``task_index`` is trained and evaluated (row ``acc[task_index]``); it
      prepares the next task (FOT's FedProject, EWC's Fisher, GPM's basis). None:
      the method's own ``algorithm.task_boundary`` (which may be None too).

  Returns:
    A ``StreamResult``. With ``opts.workdir``: metrics.jsonl (per round, plus one
    ``task_end`` line per task), a checkpoint after every task (and of the last good
    round when the loss becomes non-finite), ``continual.json`` with the accuracy rows;
    a rerun resumes.
  """
  _check_stream(stream, opts)
  if on_task_end is None:
    on_task_end = algorithm.task_boundary
  rounds = opts.rounds_per_task
  template = max(stream, key=lambda t: t.train.max_client_size).train
  side_path = None
  if opts.workdir:
    os.makedirs(opts.workdir, exist_ok=True)
    side_path = os.path.join(opts.workdir, "continual.json")
  action = _TaskStream(stream, opts, evaluate, on_task_end, side_path, algorithm.name)
  train_opts = training.TrainOptions(
      rounds=len(stream) * rounds, clients_per_round=opts.clients_per_round,
      backend=opts.backend, seed=opts.seed, eval_every=0, checkpoint_every=rounds,
      rounds_per_call=max(opts.rounds_per_call, 1), workdir=opts.workdir,
      progress=opts.progress)
  loop = training.run_loop(algorithm, init_params, template, opts=train_opts, actions=(action,))
  acc = np.asarray(action.acc_rows, np.float64)
  return StreamResult(loop.state, acc, continual_metrics(acc), loop.history, action.task_info,
                      loop.traces if parallel.get_backend(opts.backend).compiled else None)


def _resume_rows(side_path: str, resumed_round: int, rounds_per_task: int) -> dict:
  """The accuracy rows and task infos of the tasks finished by ``resumed_round``."""
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
