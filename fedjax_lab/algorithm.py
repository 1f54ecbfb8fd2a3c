"""A federated algorithm as a composition of transforms, and the round built from it.

The round (DESIGN.md, "The round, as data flows"):

    ids      = sample(rng)                                  # on device
    cohort   = gather(data, ids)                            # [C, max_n, ...] + sizes
    down     = broadcast(state)                             # params + method extras
    per client (mapped by parallel.py):
      extra  = client_extra_args(down, client_state)        # kwargs for client_tx
      local  = local_train(oracle, client_tx, schedule, down['params'], ...)
      up, client_state' = client_final(local, down, client_state)
    agg      = aggregator(up[C], weights[C])                # inside the mapped region
    g, rule  = server_rule(-agg['delta'], aggregate=agg)    # the method's own server step
    params   = params + server_tx(g)                        # any optax transform

Methods replace hooks with ``dataclasses.replace`` or construct the dataclass with
their own; everything else is shared. ``server_tx`` is replaceable on every method:
what a method does at the server beyond the optimizer step is its ``server_rule``
(``fedjax_lab.server_rules``).
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import aggregate as aggregate_lib
from fedjax_lab import client as client_lib
from fedjax_lab import one_step
from fedjax_lab import parallel
from fedjax_lab import sampling
from fedjax_lab import server_rules
from fedjax_lab import size_buckets as size_buckets_lib
from fedjax_lab.data.federated import FederatedData, cohort_sizes, gather_cohort
from fedjax_lab.transforms import Aggregator, GradientOracle, as_extra_args
from fedjax_lab.types import Params, PRNGKey, PyTree


class ServerState(NamedTuple):
  """The entire state of a run; one pytree, checkpointed whole.

  Attributes:
    params: global model.
    opt_state: server optimizer state.
    round: int32 scalar, rounds completed.
    rng: uint32[2] base key; round r uses fold_in(rng, r).
    client_states: per-client persistent state, leaves ``[num_clients, ...]`` (or ()).
    extra: method-specific server state that no rule owns (e.g. GPM's bases).
    agg_state: aggregator state.
    rule_state: the method's server-rule state (e.g. SCAFFOLD's global control
      variate, FedHyper's accumulators, FOT's bases).
  """
  params: Params
  opt_state: PyTree
  round: jax.Array
  rng: PRNGKey
  client_states: PyTree
  extra: dict
  agg_state: PyTree
  rule_state: PyTree = ()


def default_broadcast(state: ServerState) -> dict:
  return {"params": state.params}


def default_client_extra_args(message_down: dict, client_state: PyTree) -> dict:
  del client_state
  return {"global_params": message_down["params"]}


def default_client_final(local: client_lib.LocalResult, message_down: dict,
                         client_state: PyTree) -> tuple[dict, PyTree]:
  delta = jax.tree.map(jnp.subtract, local.params, message_down["params"])
  return {"delta": delta}, client_state


@dataclasses.dataclass(frozen=True)
class FederatedAlgorithm:
  """Pure pieces of one federated method.

  Attributes:
    name: registry name.
    oracle: gradient oracle used at every local step.
    client_tx: client optax transform (extra args: ``global_params`` + method extras).
    server_tx: server optax transform on the pseudo-gradient; replaceable on every
      method (``dataclasses.replace(method, server_tx=optax.adam(1e-2))``).
    schedule: local epochs/steps and batch size.
    aggregator: reduces client messages.
    weighting: ``'num_examples'`` (w_i = n_i) or ``'uniform'`` (w_i = 1).
    server_rule: the method's own server step before ``server_tx``
      (``fedjax_lab.server_rules``): ``update(g, rule_state, params, *, aggregate,
      cohort_fraction) -> (g', rule_state')`` with ``g = -aggregate['delta']``.
    init_client_state: ``params -> one client's persistent state`` (None: stateless).
    init_extra: ``params -> dict`` of method server state that no rule owns.
    broadcast / client_extra_args / client_final: hooks, see module docstring.
    init_oracle_state: ``(message_down, client_state) -> oracle state`` (None:
      ``oracle.init(params)``), for oracles with a per-client history.
    step_limit: ``message_down -> int scalar``, local steps allowed this round
      (None: all of the schedule's); later steps are masked, shapes stay static.
    round_metrics: ``state -> dict`` of scalars logged with each round's metrics
      (e.g. a learning rate the server adapts).
    task_boundary: continual methods' step at the end of a task,
      ``(state, task, task_index, rng) -> (state, info dict)`` (FOT's FedProject,
      EWC's Fisher, GPM's bases), run by ``continual.run_stream``; it belongs to the
      method, so a method built on top of one (FedHyper on FOT) keeps it. None:
      nothing happens between tasks.
    round_end: a second exchange with the round's cohort after the server step,
      ``(before, after, cohort, client_rows, keys, real) -> (after, client_rows)``:
      ``before`` / ``after`` the server states around the step, ``cohort`` the
      gathered client data ``[P, max_n, ...]``, ``client_rows`` their new states,
      ``keys`` their round keys, ``real`` bool ``[P]`` (False for padding). FZooS
      fits its surrogates at the new global point here. None: nothing.
    init_local_params: ``(message_down, client_state) -> params`` local training
      starts from (None: ``message_down['params']``); personalized methods start
      from (or next to) the client's own model (``fedjax_lab.personalization``).
    personalize: ``(global_params, client_state, train_data, size, rng) -> params``,
      the model client i is evaluated with on its own test split (None: the global
      model); ``personalization.evaluate_clients`` calls it.
    one_step_sgd: the ``one_step.OneStepSGD`` of a method built on
      ``one_step.local_sgd`` (FedAvg, FedOpt, FedAvg-M): where a round is one local
      SGD step per client on a backend that vectorises the cohort, the round computes
      the aggregate as one gradient of the cohort's weighted loss (``one_step``; equal
      up to float rounding). Replacing the oracle, client transform, aggregator or a
      client hook turns it off, as does ``one_step_sgd=None``.
  """
  name: str
  oracle: GradientOracle
  client_tx: Any
  server_tx: optax.GradientTransformation
  schedule: client_lib.LocalSchedule
  aggregator: Aggregator = dataclasses.field(default_factory=aggregate_lib.weighted_mean)
  weighting: str = "num_examples"
  server_rule: server_rules.ServerRule = dataclasses.field(default_factory=server_rules.identity)
  init_client_state: Optional[Callable[[Params], PyTree]] = None
  init_extra: Optional[Callable[[Params], dict]] = None
  broadcast: Callable[[ServerState], dict] = default_broadcast
  client_extra_args: Callable[[dict, PyTree], dict] = default_client_extra_args
  client_final: Callable[..., tuple[dict, PyTree]] = default_client_final
  init_oracle_state: Optional[Callable[[dict, PyTree], PyTree]] = None
  step_limit: Optional[Callable[[dict], jax.Array]] = None
  round_metrics: Optional[Callable[[ServerState], dict]] = None
  task_boundary: Optional[Callable] = None
  round_end: Optional[Callable] = None
  init_local_params: Optional[Callable[[dict, PyTree], Params]] = None
  personalize: Optional[Callable] = None
  one_step_sgd: Optional[one_step.OneStepSGD] = None

  def __post_init__(self):
    if self.weighting not in ("num_examples", "uniform"):
      raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {self.weighting!r}.")
    # A plain optax transform is a rule too: it ignores the server step's extra arguments.
    object.__setattr__(self, "server_rule", optax.with_extra_args_support(self.server_rule))

  def init(self, params: Params, rng: PRNGKey, num_clients: int) -> ServerState:
    """Server state for a population of ``num_clients`` clients."""
    if self.init_client_state is None:
      client_states = ()
    else:
      one = self.init_client_state(params)
      client_states = jax.tree.map(
          lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x)).copy(), one)
    return ServerState(
        params=params,
        opt_state=self.server_tx.init(params),
        round=jnp.zeros((), jnp.int32),
        rng=jnp.asarray(rng, jnp.uint32),
        client_states=client_states,
        extra=self.init_extra(params) if self.init_extra else {},
        agg_state=self.aggregator.init(),
        rule_state=self.server_rule.init(params))

  def client_update(self, message_down: dict, one_client: tuple, max_examples: int):
    """One client's round: ``(message_up, weight, outputs)`` for parallel.py."""
    client_state, data, size, rng = one_client
    extra_args = self.client_extra_args(message_down, client_state)
    oracle_state = (None if self.init_oracle_state is None
                    else self.init_oracle_state(message_down, client_state))
    step_limit = None if self.step_limit is None else self.step_limit(message_down)
    start = (message_down["params"] if self.init_local_params is None
             else self.init_local_params(message_down, client_state))
    local = client_lib.local_train(
        self.oracle, as_extra_args(self.client_tx), self.schedule, start,
        data, size, rng, extra_args, max_examples, oracle_state, step_limit)
    message_up, client_state = self.client_final(local, message_down, client_state)
    if self.weighting == "num_examples":
      weight = size.astype(jnp.float32)
    else:
      weight = (size > 0).astype(jnp.float32)
    outputs = {"client_state": client_state, "loss": local.mean_loss,
               "num_steps": local.num_steps, "weight": weight,
               "aux_totals": {k: v for k, v in local.aux_totals.items() if k != "loss"}}
    return message_up, weight, outputs

  def server_step(self, state: ServerState, aggregate: dict, cohort_fraction) -> ServerState:
    """The server's step from an aggregate: ``server_rule`` then ``server_tx``.

    ``x <- x + server_tx(rule(-aggregate['delta']))``; the rule also sees the whole
    aggregate (e.g. SCAFFOLD's ``control_delta``) and ``cohort_fraction = C / N``.
    """
    pseudo_grad = jax.tree.map(jnp.negative, aggregate["delta"])
    pseudo_grad, rule_state = self.server_rule.update(
        pseudo_grad, state.rule_state, state.params, aggregate=aggregate,
        cohort_fraction=cohort_fraction)
    updates, opt_state = self.server_tx.update(pseudo_grad, state.opt_state, state.params)
    return state._replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, rule_state=rule_state)


