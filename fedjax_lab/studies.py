"""A whole study in one compiled program: many runs vmapped, and hypergradients through rounds.

A run is a pure function of its hyper-parameters and seed (``hyperparams.py``: every
continuous hyper-parameter may be a traced array), so a study of R runs is

    vmap(run)(hparams [R], seeds [R])      # lax.map over groups of runs when R is large;
                                           # shard_map over devices with a "runs" mesh

with the data shared by all runs. ``build(hparams, seed) -> (method, init_params)``
makes one run's method and model from traced scalars; the study initialises the state
from ``PRNGKey(seed)`` as ``training.run_loop`` does, runs the same round
(``algorithm.make_round``) and evaluates with the same evaluator, so each run's numbers
are those of the single run with the same values.

Per run, as for one run: a round whose training loss is not finite freezes that run
at its last good state (``diverged``, ``diverged_round``) while the others go on;
train loss every round, test metrics every ``eval_every`` rounds and at the end;
checkpoints of the whole study every ``checkpoint_every`` rounds, resumed from the
workdir.

``final_loss`` differentiates a run's final test loss with respect to its
hyper-parameters through every round (``jax.grad``), each round rematerialised
(``jax.checkpoint``) so memory grows with the state, not with rounds x local steps;
``truncate=K`` keeps only the last K rounds in the gradient.
"""
import math
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import algorithm as algorithm_lib
from fedjax_lab import checkpoint as checkpoint_lib
from fedjax_lab.algorithm import ServerState
from fedjax_lab.data.federated import FederatedData

# build(hparams: {name: scalar}, seed: int32 scalar) -> (FederatedAlgorithm, init_params)
Build = Callable[[Mapping[str, Any], jax.Array], tuple]

PROGRAM_NAME = "study_program"   # the compiled program's name in jax's compile events


class StudyResult(NamedTuple):
  """A study's outcome; every array has the runs axis first.

  Attributes:
    state: the runs' final (or last good) server states, leaves ``[runs, ...]``.
    train_loss: ``[runs, rounds]``, NaN from a run's first non-finite round on.
    diverged: bool ``[runs]``: the run's training loss became non-finite.
    diverged_round: int ``[runs]``: the first non-finite round (0: none).
    eval_rounds: the rounds at which ``test`` was evaluated (the last is ``rounds``).
    test: ``{name: [runs, len(eval_rounds)]}`` of the evaluator (e.g. accuracy, loss).
    compiles: how often the study's program was traced (= compiled) in this call.
  """
  state: ServerState
  train_loss: np.ndarray
  diverged: np.ndarray
  diverged_round: np.ndarray
  eval_rounds: tuple
  test: dict
  compiles: int


