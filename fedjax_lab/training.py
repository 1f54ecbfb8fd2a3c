"""The rounds loop: eval cadence, JSONL metrics, checkpoints, resume, progress bar.

Rounds run in jitted chunks of up to ``rounds_per_call`` (a ``lax.scan``); the host
only looks at the state between chunks, to log, evaluate, checkpoint and stop on a
non-finite loss. This is the one rounds loop: launch scripts, continual task streams
(``continual.run_stream``) and zeroth-order runs are built on it, the rest through
periodic ``Action``s (task boundaries, evaluations of their own, data switches).

With ``TrainOptions.client_states='host'`` the per-client table stays in host memory
(or memmap files) and each chunk moves only its cohorts' rows (``host_states``); the
rows come back with the chunk's metrics and are written only if every loss is finite,
so a non-finite round leaves state and table at the last good round. Checkpoints hold
the table too (``checkpoint.py``).
"""
import dataclasses
import os
import sys
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fedjax_lab import algorithm as algorithm_lib
from fedjax_lab import checkpoint as checkpoint_lib
from fedjax_lab import distributed
from fedjax_lab import host_states
from fedjax_lab import loops
from fedjax_lab import metrics as metrics_lib
from fedjax_lab import parallel
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.data.federated import FederatedData


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/inf; the last good state was kept.

  ``round``: the first round whose loss was not finite (None if not known).
  """

  def __init__(self, message: str, round_: Optional[int] = None):
    super().__init__(message)
    self.round = round_


# Measured on the 2-core CPU (docs/benchmarks.md): at 1,000 clients of 10 examples,
# chunks of 64 take 0.66x (loaded machine) to 0.96x (idle) the time of one vmap over
# the cohort, and bound its memory; at 100 clients, 1.3-1.5x.
AUTO_CHUNK_ABOVE = 256
AUTO_CHUNK_SIZE = 64


def resolve_chunk_size(chunk_size, clients_per_device: int, convolves: Callable[[], bool]):
  """``chunk_size``, with ``"auto"`` resolved: on the CPU, chunks of ``AUTO_CHUNK_SIZE``
  for more than ``AUTO_CHUNK_ABOVE`` clients per device unless the round convolves
  (``convolves()``: a chunk loop would hold XLA:CPU's slow in-loop convolutions);
  elsewhere, and for smaller cohorts, the whole cohort (None)."""
  if chunk_size != "auto":
    return chunk_size
  if (jax.default_backend() != "cpu" or clients_per_device <= AUTO_CHUNK_ABOVE
      or convolves()):
    return None
  return AUTO_CHUNK_SIZE


class CohortOverflowError(ValueError):
  """A Poisson cohort was larger than its padded maximum; the state before it was kept."""


CLIENT_STATES = ("device", "host")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """Run options; ``writers`` get every per-round record after ``metrics.jsonl``.

  A writer is any object with ``write(record: dict)`` (e.g.
  ``plotting.TensorBoardWriter``); its caller creates and closes it.
  """
  rounds: int
  clients_per_round: int
  backend: parallel.BackendLike = "vmap"   # a name or a parallel.Backend object
  # Clients vectorised at once: None, the whole cohort; "auto", resolve_chunk_size's rule.
  chunk_size: Union[int, str, None] = "auto"
  # Update the state (the client-state table above all) in place instead of copying it
  # every call. The state before a non-finite round is then gone: the last checkpoint
  # is the last good state on disk.
  donate_state: bool = False
  # Where the per-client state table [N, ...] lives: "device" (in ServerState.client_states,
  # on the accelerator) or "host" (numpy, host_states.py: each call moves only its cohorts'
  # rows, so device memory does not grow with N; same numbers). With "host", donate_state
  # has nothing to do: the table is written in place after each call's finite check.
  client_states: str = "device"
  # With "host": a directory for the table as np.memmap files (tables larger than RAM;
  # working storage, rewritten at every start). None: an in-memory table.
  client_state_dir: Optional[str] = None
  seed: int = 0
  eval_every: int = 10
  checkpoint_every: int = 0         # 0: only at the end (when a workdir is given)
  rounds_per_call: int = 1
  workdir: Optional[str] = None
  progress: bool = True
  writers: Sequence = ()
  # (key, round) -> cohort ids [C] (sampling.weighted_sampler, sampling.schedule_sampler);
  # None: uniform without replacement. Device client states only.
  sampler: Optional[Callable] = None

  def __post_init__(self):
    if self.client_states not in CLIENT_STATES:
      raise ValueError(f"Unknown client_states {self.client_states!r}; choose one of "
                       f"{', '.join(CLIENT_STATES)}.")
    if self.client_state_dir is not None and self.client_states != "host":
      raise ValueError("client_state_dir keeps a host table in files; it needs "
                       f"client_states='host' (got {self.client_states!r}).")


class Action:
  """A periodic action of the rounds loop (subclass it, or give any object these methods).

  The loop runs the rounds in jitted chunks and stops between them at every multiple
  of ``eval_every`` and ``checkpoint_every``, every ``rounds_per_call`` rounds and at
  every round an action asks for with ``next_stop``. At each stop, after the
  non-finite check and the built-in evaluation, it calls every action in order, then
  writes the chunk's records and checkpoints. Actions may change ``loop.state`` and
  the data the next chunk trains on (``loop.arrays``, ``loop.offsets``), add keys to
  the chunk's last record (``loop.records[-1]``) and write records of their own
  (``loop.write``). Continual task streams are an action (``continual.run_stream``).
  """

  def next_stop(self, current: int) -> Optional[int]:
    """The first round after ``current`` at which the loop must stop (None: none)."""
    del current
    return None

  def start(self, loop: "Loop") -> None:
    """Called once, after the state is initialised or restored from a checkpoint."""

  def __call__(self, loop: "Loop") -> None:
    """Called at every stop; ``loop.round`` is the number of rounds done."""


@dataclasses.dataclass
class Loop:
  """What the rounds loop holds between chunks; actions read and change it.

  Attributes:
    state: the server state (its ``client_states`` is ``()`` with a host table).
    arrays, offsets: the data the next chunk trains on.
    round: rounds done.
    resumed_from: the checkpoint round the run resumed from (None: a fresh start).
    records: the last chunk's per-round records (written after the actions ran).
    history: all records so far (of this call).
    traces: how often the rounds were compiled during this call.
    bar: the tqdm progress bar.
    table: the host client-state table, or None.
  """
  state: ServerState
  arrays: dict
  offsets: jax.Array
  round: int
  resumed_from: Optional[int]
  records: list
  history: list
  traces: int
  bar: Any
  table: Any
  writers: list
  pending: list = dataclasses.field(default_factory=list)

  def write(self, record: dict) -> None:
    """Writes ``record`` to ``metrics.jsonl`` and the writers after the chunk's records
    (not to ``history``)."""
    self.pending.append(record)

  def flush(self, records) -> None:
    for record in list(records) + self.pending:
      for writer in self.writers:
        writer.write(record)
    self.pending = []


def _next_stop(current: int, opts: TrainOptions, actions: Sequence[Action]) -> int:
  stops = [opts.rounds, current + max(opts.rounds_per_call, 1)]
  for every in (opts.eval_every, opts.checkpoint_every):
    if every and every > 0:
      stops.append((current // every + 1) * every)
  for action in actions:
    stop = action.next_stop(current)
    if stop is not None:
      if stop <= current:
        raise ValueError(f"{type(action).__name__}.next_stop({current}) returned {stop}; "
                         f"it must be a later round.")
      stops.append(stop)
  return min(stops)


def full_state(state: ServerState, table) -> ServerState:
  """The state with a host table (numpy leaves) in ``client_states``; ``table=None``: as is."""
  return state if table is None else state._replace(client_states=table)


_ROUNDS_CACHE: dict = {}
_ROUNDS_CACHE_SIZE = 8


def _compiled_rounds(algorithm: FederatedAlgorithm, data: FederatedData, opts: TrainOptions,
                     round_wrapper: Optional[Callable]):
  """``(run_rounds, trace_counter)`` for a method, population shape and options.

  The jitted rounds are kept (a few entries), so training the same method again (a
  baseline next to it in a notebook, a resumed run, the next task of a stream) does
  not recompile. The counter counts how often the round is traced, i.e. compiled.
  """
  try:
    key = (algorithm, data.num_clients, int(data.max_client_size), opts.clients_per_round,
           opts.backend, opts.chunk_size, opts.donate_state, round_wrapper, opts.sampler,
           max(opts.rounds_per_call, 1))
    hash(key)
  except TypeError:          # a method holding an unhashable field: no caching
    key = None
  if key is not None and key in _ROUNDS_CACHE:
    return _ROUNDS_CACHE[key]
  round_fn = algorithm_lib.make_round(algorithm, data, opts.clients_per_round, opts.backend,
                                      chunk_size=opts.chunk_size, sampler=opts.sampler)
  if round_wrapper is not None:
    round_fn = round_wrapper(round_fn)
  traces = [0]

  def count_trace():
    traces[0] += 1          # runs only while tracing under jit

  # Chunks are at most rounds_per_call rounds: one compiled scan serves every length.
  entry = (parallel.get_backend(opts.backend).scan_rounds(
      round_fn, opts.donate_state, max_rounds=max(opts.rounds_per_call, 1),
      on_trace=count_trace), traces)
  if key is not None:
    if len(_ROUNDS_CACHE) >= _ROUNDS_CACHE_SIZE:
      _ROUNDS_CACHE.pop(next(iter(_ROUNDS_CACHE)))
    _ROUNDS_CACHE[key] = entry
  return entry


def train(algorithm: FederatedAlgorithm, init_params, data: FederatedData,
          evaluate: Optional[Callable] = None, test_arrays=None,
          opts: TrainOptions = None, round_wrapper: Optional[Callable] = None,
          actions: Sequence[Action] = ()) -> tuple[ServerState, list[dict]]:
  """Runs ``opts.rounds`` rounds (resuming from ``opts.workdir`` if it has a checkpoint).

  Args:
    algorithm: the method.
    init_params: initial global params.
    data: the training population (with ``actions`` that switch data: its shape,
      ``num_clients`` and ``max_client_size``, is that of every dataset trained on).
    evaluate: ``(params, test_arrays) -> {'accuracy', 'loss'}``, called every
      ``eval_every`` rounds and at the end.
    test_arrays: evaluation data for ``evaluate``.
    opts: run options.
    round_wrapper: ``round_fn -> round_fn``, applied to the round before the rounds
      are scanned (e.g. ``launch.zeroth_order`` adds the objective to the metrics and
      FZooS's safeguard); the wrapped round keeps ``round_fn``'s signature
      ``(state, arrays, offsets) -> (state, metrics)``. Device client states only.
    actions: periodic actions (``Action``) run between chunks.

  Returns:
    (final state, list of per-round metric records). With ``client_states='host'``
    the state's ``client_states`` is the host table (numpy or ``np.memmap`` leaves).

  Raises:
    NonFiniteLossError: naming the first bad round; the last good state is saved.
    checkpoint.CheckpointError: the workdir holds a checkpoint that cannot be read.
  """
  loop = run_loop(algorithm, init_params, data, evaluate, test_arrays, opts, round_wrapper,
                  actions)
  return full_state(loop.state, loop.table), loop.history


def run_loop(algorithm: FederatedAlgorithm, init_params, data: FederatedData,
             evaluate: Optional[Callable] = None, test_arrays=None,
             opts: TrainOptions = None, round_wrapper: Optional[Callable] = None,
             actions: Sequence[Action] = (), init_state: Optional[ServerState] = None) -> Loop:
  """``train`` returning the whole ``Loop`` (state, history, compile count, ...).

  ``data`` may also be any object with ``num_clients`` and ``max_client_size`` when
  an action's ``start`` sets ``loop.arrays`` and ``loop.offsets`` (streamed cohorts).
  ``init_state`` starts from that state instead of ``algorithm.init(init_params)``
  (device client states only).
  """
  if opts.rounds < 0:
    raise ValueError(f"rounds must be >= 0, got {opts.rounds}.")
  host = opts.client_states == "host"
  if host and jax.process_count() > 1:
    raise ValueError("client_states='host' runs in one process; with several processes "
                     "use client_states='device'.")
  if host and (round_wrapper is not None or opts.sampler is not None):
    raise ValueError("round_wrapper and sampler need client_states='device' (a host "
                     "table's rounds draw uniform cohorts on the host).")
  backend = parallel.get_backend(opts.backend)
  arrays, offsets = data.device_arrays() if hasattr(data, "device_arrays") else (None, None)
  rng = jax.random.PRNGKey(opts.seed)
  traces = [0]
  if opts.chunk_size == "auto":
    mesh = getattr(backend, "mesh", None)
    per_device = backend.padded_cohort_size(opts.clients_per_round) // (
        mesh.size if mesh is not None else 1)

    def convolves():   # one trace of the unchunked round, on shapes only
      round_fn = algorithm_lib.make_round(algorithm, data, opts.clients_per_round, backend,
                                          sampler=None if host else opts.sampler)
      probe = jax.eval_shape(lambda: algorithm.init(init_params, rng, data.num_clients))
      return arrays is not None and loops.convolves(
          jax.make_jaxpr(round_fn)(probe, arrays, offsets))
    opts = dataclasses.replace(opts, chunk_size=resolve_chunk_size(
        opts.chunk_size, per_device, convolves))
  if host:
    # run_rounds(state, table, ...) -> (state, metrics, rows): the table is untouched
    # until the rows are written, after the finite check.
    run_rounds = host_states.make_host_state_multi_round(
        algorithm, data, opts.clients_per_round, backend,
        chunk_size=opts.chunk_size).deferred
    state, table = host_states.init_host_state(algorithm, init_params, rng, data.num_clients,
                                               opts.client_state_dir)
  else:
    run_rounds, traces = _compiled_rounds(algorithm, data, opts, round_wrapper)
    state = algorithm.init(init_params, rng, data.num_clients) if init_state is None else init_state
    table = None
  traces_before = traces[0]

  checkpointer, writer, resumed_from = None, None, None
  if opts.workdir:
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(opts.workdir, "checkpoints"))
    if checkpointer.latest_round() is not None:
      # The newest checkpoint that reads back and matches its digest (older ones if not).
      if host:   # the full state, table included, is one checkpoint
        restored, resumed_from = checkpointer.restore_latest_valid(full_state(state, table))
        state, table = restored._replace(client_states=()), restored.client_states
      else:
        state, resumed_from = checkpointer.restore_latest_valid(state)
      if distributed.is_lead_process():
        print(f"resumed from round {resumed_from} (checkpoint {checkpointer.directory}/"
              f"{resumed_from})", file=sys.stderr)
  lead = distributed.is_lead_process()
  # With several processes (sharded): global arrays replicated over every process's
  # devices (a restore lands on one local device, which a multi-process jit refuses),
  # checked equal on all of them. Identity otherwise.
  state, arrays, offsets = backend.replicate_for_processes((state, arrays, offsets),
                                                           "initial state and data")
  if not host:
    state = backend.place_state(state)
  if opts.workdir and lead:   # checkpoints are collective; metrics are written once
    writer = metrics_lib.JsonlWriter(os.path.join(opts.workdir, "metrics.jsonl"), resumed_from)

  donate = opts.donate_state and not host
  if donate and backend.compiled:
    state = jax.tree.map(jnp.copy, state)   # donation must not consume the caller's params
  current = int(state.round)
  bar = tqdm.tqdm(total=opts.rounds, initial=min(current, opts.rounds), disable=not (opts.progress and lead),
                  desc=algorithm.name, unit="round", dynamic_ncols=True)
  writers = ([writer] if writer else []) + list(opts.writers if lead else ())
  loop = Loop(state=state, arrays=arrays, offsets=offsets, round=current,
              resumed_from=resumed_from, records=[], history=[], traces=0, bar=bar,
              table=table, writers=writers)
  try:
    for action in actions:
      action.start(loop)
    while loop.round < opts.rounds:
      current = loop.round
      stop = _next_stop(current, opts, actions)
      if host:
        new_state, chunk, rows = run_rounds(loop.state, loop.table, loop.arrays, loop.offsets,
                                            stop - current)
      else:
        new_state, chunk = run_rounds(loop.state, loop.arrays, loop.offsets, stop - current)
      chunk = {k: np.asarray(v) for k, v in chunk.items()}
      bad = np.flatnonzero(~np.isfinite(chunk["train_loss"]))
      if bad.size:
        first_bad = current + int(bad[0]) + 1
        where = ""
        if donate:   # the input state was donated to new_state
          saved = checkpointer.latest_round() if checkpointer else None
          where = (" With donate_state the state before it is not kept; " +
                   (f"the last checkpoint is round {saved} in {checkpointer.directory}."
                    if saved is not None else "there is no checkpoint."))
        elif checkpointer:   # a host table has not been written yet: it is round current's
          checkpointer.save(current, full_state(loop.state, loop.table))
          where = f" It is saved in {checkpointer.directory} (round {current})."
        raise NonFiniteLossError(
            f"Training loss became non-finite at round {first_bad}; the last good state is "
            f"round {current}.{where} Lower the learning rates or check the data.", first_bad)
      overflow = np.flatnonzero(chunk.get("cohort_overflow", np.zeros(1)) > 0)
      if overflow.size:
        i = int(overflow[0])
        size = int(chunk["cohort_size"][i])
        raise CohortOverflowError(
            f"Round {current + i + 1} sampled a cohort of {size} clients, more than its "
            f"{size - int(chunk['cohort_overflow'][i])} slots; nothing was truncated and the "
            f"state stays at round {current}. Raise the maximum cohort (a smaller overflow "
            f"probability).")
      loop.state = new_state
      if host:
        rows.write(loop.table)
      loop.records = [{"round": current + i + 1, **{k: v[i].item() for k, v in chunk.items()}}
                      for i in range(stop - current)]
      loop.round = stop
      if evaluate is not None and (stop == opts.rounds or
                                   (opts.eval_every and stop % opts.eval_every == 0)):
        result = metrics_lib.to_python(evaluate(loop.state.params, test_arrays))
        loop.records[-1].update({f"test_{k}": v for k, v in result.items()})
        bar.set_postfix(loss=f"{loop.records[-1]['train_loss']:.4f}",
                        acc=f"{result['accuracy']:.4f}")
      for action in actions:
        action(loop)
      loop.flush(loop.records)
      loop.history.extend(loop.records)
      if checkpointer and (stop == opts.rounds or
                           (opts.checkpoint_every and stop % opts.checkpoint_every == 0)):
        checkpointer.save(stop, full_state(loop.state, loop.table))
      bar.update(len(loop.records))
  finally:
    bar.close()
    if checkpointer:
      checkpointer.close()
  loop.traces = traces[0] - traces_before
  return loop
