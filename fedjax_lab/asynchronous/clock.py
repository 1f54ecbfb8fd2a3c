"""The simulated clock: an event simulation as arrays, one ``lax.scan`` step per server update.

``M = concurrency`` job slots hold the clients in flight: who, the model version each
downloaded, when it started and when it finishes (``system.durations``). A server step

  1. (``dispatch='on_update'``) fills the idle slots with new clients at the current time;
  2. takes arrivals in order of completion time -- the argmin over the slots' finish
     times, ties broken by the lower client id -- until its trigger fires:
     ``'count'`` (``buffer_size`` arrivals), ``'all'`` (every slot, or the ``deadline_s``
     after the step's start, which drops the late ones) or ``'window'`` (every arrival
     before the end of the next ``window_s`` window that holds one);
     (``dispatch='on_arrival'``) each arrival's slot at once gets a new client, which
     downloads the current model;
  3. aggregates the arrivals' messages -- the delta scaled by ``staleness(tau)``,
     ``tau = versions applied since its download`` -- with the method's aggregator and
     applies the method's ``server_step`` (server rule + server_tx), unchanged.

A client's update depends only on the model it downloaded, its data and its key, so it
is computed when the client is dispatched: every client dispatched during one step
downloads the same model, and their local training is one mapped call (``backend``) of the engine's
``FederatedAlgorithm.client_update`` (FedBuff: ``buffer_size`` clients, a synchronous
round: the cohort). Slots keep the message until it arrives. The event bookkeeping is
scalar and ``[M]``/``[N]``-sized array work; no Python runs per event.

Randomness: the ``n``-th dispatch of a run (``n = 0, 1, ...``, counted over the whole
run) chooses its client as ``argmax_i u_i`` over the free, available clients with
``u = uniform(fold_in(fold_in(rng, 1), n), (N,))``, scales its duration by
``exp(jitter * normal(fold_in(fold_in(rng, 2), n)))``, trains with the key
``fold_in(fold_in(rng, 3), n)`` and hands ``fold_in(fold_in(rng, 4), n)`` to a method's
``local_steps`` (AFA-CD's clients draw their steps with it); ``rng`` is the run's
``ServerState.rng``.

The dispatched clients are mapped by a ``parallel.Backend`` (``loop``, ``vmap``,
``sharded``), the one the synchronous round uses; their messages come back stacked
(the backend's ``collectives.gather``), so the numbers do not depend on it.

The clock state is ``ServerState.extra['clock']`` (``ClockState``), so checkpoints and
resumption carry it; ``ServerState.round`` counts server steps.
"""
import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import parallel
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.asynchronous import staleness as staleness_lib
from fedjax_lab.asynchronous import system as system_lib
from fedjax_lab.data.federated import FederatedData, gather_cohort
from fedjax_lab.transforms import Aggregator, as_collectives

DISPATCH = ("on_arrival", "on_update")
TRIGGERS = ("count", "all", "window")
MIX = ("delta", "current")