def aggregate_and_step(algorithm: FederatedAlgorithm, state: ServerState, messages: PyTree,
                       weights: jax.Array, cohort_fraction=1.0) -> tuple[ServerState, dict]:
  """Aggregates stacked client messages and applies the method's server step.

  What an external cross-check calls with messages computed elsewhere (another
  library's clients, a hand-written reference): the method's aggregator, then its
  ``server_rule`` and ``server_tx``. Does not advance ``state.round`` or touch the
  client-state table.

  Args:
    algorithm: the method.
    state: the server state before the step.
    messages: client messages stacked ``[C, ...]`` (a dict with at least ``'delta'``,
      plus whatever the method's rule reads, e.g. SCAFFOLD's ``'control_delta'``).
    weights: float ``[C]`` client weights (e.g. example counts).
    cohort_fraction: ``C / N`` (SCAFFOLD scales its control update by it).

  Returns:
    ``(state, aggregate)``.
  """
  weights = jnp.asarray(weights, jnp.float32)
  count = jax.tree.leaves(messages)[0].shape[0]
  if weights.shape != (count,):
    raise ValueError(f"weights must have shape ({count},) to match the {count} stacked "
                     f"messages, got {weights.shape}.")
  # One device, no collectives: the messages are all here.
  aggregate, agg_state = algorithm.aggregator.update(messages, weights, state.agg_state, None)
  state = algorithm.server_step(state._replace(agg_state=agg_state), aggregate, cohort_fraction)
  return state, aggregate


