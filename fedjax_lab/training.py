"""The rounds loop: eval cadence, JSONL metrics, checkpoints, resume, progress bar.

Rounds run in jitted chunks of up to ``rounds_per_call`` (a ``lax.scan``); the host
only looks at the state between chunks, to log, evaluate, checkpoint and stop on a
non-finite loss.

With ``TrainOptions.client_states='host'`` the per-client table stays in host memory
(or memmap files) and each chunk moves only its cohorts' rows (``host_states``); the
rows come back with the chunk's metrics and are written only if every loss is finite,
so a non-finite round leaves state and table at the last good round. Checkpoints hold
the table too (``checkpoint.py``).
"""
import dataclasses
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fedjax_lab import algorithm as algorithm_lib
from fedjax_lab import checkpoint as checkpoint_lib
from fedjax_lab import distributed
from fedjax_lab import host_states
from fedjax_lab import metrics as metrics_lib
from fedjax_lab import parallel
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.data.federated import FederatedData


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/inf; the last good state was kept."""


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
  chunk_size: Optional[int] = None  # clients vectorised at once (None: the whole cohort)
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

  def __post_init__(self):
    if self.client_states not in CLIENT_STATES:
      raise ValueError(f"Unknown client_states {self.client_states!r}; choose one of "
                       f"{', '.join(CLIENT_STATES)}.")
    if self.client_state_dir is not None and self.client_states != "host":
      raise ValueError("client_state_dir keeps a host table in files; it needs "
                       f"client_states='host' (got {self.client_states!r}).")


def _next_stop(current: int, opts: TrainOptions) -> int:
  stops = [opts.rounds, current + max(opts.rounds_per_call, 1)]
  for every in (opts.eval_every, opts.checkpoint_every):
    if every and every > 0:
      stops.append((current // every + 1) * every)
  return min(stops)


def full_state(state: ServerState, table) -> ServerState:
  """The state with a host table (numpy leaves) in ``client_states``; ``table=None``: as is."""
  return state if table is None else state._replace(client_states=table)


def train(algorithm: FederatedAlgorithm, init_params, data: FederatedData,
          evaluate: Optional[Callable] = None, test_arrays=None,
          opts: TrainOptions = None) -> tuple[ServerState, list[dict]]:
  """Runs ``opts.rounds`` rounds (resuming from ``opts.workdir`` if it has a checkpoint).

  Args:
    algorithm: the method.
    init_params: initial global params.
    data: the training population.
    evaluate: ``(params, test_arrays) -> {'accuracy', 'loss'}``, called every
      ``eval_every`` rounds and at the end.
    test_arrays: evaluation data for ``evaluate``.
    opts: run options.

  Returns:
    (final state, list of per-round metric records). With ``client_states='host'``
    the state's ``client_states`` is the host table (numpy or ``np.memmap`` leaves).

  Raises:
    NonFiniteLossError: naming the first bad round; the last good state is saved.
    checkpoint.CheckpointError: the workdir holds a checkpoint that cannot be read.
  """
  if opts.rounds < 0:
    raise ValueError(f"rounds must be >= 0, got {opts.rounds}.")
  host = opts.client_states == "host"
  if host and jax.process_count() > 1:
    raise ValueError("client_states='host' runs in one process; with several processes "
                     "use client_states='device'.")
  backend = parallel.get_backend(opts.backend)
  arrays, offsets = data.device_arrays()
  rng = jax.random.PRNGKey(opts.seed)
  if host:
    # run_rounds(state, table, ...) -> (state, metrics, rows): the table is untouched
    # until the rows are written, after the finite check.
    run_rounds = host_states.make_host_state_multi_round(
        algorithm, data, opts.clients_per_round, backend,
        chunk_size=opts.chunk_size).deferred
    state, table = host_states.init_host_state(algorithm, init_params, rng, data.num_clients,
                                               opts.client_state_dir)
  else:
    round_fn = algorithm_lib.make_round(algorithm, data, opts.clients_per_round, backend,
                                        chunk_size=opts.chunk_size)
    run_rounds = backend.scan_rounds(round_fn, opts.donate_state)
    state, table = algorithm.init(init_params, rng, data.num_clients), None

  checkpointer, writer, resumed_from = None, None, None
  if opts.workdir:
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(opts.workdir, "checkpoints"))
    resumed_from = checkpointer.latest_round()
    if resumed_from is not None:
      if host:   # the full state, table included, is one checkpoint
        restored = checkpointer.restore(full_state(state, table))
        state, table = restored._replace(client_states=()), restored.client_states
      else:
        state = checkpointer.restore(state)
  lead = distributed.is_lead_process()
  # With several processes (sharded): global arrays replicated over every process's
  # devices (a restore lands on one local device, which a multi-process jit refuses),
  # checked equal on all of them. Identity otherwise.
  state, arrays, offsets = backend.replicate_for_processes((state, arrays, offsets),
                                                           "initial state and data")
  if opts.workdir and lead:   # checkpoints are collective; metrics are written once
    writer = metrics_lib.JsonlWriter(os.path.join(opts.workdir, "metrics.jsonl"), resumed_from)

  donate = opts.donate_state and not host
  if donate and backend.compiled:
    state = jax.tree.map(jnp.copy, state)   # donation must not consume the caller's params
  history: list[dict] = []
  current = int(state.round)
  bar = tqdm.tqdm(total=opts.rounds, initial=min(current, opts.rounds), disable=not (opts.progress and lead),
                  desc=algorithm.name, unit="round", dynamic_ncols=True)
  try:
    while current < opts.rounds:
      stop = _next_stop(current, opts)
      if host:
        new_state, chunk, rows = run_rounds(state, table, arrays, offsets, stop - current)
      else:
        new_state, chunk = run_rounds(state, arrays, offsets, stop - current)
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
          checkpointer.save(current, full_state(state, table))
          where = f" It is saved in {checkpointer.directory} (round {current})."
        raise NonFiniteLossError(
            f"Training loss became non-finite at round {first_bad}; the last good state is "
            f"round {current}.{where} Lower the learning rates or check the data.")
      state = new_state
      if host:
        rows.write(table)
      records = [{"round": current + i + 1, **{k: v[i].item() for k, v in chunk.items()}}
                 for i in range(stop - current)]
      current = stop
      if evaluate is not None and (current == opts.rounds or
                                   (opts.eval_every and current % opts.eval_every == 0)):
        result = metrics_lib.to_python(evaluate(state.params, test_arrays))
        records[-1].update({f"test_{k}": v for k, v in result.items()})
        bar.set_postfix(loss=f"{records[-1]['train_loss']:.4f}",
                        acc=f"{result['accuracy']:.4f}")
      if writer:
        for record in records:
          writer.write(record)
      for extra_writer in (opts.writers if lead else ()):
        for record in records:
          extra_writer.write(record)
      history.extend(records)
      if checkpointer and (current == opts.rounds or
                           (opts.checkpoint_every and current % opts.checkpoint_every == 0)):
        checkpointer.save(current, full_state(state, table))
      bar.update(len(records))
  finally:
    bar.close()
    if checkpointer:
      checkpointer.close()
  return full_state(state, table), history