@dataclasses.dataclass(frozen=True)
class AsyncSpec:
  """How the server takes arrivals and who trains when.

  Attributes:
    concurrency: ``M``, clients in flight (the cohort of a synchronous round).
    dispatch: ``'on_arrival'`` (a finished client is replaced at once: FedAsync,
      FedBuff) or ``'on_update'`` (idle slots are filled after each server update:
      synchronous FedAvg, FedFix).
    trigger: ``'count'``, ``'all'`` or ``'window'`` (module docstring).
    buffer_size: arrivals per update with ``trigger='count'`` (FedAsync 1, FedBuff K).
    window_s: window length with ``trigger='window'`` (FedFix).
    deadline_s: with ``trigger='all'``, seconds after the step's start after which late
      clients are dropped (None: wait for the slowest).
    staleness: ``tau -> factor`` on each arrival's delta (``staleness.py``).
    mix: ``'delta'``: the arrival's delta is ``x_client - x_downloaded`` (FedBuff);
      ``'current'``: ``x_client - x_current``, the server model when it arrives
      (FedAsync's mixing ``x <- (1 - a) x + a x_client`` with server SGD(a)).
    reweight: None, or ``(clock, arrivals) -> (factor [P], stats)``: a further factor
      on each arrival's delta, and the new ``clock.stats`` (FedAU).
    local_steps: None (the schedule's steps), or ``(clock, client, time, key) -> steps``:
      steps assigned at dispatch (FedCompass; AFA-CD's clients' own draw from ``key``);
      masked with the engine's ``step_limit``.
    on_step: None, or ``(clock, arrivals) -> clock`` run after each step (a scheduler's
      bookkeeping; ``arrivals`` is the step's ``Arrivals``).
    init_stats: None, or ``num_clients -> dict``: the initial ``clock.stats``.
    on_init: None, or ``(state, arrays, offsets, max_examples) -> state`` run by ``init``
      before the first dispatch (FedAMD's anchors of every client at ``x_0``).
    hist_bins: staleness histogram bins ``0 .. hist_bins - 2`` and ``>= hist_bins - 1``.
  """
  concurrency: int
  dispatch: str = "on_arrival"
  trigger: str = "count"
  buffer_size: int = 1
  window_s: float = 0.0
  deadline_s: Optional[float] = None
  staleness: Callable = dataclasses.field(default_factory=staleness_lib.constant)
  mix: str = "delta"
  reweight: Optional[Callable] = None
  local_steps: Optional[Callable] = None
  on_step: Optional[Callable] = None
  init_stats: Optional[Callable] = None
  on_init: Optional[Callable] = None
  hist_bins: int = 32

  def __post_init__(self):
    if self.dispatch not in DISPATCH:
      raise ValueError(f"Unknown dispatch {self.dispatch!r}; choose one of {', '.join(DISPATCH)}.")
    if self.trigger not in TRIGGERS:
      raise ValueError(f"Unknown trigger {self.trigger!r}; choose one of {', '.join(TRIGGERS)}.")
    if self.mix not in MIX:
      raise ValueError(f"Unknown mix {self.mix!r}; choose one of {', '.join(MIX)}.")
    if self.concurrency < 1:
      raise ValueError(f"concurrency must be >= 1, got {self.concurrency}.")
    if self.trigger == "count" and self.buffer_size < 1:
      raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}.")
    if self.trigger == "count" and self.dispatch == "on_update" and self.buffer_size > self.concurrency:
      raise ValueError(f"With dispatch='on_update' at most concurrency={self.concurrency} "
                       f"clients arrive per update; buffer_size={self.buffer_size} never fills.")
    if self.trigger == "window" and not self.window_s > 0:
      raise ValueError(f"trigger='window' needs window_s > 0, got {self.window_s}.")
    if self.trigger != "window" and self.window_s:
      raise ValueError("window_s goes with trigger='window'.")
    if self.deadline_s is not None and (self.trigger != "all" or not self.deadline_s > 0):
      raise ValueError(f"deadline_s must be > 0 and goes with trigger='all', got "
                       f"{self.deadline_s} with trigger={self.trigger!r}.")
    if self.trigger in ("all", "window") and self.dispatch != "on_update":
      raise ValueError(f"trigger={self.trigger!r} needs dispatch='on_update'.")
    if self.hist_bins < 2:
      raise ValueError(f"hist_bins must be >= 2, got {self.hist_bins}.")

  @property
  def pops(self) -> int:
    """Static number of arrivals a step can take."""
    return self.buffer_size if self.trigger == "count" else self.concurrency

  @property
  def dispatches(self) -> int:
    """Static number of clients a step can dispatch (and train)."""
    return self.pops if self.dispatch == "on_arrival" else self.concurrency