def _gather_rows(tree: PyTree, ids: jax.Array) -> PyTree:
  # Padding ids (== num_clients) read zeros.
  return jax.tree.map(lambda x: jnp.take(x, ids, axis=0, mode="fill", fill_value=0), tree)


def _scatter_rows(tree: PyTree, ids: jax.Array, rows: PyTree) -> PyTree:
  # Padding ids fall outside the table and are dropped.
  return jax.tree.map(lambda x, r: x.at[ids].set(r, mode="drop"), tree, rows)


def sample_cohort(state: ServerState, num_clients: int, clients_per_round: int,
                  sampler: Optional[sampling.Sampler] = None) -> tuple[jax.Array, PRNGKey]:
  """The cohort ids ``[C]`` of the round ``state.round`` and the key its clients derive from.

  ``sampler(key, round) -> ids [C]`` (``sampling.weighted_sampler``,
  ``sampling.schedule_sampler``); None draws C clients uniformly without replacement.
  """
  ids, client_key, _ = _draw_cohort(state, num_clients, clients_per_round, sampler)
  return ids, client_key


def _draw_cohort(state: ServerState, num_clients: int, clients_per_round: int,
                 sampler: Optional[sampling.Sampler]) -> tuple[jax.Array, PRNGKey, dict]:
  """``(ids, client_key, info)``: ``sample_cohort`` plus the sampler's info scalars."""
  sample_key, client_key = jax.random.split(jax.random.fold_in(state.rng, state.round))
  if sampler is None:
    return sampling.uniform(sample_key, num_clients, clients_per_round), client_key, {}
  ids, info = _sampled(sampler, sample_key, state.round)
  return ids, client_key, info