def _where(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _segments(start: int, stop: int, eval_every: int) -> tuple:
  """Static plan of rounds ``start..stop``: ``(blocks, block_len, rest)``; an evaluation
  ends every block and the plan (``start`` is a multiple of ``eval_every``)."""
  n = stop - start
  if eval_every <= 0:
    return 0, 0, n
  return n // eval_every, eval_every, n % eval_every


def eval_rounds_of(rounds: int, eval_every: int) -> tuple:
  """Rounds at which a study evaluates: multiples of ``eval_every`` and ``rounds``."""
  points = list(range(eval_every, rounds + 1, eval_every)) if eval_every > 0 else []
  if not points or points[-1] != rounds:
    points.append(rounds)
  return tuple(points)


def _run_segment(build: Build, data: FederatedData, clients_per_round: int, evaluate,
                 eval_every: int, sampler, chunk_size, start: int, stop: int):
  """``segment(hp, seed, carry, arrays, offsets, test) -> (carry, train_loss, tests)`` of
  one run, rounds ``start..stop``; ``carry=None`` starts the run (init)."""
  blocks, block_len, rest = _segments(start, stop, eval_every)

  def segment(hp, seed, carry, arrays, offsets, test_arrays, last: bool):
    method, init_params = build(hp, seed)
    if carry is None:
      state = method.init(init_params, jax.random.PRNGKey(seed), data.num_clients)
      carry = (state, jnp.zeros((), jnp.int32))
    round_fn = algorithm_lib.make_round(method, data, clients_per_round, "vmap",
                                        chunk_size=chunk_size, sampler=sampler)

    def one_round(carry, _):
      state, bad = carry
      new_state, metrics = round_fn(state, arrays, offsets)
      loss = metrics["train_loss"]
      nonfinite = ~jnp.isfinite(loss)
      frozen = (bad > 0) | nonfinite
      # A diverged run keeps its last good state; the others are untouched by the select.
      state = _where(frozen, state, new_state)
      bad = jnp.where((bad == 0) & nonfinite, new_state.round, bad)
      return (state, bad), jnp.where(frozen, jnp.nan, loss)

    def scan_rounds(carry, length):
      if length == 0:
        return carry, jnp.zeros((0,), jnp.float32)
      return jax.lax.scan(one_round, carry, None, length=length)

    def evaluate_state(state):
      return {k: jnp.asarray(v, jnp.float32) for k, v in evaluate(state.params, test_arrays).items()}

    losses, tests = [], []
    if blocks:
      def block(carry, _):
        carry, loss = scan_rounds(carry, block_len)
        return carry, (loss, evaluate_state(carry[0]))
      carry, (loss, test) = jax.lax.scan(block, carry, None, length=blocks)
      losses.append(loss.reshape(-1))
      tests.append(test)
    if rest:
      carry, loss = scan_rounds(carry, rest)
      losses.append(loss)
      if last:   # the final evaluation (round ``rounds`` is not a multiple of eval_every)
        tests.append(jax.tree.map(lambda v: v[None], evaluate_state(carry[0])))
    loss = jnp.concatenate(losses) if losses else jnp.zeros((0,), jnp.float32)
    test = (jax.tree.map(lambda *v: jnp.concatenate(v), *tests) if tests else None)
    return carry, loss, test

  return segment


def _group(tree, groups: int, size: int):
  """Leaves ``[groups * size, ...] -> [groups, size, ...]``."""
  return jax.tree.map(lambda x: x.reshape((groups, size) + x.shape[1:]), tree)


def _ungroup(tree):
  return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def _pad_runs(tree, total: int):
  """Leaves ``[runs, ...]`` padded to ``total`` rows by repeating the first run."""
  def pad(x):
    extra = total - x.shape[0]
    if extra == 0:
      return x
    return jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra,) + x.shape[1:])])
  return jax.tree.map(pad, tree)


RUNS_AXIS = "runs"   # the mesh axis a sharded study splits its runs over