class ClockState(NamedTuple):
  """The simulated system between server steps (``ServerState.extra['clock']``).

  ``slot_*`` leaves are ``[M]``; ``participation``, ``in_flight`` are ``[N]``.
  """
  time: jax.Array             # float32, simulated seconds
  version: jax.Array          # int32, server updates applied
  dispatched: jax.Array       # int32, dispatches so far (the key counter)
  slot_client: jax.Array      # int32, -1: idle
  slot_version: jax.Array     # int32, version downloaded
  slot_start: jax.Array       # float32
  slot_finish: jax.Array      # float32, inf when idle
  slot_steps: jax.Array       # int32, local steps of the job
  slot_message: dict          # the client's message, leaves [M, ...]
  slot_weight: jax.Array      # float32, the method's data weight
  in_flight: jax.Array        # bool [N]
  participation: jax.Array    # int32 [N], arrivals per client
  busy_s: jax.Array           # float32, client-seconds of jobs that arrived
  dropped: jax.Array          # int32, jobs dropped at a deadline
  staleness_hist: jax.Array   # int32 [hist_bins]
  stats: dict                 # method statistics (FedAU's intervals, FedCompass' speeds)


class Arrivals(NamedTuple):
  """One step's arrivals, ``[P]`` each (``valid`` marks the real ones)."""
  valid: jax.Array
  client: jax.Array
  staleness: jax.Array
  start: jax.Array
  finish: jax.Array
  steps: jax.Array


def client_steps(algorithm: FederatedAlgorithm, sizes: np.ndarray, max_examples: int) -> np.ndarray:
  """int32 ``[N]``: local steps each client runs under the method's schedule."""
  schedule = algorithm.schedule
  sizes = np.asarray(sizes)
  if schedule.steps is not None:
    return np.where(sizes > 0, schedule.steps, 0).astype(np.int32)
  batch = schedule.resolved_batch_size(max_examples)
  return (schedule.epochs * np.ceil(np.minimum(sizes, max_examples) / batch)).astype(np.int32)


def _take(tree, index):
  return jax.tree.map(lambda x: x[index], tree)


def _select(flag, new, old):
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


# The clock keeps each client's message until it arrives: the mapper hands them back
# stacked (gathered over the placements) instead of reduced.
_STACK = Aggregator(init=lambda: (), update=lambda messages, weights, state, collectives: (
    as_collectives(collectives).gather((messages, weights)), state))


def _first_arrival(finish, client, big):
  """Index of the slot that finishes first, the lower client id on ties."""
  key = jnp.where(finish == jnp.min(finish), client, big)
  return jnp.argmin(key)


class AsyncRun(NamedTuple):
  """``init(params, rng, arrays, offsets) -> ServerState``,
  ``step(state, arrays, offsets) -> (state, metrics)`` and ``step_with_arrivals`` (also
  returns the step's ``Arrivals``, in the order they were taken), all pure (jit them)."""
  init: Callable
  step: Callable
  step_with_arrivals: Callable
  spec: AsyncSpec