def _sampled(sampler, key, round_index) -> tuple[jax.Array, dict]:
  """A sampler's ``(ids, info)``; samplers that return ids alone have no info."""
  out = sampler(key, round_index)
  ids, info = out if isinstance(out, tuple) else (out, {})
  return jnp.asarray(ids, jnp.int32), dict(info)


def client_key_of_round(state: ServerState) -> PRNGKey:
  """The key the clients of round ``state.round`` derive theirs from (as ``sample_cohort``)."""
  return jax.random.split(jax.random.fold_in(state.rng, state.round))[1]


def pad_cohort(ids: jax.Array, padded: int, num_clients: int) -> jax.Array:
  """``ids [C]`` followed by ``padded - C`` padding ids (``num_clients``), int32 ``[padded]``."""
  pad = padded - ids.shape[0]
  return jnp.concatenate([ids, jnp.full((pad,), num_clients, jnp.int32)])


def takes_one_gradient_round(algorithm: FederatedAlgorithm, backend: parallel.BackendLike,
                             max_examples: int) -> bool:
  """Whether the round computes the aggregate as one gradient (``one_step``): the method
  still holds the pieces its ``one_step_sgd`` names and the default client hooks, every
  client's round is one local step, and the backend vectorises the cohort.
  """
  spec = algorithm.one_step_sgd
  if spec is None or not parallel.get_backend(backend).vectorizes_cohort:
    return False
  same_pieces = (algorithm.oracle is spec.oracle and algorithm.client_tx is spec.client_tx
                 and algorithm.aggregator is spec.aggregator)
  default_hooks = (algorithm.broadcast is default_broadcast
                   and algorithm.client_extra_args is default_client_extra_args
                   and algorithm.client_final is default_client_final
                   and algorithm.init_client_state is None
                   and algorithm.init_oracle_state is None and algorithm.step_limit is None
                   and algorithm.init_local_params is None)
  return same_pieces and default_hooks and one_step.fits_one_step(algorithm.schedule,
                                                                   max_examples)