def runs_mesh(devices=None) -> jax.sharding.Mesh:
  """A one-axis mesh (``RUNS_AXIS``) over ``devices`` (default: all) for ``train_many``."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.array(devices), (RUNS_AXIS,))


def make_program(build: Build, data: FederatedData, clients_per_round: int, evaluate,
                 eval_every: int, sampler=None, chunk_size: Optional[int] = None,
                 runs_per_chunk: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None):
  """``program(hp, seeds, carry, arrays, offsets, test, start, stop, last)``, jitted.

  Runs rounds ``start..stop`` (static) of every run: ``vmap`` over the runs, and a
  ``lax.map`` over groups of ``runs_per_chunk`` runs when given (memory). With ``mesh``
  (one axis, ``RUNS_AXIS``) the runs are split evenly over its devices (``shard_map``;
  the data replicated), each device vmapping (and grouping) its own. ``carry=None``
  initialises the runs; ``last`` adds the final evaluation. Returns ``(carry,
  train_loss [runs, n], test {name: [runs, evals]} or None)`` and counts its traces in
  ``program.traces``.
  """
  traces = [0]
  if mesh is not None and mesh.axis_names != (RUNS_AXIS,):
    raise ValueError(f"A study's mesh has the one axis {RUNS_AXIS!r} (studies.runs_mesh), "
                     f"got axes {mesh.axis_names}.")
  shards = 1 if mesh is None else mesh.size

  def study_program(hp, seeds, carry, arrays, offsets, test_arrays, start, stop, last):
    traces[0] += 1    # runs only while tracing
    segment = _run_segment(build, data, clients_per_round, evaluate, eval_every, sampler,
                           chunk_size, start, stop)
    runs = seeds.shape[0]
    per_shard = math.ceil(runs / shards)
    size = per_shard if not runs_per_chunk else min(runs_per_chunk, per_shard)
    groups = math.ceil(per_shard / size)

    def local(args, arrays, offsets, test_arrays):   # one device's runs: [groups * size]
      one = lambda h, s, c: segment(h, s, c, arrays, offsets, test_arrays, last)
      many = jax.vmap(one)
      if groups == 1:
        return many(*args)
      return _ungroup(jax.lax.map(lambda a: many(*a), _group(args, groups, size)))

    args = _pad_runs((hp, seeds, carry), shards * groups * size)
    if mesh is None:
      out = local(args, arrays, offsets, test_arrays)
    else:
      # No collectives: every run is independent, so the varying-axes check has nothing
      # to guard (and no gradient is taken here).
      spec, same = jax.sharding.PartitionSpec(RUNS_AXIS), jax.sharding.PartitionSpec()
      out = jax.shard_map(local, mesh=mesh, in_specs=(spec, same, same, same),
                          out_specs=spec, check_vma=False)(args, arrays, offsets, test_arrays)
    return jax.tree.map(lambda x: x[:runs], out)

  program = jax.jit(study_program, static_argnames=("start", "stop", "last"))
  program.traces = traces
  return program


def _stack_hparams(hparams: Mapping[str, Any], seeds) -> tuple[dict, jax.Array]:
  seeds = jnp.asarray(seeds, jnp.int32).reshape(-1)
  hp = {k: jnp.asarray(v, jnp.float32).reshape(-1) for k, v in hparams.items()}
  for name, values in hp.items():
    if values.shape != seeds.shape:
      raise ValueError(f"hyper-parameter {name!r} has {values.shape[0]} values for "
                       f"{seeds.shape[0]} runs; give one value per run.")
  if seeds.shape[0] == 0:
    raise ValueError("A study needs at least one run (got no seeds).")
  return hp, seeds


def train_many(build: Build, hparams: Mapping[str, Any], seeds, data: FederatedData,
               evaluate: Callable, test_arrays, *, rounds: int, clients_per_round: int,
               eval_every: int = 0, runs_per_chunk: Optional[int] = None, sampler=None,
               chunk_size: Optional[int] = None, workdir: Optional[str] = None,
               checkpoint_every: int = 0,
               mesh: Optional[jax.sharding.Mesh] = None) -> StudyResult:
  """Runs every run of a study, vmapped, in one compiled program.

  Args:
    build: ``(hparams {name: f32 scalar}, seed int32 scalar) -> (method, init_params)``;
      traced, so it must only compute with the values (``hyperparams.py``).
    hparams: ``{name: [runs] values}``, one value per run (a grid: its cartesian
      product flattened).
    seeds: int ``[runs]``: each run's ``PRNGKey(seed)`` (cohorts, client shuffles) and
      whatever ``build`` derives from it (the model init).
    data: the training population, shared by every run.
    evaluate: ``(params, test_arrays) -> {name: scalar}`` (jittable).
    test_arrays: its data.
    rounds, clients_per_round: as ``training.TrainOptions``.
    eval_every: evaluate every this many rounds (0: only at the end).
    runs_per_chunk: vectorise this many runs at once (a ``lax.map`` over the groups);
      None: all of them.
    sampler, chunk_size: as ``training.TrainOptions`` (the same cohorts and numbers).
    workdir: checkpoints of the whole study go to ``workdir/checkpoints`` and a
      study found there resumes (same hyper-parameters and seeds, else ValueError).
    checkpoint_every: save every this many rounds (a multiple of ``eval_every``; 0:
      only at the end).
    mesh: split the runs over this mesh's devices (``runs_mesh()``); the numbers are
      those of the unsharded study. None: one device.

  Returns:
    A ``StudyResult``. With no workdir and no ``checkpoint_every``, ``compiles`` is 1.
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}.")
  if runs_per_chunk is not None and runs_per_chunk < 1:
    raise ValueError(f"runs_per_chunk must be >= 1 or None, got {runs_per_chunk}.")
  if checkpoint_every and eval_every and checkpoint_every % eval_every:
    raise ValueError(f"checkpoint_every ({checkpoint_every}) must be a multiple of "
                     f"eval_every ({eval_every}) so checkpoints fall on evaluations.")
  hp, seeds = _stack_hparams(hparams, seeds)
  program = make_program(build, data, clients_per_round, evaluate, eval_every, sampler,
                         chunk_size, runs_per_chunk, mesh)
  arrays, offsets = data.device_arrays()
  stops = sorted({*range(checkpoint_every, rounds, checkpoint_every), rounds}
                 if checkpoint_every else {rounds})

  checkpointer, carry, start = None, None, 0
  losses, tests = [], []
  if workdir:
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    saved = checkpointer.latest_round()
    if saved is not None:
      carry, start, losses, tests = _restore(checkpointer, saved, program, hp, seeds, arrays,
                                             offsets, test_arrays, rounds, eval_every)
  try:
    for stop in stops:
      if stop <= start:
        continue
      carry, loss, test = program(hp, seeds, carry, arrays, offsets, test_arrays,
                                  start=start, stop=stop, last=stop == rounds)
      losses.append(np.asarray(loss))
      if test is not None:
        tests.append({k: np.asarray(v) for k, v in test.items()})
      start = stop
      if checkpointer:
        checkpointer.save(stop, _saved_tree(carry, hp, seeds, losses, tests))
  finally:
    if checkpointer:
      checkpointer.close()
  state, bad = carry
  bad = np.asarray(bad)
  test = {k: np.concatenate([t[k] for t in tests], axis=1) for k in tests[0]} if tests else {}
  return StudyResult(state=state, train_loss=np.concatenate(losses, axis=1),
                     diverged=bad > 0, diverged_round=bad,
                     eval_rounds=eval_rounds_of(rounds, eval_every), test=test,
                     compiles=program.traces[0])