def make_async(algorithm: FederatedAlgorithm, data: FederatedData,
               system: system_lib.SystemModel, spec: AsyncSpec,
               backend: parallel.BackendLike = "vmap", mesh=None,
               chunk_size: Optional[int] = None) -> AsyncRun:
  """The simulation of ``algorithm`` under ``system`` and ``spec``.

  ``backend`` (a ``parallel.Backend`` or its name; ``mesh`` with ``'sharded'``) maps the
  clients dispatched in a step, ``chunk_size`` at a time, as ``make_round`` does.

  The step has the signature of ``algorithm.make_round``'s round (``(state, arrays,
  offsets) -> (state, metrics)``), so ``training.run_loop`` runs it (pass
  ``round_wrapper=lambda _: run.step`` and ``init_state=run.init(...)``).

  Metrics per step: ``sim_time`` (seconds at the update), ``step_s`` (its duration),
  ``arrivals``, ``mean_staleness``, ``max_staleness`` (over the arrivals), ``applied``
  (1 if the update had arrivals), ``updates_applied`` (so far), ``utilisation``
  (client-seconds of arrived jobs / (M * time)), ``dispatched``, ``train_loss`` (the
  step's dispatched clients' mean local loss).
  """
  num_clients = data.num_clients
  M = spec.concurrency
  if M > num_clients:
    raise ValueError(f"concurrency={M} needs at least as many clients; the data has "
                     f"{num_clients}.")
  if system.num_clients != num_clients:
    raise ValueError(f"The system model has {system.num_clients} clients, the data "
                     f"{num_clients}.")
  max_examples = int(data.max_client_size)
  steps_table = jnp.asarray(client_steps(algorithm, data.client_sizes, max_examples))
  P, D = spec.pops, spec.dispatches
  big = jnp.int32(np.iinfo(np.int32).max)
  method = algorithm
  backend = parallel.get_backend(backend, mesh)
  if spec.local_steps is not None:
    # Per-client step counts travel in the broadcast; the engine masks the later steps.
    method = dataclasses.replace(algorithm, step_limit=lambda down: down["async_local_steps"])

  def choose(clock: ClockState, in_flight, counter, time, rng, allowed):
    """One dispatch at ``time``: ``(client or -1, start, finish, steps, in_flight, counter)``."""
    start, candidates = system_lib.next_start(system, time, ~in_flight)
    u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng, 1), counter),
                           (num_clients,))
    client = jnp.argmax(jnp.where(candidates, u, -1.0)).astype(jnp.int32)
    ok = allowed & jnp.isfinite(start) & jnp.any(candidates)
    if spec.local_steps is None:
      steps = steps_table[client]
    else:
      steps_key = jax.random.fold_in(jax.random.fold_in(rng, 4), counter)
      steps = jnp.minimum(spec.local_steps(clock, client, start, steps_key), steps_table[client])
    jitter_key = jax.random.fold_in(jax.random.fold_in(rng, 2), counter)
    finish = start + system_lib.durations(system, client, steps, jitter_key)
    in_flight = in_flight.at[client].set(in_flight[client] | ok)
    return (jnp.where(ok, client, -1), start, jnp.where(ok, finish, jnp.inf),
            jnp.where(ok, steps, 0), ok, in_flight, counter + ok.astype(jnp.int32))

  def client_fn(down, one_client):
    row, data_, size, key, s = one_client
    d = down if spec.local_steps is None else {**down, "async_local_steps": s}
    return method.client_update(d, (row, data_, size, key), max_examples)

  mapper = backend.make_mapper(client_fn, _STACK, chunk_size)

  def train(state: ServerState, arrays, offsets, clients, counters, steps, valid):
    """Messages of the dispatched clients from the current model, one mapped call."""
    count = clients.shape[0]
    pad = backend.padded_cohort_size(count) - count
    ids = jnp.where(valid, clients, num_clients)
    if pad:   # zero-weight padding clients up to a multiple of the devices
      ids = jnp.concatenate([ids, jnp.full((pad,), num_clients, jnp.int32)])
      counters = jnp.concatenate([counters, jnp.zeros((pad,), counters.dtype)])
      steps = jnp.concatenate([steps, jnp.zeros((pad,), steps.dtype)])
    cohort, sizes = gather_cohort(arrays, offsets, ids, max_examples)
    rows = jax.tree.map(lambda x: jnp.take(x, ids, axis=0, mode="fill", fill_value=0),
                        state.client_states)
    keys = jax.vmap(lambda n: jax.random.fold_in(jax.random.fold_in(state.rng, 3), n))(counters)
    down = method.broadcast(state)
    (messages, weights), outputs, _ = mapper(down, (rows, cohort, sizes, keys, steps), (),
                                             client_ids=ids)
    if pad:
      ids = ids[:count]
      messages, weights, outputs = jax.tree.map(lambda x: x[:count], (messages, weights, outputs))
    if spec.mix == "current":   # keep the client's model; the delta is taken on arrival
      messages = {**messages, "delta": jax.tree.map(
          lambda d, p: d + p[None], messages["delta"], down["params"])}
    weights = jnp.where(valid, weights, 0.0)
    client_states = jax.tree.map(lambda x, r: x.at[ids].set(r, mode="drop"),
                                 state.client_states, outputs["client_state"])
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    loss = jnp.sum(weights * outputs["loss"]) / total
    return messages, weights, client_states, loss

  def dispatch_idle(state: ServerState, clock: ClockState):
    """Fills every idle slot at ``clock.time`` (``[M]`` records, slot order)."""
    def body(carry, m):
      in_flight, counter = carry
      idle = clock.slot_client[m] < 0
      client, start, finish, steps, ok, in_flight, new_counter = choose(
          clock, in_flight, counter, clock.time, state.rng, idle)
      return (in_flight, new_counter), (client, start, finish, steps, ok, counter)

    (in_flight, counter), (client, start, finish, steps, ok, counters) = jax.lax.scan(
        body, (clock.in_flight, clock.dispatched), jnp.arange(M))
    return in_flight, counter, client, start, finish, steps, ok, counters

  def init(params, rng, arrays, offsets) -> ServerState:
    state = algorithm.init(params, rng, num_clients)
    if spec.on_init is not None:
      state = spec.on_init(state, arrays, offsets, max_examples)
    message_shape = jax.eval_shape(
        lambda s: train(s, arrays, offsets, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool))[0], state)
    clock = ClockState(
        time=jnp.zeros((), jnp.float32), version=jnp.zeros((), jnp.int32),
        dispatched=jnp.zeros((), jnp.int32),
        slot_client=jnp.full((M,), -1, jnp.int32), slot_version=jnp.zeros((M,), jnp.int32),
        slot_start=jnp.zeros((M,), jnp.float32), slot_finish=jnp.full((M,), jnp.inf, jnp.float32),
        slot_steps=jnp.zeros((M,), jnp.int32),
        slot_message=jax.tree.map(lambda s: jnp.zeros((M,) + s.shape[1:], s.dtype),
                                  message_shape),
        slot_weight=jnp.zeros((M,), jnp.float32), in_flight=jnp.zeros((num_clients,), bool),
        participation=jnp.zeros((num_clients,), jnp.int32),
        busy_s=jnp.zeros((), jnp.float32), dropped=jnp.zeros((), jnp.int32),
        staleness_hist=jnp.zeros((spec.hist_bins,), jnp.int32),
        stats={} if spec.init_stats is None else spec.init_stats(num_clients))
    if spec.dispatch == "on_arrival":
      # The first M clients start at time 0 from the initial model.
      in_flight, counter, client, start, finish, steps, ok, counters = dispatch_idle(state, clock)
      messages, weights, client_states, _ = train(state, arrays, offsets, client, counters, steps, ok)
      clock = clock._replace(
          dispatched=counter, slot_client=client, slot_start=start, slot_finish=finish,
          slot_steps=steps,
          slot_message=messages, slot_weight=weights, in_flight=in_flight)
      state = state._replace(client_states=client_states)
    return state._replace(extra={**state.extra, "clock": clock})

  def step_with_arrivals(state: ServerState, arrays, offsets):
    clock: ClockState = state.extra["clock"]
    t0 = clock.time
    slot_client, slot_version = clock.slot_client, clock.slot_version
    slot_start, slot_finish = clock.slot_start, clock.slot_finish
    slot_steps = clock.slot_steps
    fresh = jnp.full((M,), -1, jnp.int32)    # index of the slot's job among this step's dispatches
    in_flight, counter = clock.in_flight, clock.dispatched

    if spec.dispatch == "on_update":
      in_flight, counter, d_client, d_start, d_finish, d_steps, d_ok, d_counter = dispatch_idle(
          state, clock)
      slot_client = jnp.where(d_ok, d_client, slot_client)
      slot_version = jnp.where(d_ok, clock.version, slot_version)
      slot_start = jnp.where(d_ok, d_start, slot_start)
      slot_finish = jnp.where(d_ok, d_finish, slot_finish)
      slot_steps = jnp.where(d_ok, d_steps, slot_steps)
      fresh = jnp.where(d_ok, jnp.arange(M, dtype=jnp.int32), fresh)

    if spec.trigger == "window":
      # The end of the first window (from t0) that holds an arrival.
      first = jnp.min(slot_finish)
      windows = jnp.maximum(jnp.ceil((first - t0) / spec.window_s), 1.0)
      t_end = jnp.where(jnp.isfinite(first), t0 + windows * spec.window_s, t0 + spec.window_s)
    elif spec.trigger == "all" and spec.deadline_s is not None:
      t_end = t0 + jnp.float32(spec.deadline_s)
    else:
      t_end = jnp.float32(jnp.inf)

    def pop(carry, p):
      (slot_client, slot_version, slot_start, slot_finish, slot_steps, fresh, in_flight,
       counter, arrived, time, done) = carry
      j = _first_arrival(slot_finish, jnp.where(slot_client < 0, big, slot_client), big)
      when = slot_finish[j]
      ok = (~done) & jnp.isfinite(when) & (when <= t_end)
      client = slot_client[j]
      record = Arrivals(valid=ok, client=jnp.where(ok, client, -1),
                        staleness=jnp.where(ok, clock.version - slot_version[j], 0),
                        start=slot_start[j], finish=when, steps=slot_steps[j])
      source = (j, fresh[j])
      time = jnp.where(ok, when, time)
      in_flight = in_flight.at[jnp.where(ok, client, num_clients)].set(False, mode="drop")
      arrived = arrived + ok.astype(jnp.int32)
      if spec.dispatch == "on_arrival":
        n_client, n_start, n_finish, n_steps, n_ok, in_flight, new_counter = choose(
            clock, in_flight, counter, when, state.rng, ok)
        dispatch = (n_client, n_steps, n_ok, counter)
        counter = new_counter
        new = (jnp.where(ok, n_client, client), jnp.where(ok, clock.version, slot_version[j]),
               jnp.where(ok, n_start, slot_start[j]), jnp.where(ok, n_finish, when),
               jnp.where(ok, p, fresh[j]), jnp.where(ok, n_steps, slot_steps[j]))
      else:
        dispatch = ()
        new = (jnp.where(ok, -1, client), slot_version[j], slot_start[j],
               jnp.where(ok, jnp.inf, when), jnp.where(ok, -1, fresh[j]), slot_steps[j])
      slot_client = slot_client.at[j].set(new[0])
      slot_version = slot_version.at[j].set(new[1])
      slot_start = slot_start.at[j].set(new[2])
      slot_finish = slot_finish.at[j].set(new[3])
      fresh = fresh.at[j].set(new[4])
      slot_steps = slot_steps.at[j].set(new[5])
      done = done | ~ok
      if spec.trigger == "count":
        done = done | (arrived >= spec.buffer_size)
      carry = (slot_client, slot_version, slot_start, slot_finish, slot_steps, fresh, in_flight,
               counter, arrived, time, done)
      return carry, (record, source, dispatch)

    carry0 = (slot_client, slot_version, slot_start, slot_finish, slot_steps, fresh, in_flight,
              counter, jnp.zeros((), jnp.int32), t0, jnp.zeros((), bool))
    carry, (arrivals, (src_slot, src_fresh), dispatch) = jax.lax.scan(pop, carry0, jnp.arange(P))
    (slot_client, slot_version, slot_start, slot_finish, slot_steps, fresh, in_flight, counter,
     arrived, time, _) = carry

    # The clients dispatched this step train from the current model.
    if spec.dispatch == "on_arrival":
      n_client, n_steps, n_ok, n_counter = dispatch
      new_messages, new_weights, client_states, loss = train(state, arrays, offsets, n_client, n_counter,
                                                             n_steps, n_ok)
      dispatched_now = jnp.sum(n_ok)
    else:
      new_messages, new_weights, client_states, loss = train(state, arrays, offsets, d_client, d_counter,
                                                             d_steps, d_ok)
      dispatched_now = jnp.sum(d_ok)

    dropped = jnp.zeros((), jnp.int32)
    if spec.trigger == "all" and spec.deadline_s is not None:
      late = (slot_client >= 0) & jnp.isfinite(slot_finish)
      dropped = jnp.sum(late)
      in_flight = in_flight.at[jnp.where(late, slot_client, num_clients)].set(False, mode="drop")
      slot_client = jnp.where(late, -1, slot_client)
      slot_finish = jnp.where(late, jnp.inf, slot_finish)
      fresh = jnp.where(late, -1, fresh)
      time = jnp.where(dropped > 0, t_end, time)
    elif spec.trigger == "window":
      time = t_end
    time = jnp.where(arrived > 0, time, jnp.maximum(time, jnp.where(jnp.isfinite(t_end), t_end, t0)))

    # The arrivals' messages: fresh from this step's training or kept in their slot.
    from_fresh = src_fresh >= 0
    fresh_index = jnp.maximum(src_fresh, 0)
    messages = jax.tree.map(
        lambda f, s: jnp.where(from_fresh.reshape((-1,) + (1,) * (f.ndim - 1)),
                               f[fresh_index], s[src_slot]),
        new_messages, clock.slot_message)
    weights = jnp.where(from_fresh, new_weights[fresh_index], clock.slot_weight[src_slot])
    weights = jnp.where(arrivals.valid, weights, 0.0)
    if spec.mix == "current":
      messages = {**messages, "delta": jax.tree.map(
          lambda x, p: x - p[None], messages["delta"], state.params)}
    factor = spec.staleness(arrivals.staleness)
    stats = clock.stats
    if spec.reweight is not None:
      extra_factor, stats = spec.reweight(clock, arrivals)
      factor = factor * extra_factor
    factor = jnp.where(arrivals.valid, factor, 0.0)
    messages = {**messages, "delta": jax.tree.map(
        lambda d: d * factor.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype),
        messages["delta"])}

    # The engine's aggregator and server step, unchanged.
    trained = state._replace(client_states=client_states)
    aggregate, agg_state = algorithm.aggregator.update(messages, weights, trained.agg_state, None)
    updated = algorithm.server_step(trained._replace(agg_state=agg_state), aggregate,
                                    arrived.astype(jnp.float32) / num_clients)
    applied = arrived > 0
    state = _select(applied, updated, trained)

    # Slots whose job started this step keep its message until it arrives.
    keep_fresh = fresh >= 0
    slot_index = jnp.maximum(fresh, 0)
    slot_message = jax.tree.map(
        lambda f, s: jnp.where(keep_fresh.reshape((-1,) + (1,) * (f.ndim - 1)), f[slot_index], s),
        new_messages, clock.slot_message)
    slot_weight = jnp.where(keep_fresh, new_weights[slot_index], clock.slot_weight)

    tau = jnp.where(arrivals.valid, arrivals.staleness, 0)
    bins = jnp.minimum(tau, spec.hist_bins - 1)
    hist = clock.staleness_hist + jnp.zeros_like(clock.staleness_hist).at[bins].add(
        arrivals.valid.astype(jnp.int32))
    participation = clock.participation.at[jnp.where(arrivals.valid, arrivals.client,
                                                     num_clients)].add(1, mode="drop")
    busy = clock.busy_s + jnp.sum(jnp.where(arrivals.valid, arrivals.finish - arrivals.start, 0.0))
    version = clock.version + applied.astype(jnp.int32)
    clock = clock._replace(
        time=time, version=version, dispatched=counter, slot_client=slot_client,
        slot_version=slot_version, slot_start=slot_start, slot_finish=slot_finish,
        slot_steps=slot_steps, slot_message=slot_message, slot_weight=slot_weight, in_flight=in_flight,
        participation=participation, busy_s=busy, dropped=clock.dropped + dropped,
        staleness_hist=hist, stats=stats)
    if spec.on_step is not None:
      clock = spec.on_step(clock, arrivals)
    state = state._replace(round=state.round + 1, extra={**state.extra, "clock": clock})
    count = jnp.maximum(arrived, 1).astype(jnp.float32)
    metrics = {
        "train_loss": loss, "sim_time": time, "step_s": time - t0,
        "arrivals": arrived, "applied": applied.astype(jnp.int32), "updates_applied": version,
        "mean_staleness": jnp.sum(tau).astype(jnp.float32) / count,
        "max_staleness": jnp.max(tau), "dispatched": dispatched_now, "dropped": dropped,
        "utilisation": busy / jnp.maximum(M * time, 1e-12)}
    return state, metrics, arrivals

  def step(state: ServerState, arrays, offsets):
    return step_with_arrivals(state, arrays, offsets)[:2]

  return AsyncRun(init=init, step=step, step_with_arrivals=step_with_arrivals, spec=spec)


def staleness_histogram(state: ServerState) -> list:
  """Arrivals by staleness so far (the last bin holds ``>= hist_bins - 1``)."""
  return np.asarray(state.extra["clock"].staleness_hist).tolist()