def plan_size_buckets(algorithm: FederatedAlgorithm, data: FederatedData, cohort_size: int,
                      backend: parallel.BackendLike = "vmap",
                      chunk_size: Optional[int] = None) -> tuple:
  """The ``size_buckets`` a round of distinct clients runs its cohort in (``()``: none).

  Bucketing applies where the backend vectorises the cohort, the round is not one
  gradient (``takes_one_gradient_round``), the method trains its clients with
  ``FederatedAlgorithm.client_update`` on an epochs schedule of a fixed batch size, the
  aggregator is not streamed over chunks, the population's sizes are known, and the
  saving is worth it (``size_buckets.plan``).
  """
  backend = parallel.get_backend(backend)
  sizes = getattr(data, "client_sizes", None)
  if (sizes is None or not backend.vectorizes_cohort
      or takes_one_gradient_round(algorithm, backend, int(data.max_client_size))
      or type(algorithm).client_update is not FederatedAlgorithm.client_update
      or parallel.streams_aggregate(algorithm.aggregator, chunk_size, cohort_size)):
    return ()
  return size_buckets_lib.plan(sizes, cohort_size, algorithm.schedule,
                               int(data.max_client_size))


def _make_round_body(algorithm: FederatedAlgorithm, data: FederatedData, clients_per_round: int,
                     backend: parallel.Backend, chunk_size: Optional[int] = None,
                     size_buckets=False) -> Callable:
  """``body(state, ids, client_key, arrays, offsets, read_rows, write_rows)``.

  The round after sampling. ``read_rows(state, ids)`` gives the cohort's client
  states and ``write_rows(state, ids, new_rows) -> state`` stores them: a gather and
  a scatter on ``state.client_states`` on device, or rows passed in and returned
  when the table lives elsewhere. Returns ``(state, new_rows, metrics)``.
  ``size_buckets``: the ids are distinct, so the cohort may run in size buckets: True
  (``plan_size_buckets``) or the ``size_buckets.Bucket`` tuple to use.
  """
  num_clients = data.num_clients
  sampling.validate_cohort(num_clients, clients_per_round)
  max_examples = int(data.max_client_size)

  def client_fn_for_rows(rows):
    return lambda message_down, one_client: algorithm.client_update(message_down, one_client,
                                                                    rows)

  buckets = ()
  if takes_one_gradient_round(algorithm, backend, max_examples):
    mapper = one_step.make_mapper(algorithm.one_step_sgd, algorithm.schedule,
                                  algorithm.weighting, max_examples)
  else:
    mapper = backend.make_mapper(client_fn_for_rows(max_examples), algorithm.aggregator,
                                 chunk_size)
    if size_buckets is True:
      buckets = plan_size_buckets(algorithm, data, backend.padded_cohort_size(clients_per_round),
                                  backend, chunk_size)
    elif size_buckets:
      buckets = tuple(size_buckets_lib.Bucket(*b) for b in size_buckets)
  if buckets:
    bucket_mapper = size_buckets_lib.make_mapper(client_fn_for_rows, algorithm.aggregator,
                                                 buckets, chunk_size, backend.collectives)

  def bucketed(message_down, client_states, arrays):
    """Whether this trace maps the cohort in buckets: a multi-epoch schedule moves the
    step keys, so only an oracle that does not read its key keeps its numbers."""
    if not buckets:
      return False
    if algorithm.schedule.epochs == 1:
      return True
    params = message_down["params"]
    batch_size = algorithm.schedule.batch_size
    batch = {**jax.tree.map(lambda a: jnp.zeros((batch_size,) + a.shape[1:], a.dtype), arrays),
             "mask": jnp.ones((batch_size,), bool)}
    oracle_state = (algorithm.oracle.init(params) if algorithm.init_oracle_state is None
                    else algorithm.init_oracle_state(
                        message_down, jax.tree.map(lambda a: a[0], client_states)))
    return not size_buckets_lib.reads_step_key(algorithm.oracle, params, batch, oracle_state)

  def body(state: ServerState, ids, client_key, arrays, offsets, read_rows, write_rows):
    gather = lambda cohort_ids, rows: gather_cohort(arrays, offsets, cohort_ids, rows)[0]
    sizes = cohort_sizes(offsets, ids, max_examples)
    client_states = read_rows(state, ids)
    # Keys by client id, so a client's randomness does not depend on the backend.
    keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(ids)
    message_down = algorithm.broadcast(state)
    # Gathered inside each branch: the buckets gather only the rows they run.
    padded_cohort = lambda: gather(ids, max_examples)
    cohort = None
    if bucketed(message_down, client_states, arrays):
      aggregate, outputs, agg_state = jax.lax.cond(
          size_buckets_lib.fits(offsets, buckets),
          lambda ops: bucket_mapper(ops[0], (ops[1], sizes, keys),
                                    lambda positions, rows: gather(ids[positions], rows), ops[2]),
          lambda ops: mapper(ops[0], (ops[1], padded_cohort(), sizes, keys), ops[2]),
          (message_down, client_states, state.agg_state))
    else:
      cohort = padded_cohort()
      aggregate, outputs, agg_state = mapper(
          message_down, (client_states, cohort, sizes, keys), state.agg_state, client_ids=ids)
    # |S| / N over the real clients (padding ids are num_clients): C / N for fixed-size
    # cohorts, the drawn size for Poisson ones.
    cohort_fraction = jnp.sum(ids < num_clients).astype(jnp.float32) / num_clients
    before = state
    state = algorithm.server_step(state._replace(agg_state=agg_state), aggregate,
                                  cohort_fraction)
    new_rows = outputs["client_state"]
    if algorithm.round_end is not None:
      cohort = padded_cohort() if cohort is None else cohort
      state, new_rows = algorithm.round_end(before, state, cohort, new_rows, keys,
                                            ids < num_clients)
    state = write_rows(state._replace(round=state.round + 1), ids, new_rows)
    weights = outputs["weight"]
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    metrics = {"train_loss": jnp.sum(weights * outputs["loss"]) / total,
               "local_steps": jnp.sum(outputs["num_steps"]),
               "cohort_examples": jnp.sum(sizes)}
    # Oracle counters (e.g. function queries), summed over the cohort's local steps.
    metrics.update({f"client_{k}": jnp.sum(v) for k, v in outputs["aux_totals"].items()})
    if algorithm.round_metrics is not None:
      metrics.update(algorithm.round_metrics(state))
    return state, new_rows, metrics

  return body