def _saved_tree(carry, hp, seeds, losses, tests):
  return {"carry": carry, "hparams": hp, "seeds": seeds,
          "train_loss": np.concatenate(losses, axis=1),
          "test": {k: np.concatenate([t[k] for t in tests], axis=1) for k in tests[0]}
          if tests else {}}


def _restore(checkpointer, saved: int, program, hp, seeds, arrays, offsets, test_arrays,
             rounds: int, eval_every: int):
  """``(carry, start, losses, tests)`` of the study saved at round ``saved``."""
  # The template's shapes: the carry from an abstract trace, the records from the round.
  carry = jax.eval_shape(lambda: program(hp, seeds, None, arrays, offsets, test_arrays,
                                         start=0, stop=0, last=False)[0])
  program.traces[0] = 0     # the abstract trace compiles nothing
  runs = seeds.shape[0]
  evals = sum(r <= saved for r in eval_rounds_of(rounds, eval_every))
  test_shapes = jax.eval_shape(lambda: program(hp, seeds, None, arrays, offsets, test_arrays,
                                               start=0, stop=1, last=True)[2])
  program.traces[0] = 0
  template = {"carry": carry, "hparams": hp, "seeds": seeds,
              "train_loss": np.zeros((runs, saved), np.float32),
              "test": ({k: np.zeros((runs, evals), v.dtype) for k, v in test_shapes.items()}
                       if evals else {})}
  tree = checkpointer.restore(template)
  same = (np.array_equal(np.asarray(tree["seeds"]), np.asarray(seeds)) and
          set(tree["hparams"]) == set(hp) and
          all(np.array_equal(np.asarray(tree["hparams"][k]), np.asarray(hp[k])) for k in hp))
  if not same:
    raise ValueError(f"{checkpointer.directory} holds a study of other hyper-parameters or "
                     f"seeds; use another workdir or remove it.")
  carry = jax.tree.map(jnp.asarray, tree["carry"])
  tests = [{k: np.asarray(v) for k, v in tree["test"].items()}] if tree["test"] else []
  return carry, saved, [np.asarray(tree["train_loss"])], tests


# --------------------------------------------------------------------- hypergradients

def final_loss(build: Build, data: FederatedData, evaluate: Callable, *, rounds: int,
               clients_per_round: int, truncate: Optional[int] = None, remat: bool = True,
               sampler=None, chunk_size: Optional[int] = None, metric: str = "loss"):
  """``loss(hparams, seed, arrays, offsets, test_arrays) -> final test metric`` of one run.

  The run of ``train_many`` (same init, rounds and evaluation) without the divergence
  guard, differentiable in ``hparams``: ``jax.grad(loss)`` goes through every round's
  local training and aggregation. ``remat`` rematerialises each round in the backward
  pass (``jax.checkpoint``): memory holds one state per round, not every local step.
  ``truncate=K`` stops the gradient at the state before the last K rounds (a biased,
  cheaper estimate; None: all rounds).
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}.")
  if truncate is not None and not 1 <= truncate <= rounds:
    raise ValueError(f"truncate must be in [1, rounds={rounds}] or None, got {truncate}.")

  def loss(hparams, seed, arrays, offsets, test_arrays):
    method, init_params = build(hparams, seed)
    state = method.init(init_params, jax.random.PRNGKey(seed), data.num_clients)
    round_fn = algorithm_lib.make_round(method, data, clients_per_round, "vmap",
                                        chunk_size=chunk_size, sampler=sampler)
    body = lambda s, _: (round_fn(s, arrays, offsets)[0], None)
    if remat:
      body = jax.checkpoint(body)
    kept = rounds if truncate is None else truncate
    if rounds > kept:
      state, _ = jax.lax.scan(body, state, None, length=rounds - kept)
      state = jax.lax.stop_gradient(state)
    state, _ = jax.lax.scan(body, state, None, length=kept)
    return jnp.asarray(evaluate(state.params, test_arrays)[metric], jnp.float32)

  return loss