def make_round_core(algorithm: FederatedAlgorithm, data: FederatedData, clients_per_round: int,
                    backend: parallel.BackendLike = "vmap", mesh=None,
                    chunk_size: Optional[int] = None) -> Callable:
  """Builds ``core(state, ids, client_rows, arrays, offsets) -> (state, new_rows, metrics)``.

  The round for a cohort chosen outside it, with the cohort's client states passed
  in and returned rather than read from and written to ``state.client_states`` (which
  is left as it is: ``()`` when the table lives on the host, so hooks that read it,
  ``server_rule`` and ``round_metrics``, see ``()`` there). Pure; jit it.

  Research code runs a round on the cohort and batch order it chooses with it: the
  ids are the cohort, and with ``LocalSchedule(shuffle=False)`` each client's batches
  are its examples in the order they are packed in ``arrays`` (else the order is a
  shuffle keyed by ``fold_in(client_key, id)``; pass ``client_key`` to choose it).

  ``backend`` is a ``parallel.Backend`` or its name (``mesh`` then goes with
  ``'sharded'``).

  Args (of ``core``):
    state: server state of round ``state.round``.
    ids: int32 ``[P]``, the round's cohort (``sample_cohort``) followed by
      ``P - C`` padding ids equal to ``num_clients`` (``backend.padded_cohort_size``).
    client_rows: the cohort's client states, leaves ``[P, ...]`` (zeros for padding).
    arrays, offsets: ``data.device_arrays()`` (or a streamed cohort in the packed layout).

  Returns:
    ``(state, new_rows, metrics)``: ``new_rows`` leaves ``[P, ...]``; the rows of
    padding ids are to be dropped. With the same ids and rows, the numbers are those
    of ``make_round``.
  """
  body = _make_round_body(algorithm, data, clients_per_round,
                          parallel.get_backend(backend, mesh), chunk_size)

  def core(state: ServerState, ids, client_rows, arrays, offsets, client_key=None):
    key = client_key_of_round(state) if client_key is None else client_key
    return body(state, ids, key, arrays, offsets, lambda s, i: client_rows, lambda s, i, r: s)

  return core


def make_round(algorithm: FederatedAlgorithm, data: FederatedData, clients_per_round: int,
               backend: parallel.BackendLike = "vmap", mesh=None,
               chunk_size: Optional[int] = None,
               sampler: Optional[sampling.Sampler] = None,
               size_buckets=True) -> Callable:
  """Builds ``round_fn(state, arrays, offsets) -> (state, metrics)``, pure.

  ``sampler(key, round) -> ids [C]`` chooses each round's cohort (default: uniform;
  ``sampling.weighted_sampler`` by example count, ``sampling.schedule_sampler`` for
  cohorts fixed ahead). For a cohort chosen outside the round, ``make_round_core``.

  ``backend`` is a ``parallel.Backend`` (``LoopBackend()``, ``VmapBackend()``,
  ``ShardedBackend(mesh)``) or its name; ``mesh`` goes with the name ``'sharded'``.

  ``chunk_size`` vectorises that many clients at a time (``parallel.make_mapper``):
  less memory for large cohorts, and on CPU faster from about 1,000 clients up.

  ``size_buckets``: with the default uniform sampler (distinct clients), run the
  cohort sorted by size in buckets each padded only to what it needs
  (``fedjax_lab.size_buckets``); same numbers up to float rounding. True: where
  ``plan_size_buckets`` finds them worth it; a tuple of ``size_buckets.Bucket``: those
  (e.g. ``size_buckets.plan(..., max_buckets=5, min_saving=0.0)`` for a long run);
  False: every client padded to the largest.

  ``arrays, offsets = data.device_arrays()`` are passed as arguments (not closed
  over) so a large dataset is not baked into the compiled program. The client-state
  table ``state.client_states [N, ...]`` stays on the device: the cohort's rows are
  gathered, run through the round (``make_round_core``) and scattered back.
  """
  backend = parallel.get_backend(backend, mesh)
  body = _make_round_body(algorithm, data, clients_per_round, backend, chunk_size,
                          size_buckets=size_buckets if sampler is None else False)
  num_clients = data.num_clients
  padded = backend.padded_cohort_size(clients_per_round)

  def read_rows(state, ids):
    return _gather_rows(state.client_states, ids)

  def write_rows(state, ids, rows):
    return state._replace(client_states=_scatter_rows(state.client_states, ids, rows))

  if sampler is not None:
    shape = jax.eval_shape(lambda k, r: _sampled(sampler, k, r)[0], jax.random.PRNGKey(0),
                           jnp.zeros((), jnp.int32)).shape
    if shape != (clients_per_round,):
      raise ValueError(f"The sampler draws cohorts of shape {shape}; clients_per_round="
                       f"{clients_per_round} needs ({clients_per_round},).")

  def round_fn(state: ServerState, arrays, offsets):
    ids, client_key, info = _draw_cohort(state, num_clients, clients_per_round, sampler)
    ids = pad_cohort(ids, padded, num_clients)
    state, _, metrics = body(state, ids, client_key, arrays, offsets, read_rows, write_rows)
    return state, {**metrics, **info}

  return round_fn


def make_multi_round(round_fn: Callable, backend: parallel.BackendLike,
                     donate_state: bool = False) -> Callable:
  """``run(state, arrays, offsets, num_rounds) -> (state, metrics [num_rounds])``.

  ``parallel.get_backend(backend).scan_rounds(round_fn, donate_state)``: on compiled
  backends (``vmap``, ``sharded``) the rounds run inside one jitted ``lax.scan``
  (``num_rounds`` is static: one compilation per distinct length); the ``loop``
  backend runs them from Python.

  ``donate_state=True`` donates the input state's buffers to the output: the
  client-state table is then updated in place instead of copied once per call
  (SCAFFOLD with 10,000 digits-MLP clients: about 45x faster per round at one round
  per call), and the state passed in must not be used afterwards.
  """
  return parallel.get_backend(backend).scan_rounds(round_fn, donate_state)
