"""FOT: Federated Orthogonal Training, and centralized GPM as its upper reference.

Bakman, Yaldiz, Ezzeldin, Avestimehr. "Federated Orthogonal Training: Mitigating Global
Catastrophic Forgetting in Continual Federated Learning", ICLR 2024 (arXiv 2309.01289).
Saha, Garg, Roy. "Gradient Projection Memory for Continual Learning", ICLR 2021 (GPM).

FOT is GPM moved to the server. Clients run plain local SGD. Two pieces:

1. ``orthogonal_projection``: a server transform chained before the server optimizer.
   For every projected kernel (Dense ``[d, out]``; Conv ``[*window, c_in, c_out]``
   reshaped to ``[prod(window) c_in, c_out]``) it removes from the aggregated update G
   its component in the span of the layer's input basis U (Flax layout of the paper's
   ``G - G U U^T``)::

       G <- G - U (U^T G)

   Biases, norm layers and excluded heads pass through unchanged.

2. ``FedProject`` (at the end of task t): per client i and layer l, the inputs
   ``A_i [d, n_i]`` (``fedjax_lab.activations``), the residual after the current basis
   ``R_i = A_i - U U^T A_i`` with ratio ``r_i = ||R_i||_F / ||A_i||_F``, and the masked
   upload ``R_i Q_i``, ``Q_i [n_i, d]`` i.i.d. U[-1, 1]. The server receives only
   ``S = sum_i R_i Q_i`` (secure aggregation, simulated here as a plain sum: the server
   never needs the individual terms), ``r_bar = sum_i (n_i / n) r_i``, and sets::

       eps' = (r_bar - (1 - eps)) / r_bar
       S = U_S Sigma V^T;  k = min{k : sum_{j<=k} sigma_j^2 / ||S||_F^2 > eps'}
       U <- QR([U, U_S[:, :k]]);   eps <- eps + eps_inc after each task

   This is the authors' code (``FedAVGAggregator.expand_orth_set``): the ratio is not
   squared and at least one direction is added per task. ``squared_ratio=True`` uses
   the energy fraction ``r_bar^2`` that makes the criterion GPM's exactly, and
   ``min_new_columns=0`` skips a layer whose old basis already captures ``eps``.

The authors collect activations in training mode (dropout on upstream of a layer);
here the layer inputs are those of the deterministic forward.

Bases live in the transform's state with static shapes: each projected kernel has a
``[d, k_max]`` matrix (``k_max = d`` unless capped) and a column mask, so the rounds
are compiled once and ``set_bases`` swaps in a grown basis between tasks.

GPM (centralized reference): one client holding the pooled task data, the projection
applied to every local step's gradient (``client_projection``), and the basis grown
from the unmasked residual with GPM's criterion
``||A_proj||^2 + sum_{j<=k} sigma_j^2 >= eps ||A||^2`` on ``samples`` examples.
"""
import dataclasses
import re
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import activations
from fedjax_lab import aggregate as aggregate_lib
from fedjax_lab import continual
from fedjax_lab import oracles
from fedjax_lab import parallel
from fedjax_lab import server_rules
from fedjax_lab.algorithm import (FederatedAlgorithm, ServerState, default_client_extra_args,
                                  sample_cohort)
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import gather_cohort
from fedjax_lab.transforms import Aggregator, stateless_with_extra_args


# ----------------------------------------------------------------------------- bases

class LayerBasis(NamedTuple):
  """An orthonormal basis of one layer's input space, padded to static shape.

  Attributes:
    u: float32 ``[d, k_max]``; columns ``j`` with ``mask[j] == 1`` are orthonormal,
      the others zero.
    mask: float32 ``[k_max]``, 1 for valid columns (the valid ones come first).
  """
  u: jax.Array
  mask: jax.Array


def path_str(path) -> str:
  """A pytree key path as ``'params/Dense_0/kernel'``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def projected_layers(params, exclude: Sequence[str] = ()) -> dict:
  """Kernel paths to project and their input dimension ``d``.

  Every leaf named ``kernel`` with rank >= 2 (Dense ``[d, out]``, Conv
  ``[*window, c_in, c_out]``, ``d = prod(shape[:-1])``), unless its path matches one of
  the regular expressions in ``exclude`` (``re.search``), e.g. ``('Dense_2',)`` for a
  task head.
  """
  layers = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    if not name.endswith("kernel") or jnp.ndim(leaf) < 2:
      continue
    if any(re.search(pattern, name) for pattern in exclude):
      continue
    layers[name] = int(np.prod(jnp.shape(leaf)[:-1]))
  return layers


def empty_bases(params, exclude: Sequence[str] = (), max_columns: Optional[int] = None) -> dict:
  """Zero bases ``{kernel path: LayerBasis([d, k_max], zeros)}``, ``k_max = min(d, max_columns)``."""
  bases = {}
  for name, d in projected_layers(params, exclude).items():
    k_max = d if not max_columns else min(d, int(max_columns))
    bases[name] = LayerBasis(jnp.zeros((d, k_max), jnp.float32), jnp.zeros((k_max,), jnp.float32))
  return bases


def basis_sizes(bases: dict) -> dict:
  """``{kernel path: number of valid columns}`` (host ints)."""
  return {name: int(np.asarray(b.mask).sum()) for name, b in bases.items()}


def _project_leaf(g: jax.Array, basis: LayerBasis) -> jax.Array:
  matrix = g.reshape(-1, g.shape[-1])                          # [d, out]
  u = basis.u.astype(g.dtype) * basis.mask.astype(g.dtype)      # invalid columns are zero anyway
  return (matrix - u @ (u.T @ matrix)).reshape(g.shape)


def project(updates, bases: dict):
  """``G <- G - U (U^T G)`` on every kernel that has a basis; other leaves unchanged."""
  if not bases:
    return updates

  def one(path, g):
    basis = bases.get(path_str(path))
    return g if basis is None else _project_leaf(g, basis)

  return jax.tree_util.tree_map_with_path(one, updates)


class ProjectionState(NamedTuple):
  """``bases``: ``{kernel path: LayerBasis}`` (a flat dict: no None leaves to checkpoint)."""
  bases: dict


def orthogonal_projection(exclude: Sequence[str] = (), max_columns: Optional[int] = None,
                          bases: Optional[dict] = None) -> optax.GradientTransformation:
  """FOT's server transform: removes each kernel update's component in its layer's basis.

  Chain it before the server optimizer: ``optax.chain(orthogonal_projection(), optax.sgd(1.))``.
  With empty bases it is the identity (plain FedAvg).

  Args:
    exclude: regular expressions of kernel paths left unprojected (e.g. task heads).
    max_columns: cap on the pre-allocated columns per layer (default: ``d``).
    bases: initial bases (default: empty, pre-allocated from the params at ``init``).

  Returns:
    A transform whose state is ``ProjectionState``; replace its bases between tasks
    with ``set_bases`` (same shapes, so jitted rounds are not recompiled).
  """
  def init_fn(params):
    return ProjectionState(empty_bases(params, exclude, max_columns) if bases is None else bases)

  def update_fn(updates, state, params=None):
    del params
    return project(updates, state.bases), state

  return optax.GradientTransformation(init_fn, update_fn)


def client_projection() -> optax.GradientTransformationExtraArgs:
  """GPM's per-step projection on the client, with the bases passed as the ``bases``
  extra argument (broadcast by the server)."""
  return stateless_with_extra_args(lambda u, params, bases: project(u, bases),
                                   "client_projection()", ("bases",))


def _is_projection_state(x):
  return isinstance(x, ProjectionState)


def get_bases(opt_state) -> dict:
  """The bases of the (first) ``ProjectionState`` inside an optimizer state."""
  for leaf in jax.tree.leaves(opt_state, is_leaf=_is_projection_state):
    if isinstance(leaf, ProjectionState):
      return leaf.bases
  raise ValueError("The optimizer state holds no ProjectionState; chain "
                   "orthogonal_projection() into the server transform.")


def set_bases(opt_state, bases: dict):
  """Replaces the bases of every ``ProjectionState`` in ``opt_state`` (shapes must match)."""
  old = get_bases(opt_state)
  if set(old) != set(bases):
    raise ValueError(f"set_bases: layers differ; state has {sorted(old)}, got {sorted(bases)}.")
  for name in old:
    if old[name].u.shape != bases[name].u.shape:
      raise ValueError(f"set_bases: {name} basis has shape {bases[name].u.shape}, the state "
                       f"pre-allocated {old[name].u.shape}.")
  bases = {k: LayerBasis(jnp.asarray(b.u, jnp.float32), jnp.asarray(b.mask, jnp.float32))
           for k, b in bases.items()}
  return jax.tree.map(lambda x: ProjectionState(bases) if _is_projection_state(x) else x,
                      opt_state, is_leaf=_is_projection_state)


class PreviousParams(NamedTuple):
  """The global params before the last server step (x_{R-1} at a task's end)."""
  params: object


def keep_previous_params() -> optax.GradientTransformationExtraArgs:
  """A rule that keeps the params the server step starts from; ``g`` passes unchanged.

  FedProject's ``extraction='local'`` recomputes the last round's local models from it.
  """
  def init_fn(params):
    return PreviousParams(params)

  def update_fn(updates, state, params=None, **extra):
    del state, extra
    return updates, PreviousParams(params)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


EXTRACTIONS = ("local", "global")


# ------------------------------------------------------------------ basis growth (server)

def adjusted_threshold(eps: float, ratio: float, squared_ratio: bool = False) -> float:
  """``eps' = (r - (1 - eps)) / r``: the share of the residual's energy to keep so the
  old basis plus the new directions hold ``eps`` of the total (``r = r_bar`` or
  ``r_bar^2``). Equals ``eps`` when nothing is captured yet (``r = 1``)."""
  r = ratio ** 2 if squared_ratio else ratio
  if r <= 0:
    return -np.inf
  return (r - (1.0 - eps)) / r


def select_rank(singular_values, threshold: float, min_new: int = 1, strict: bool = True) -> int:
  """Smallest ``k >= min_new`` with ``sum_{j<=k} s_j^2 / sum_j s_j^2 > threshold``
  (``>=`` if not ``strict``); 0 when the spectrum is all zero."""
  s2 = np.asarray(singular_values, np.float64) ** 2
  total = s2.sum()
  if total <= 0:
    return 0
  ratios = np.cumsum(s2) / total
  hits = ratios > threshold if strict else ratios >= threshold - 1e-12
  k = int(np.argmax(hits)) + 1 if hits.any() else len(s2)
  if threshold <= 0:
    k = 0
  return int(min(max(k, min_new), len(s2)))


def extend_basis(basis: LayerBasis, directions: jax.Array) -> LayerBasis:
  """``QR([U_valid, directions])`` written back into the static ``[d, k_max]`` layout."""
  u, mask = np.asarray(basis.u), np.asarray(basis.mask)
  k_old = int(mask.sum())
  directions = np.asarray(directions)[:, :u.shape[1] - k_old]
  if directions.shape[1] == 0:
    return basis
  q, _ = np.linalg.qr(np.concatenate([u[:, :k_old], directions], axis=1).astype(np.float64))
  k = q.shape[1]
  new_u = np.zeros_like(u)
  new_u[:, :k] = q
  new_mask = np.zeros_like(mask)
  new_mask[:k] = 1
  return LayerBasis(jnp.asarray(new_u, jnp.float32), jnp.asarray(new_mask, jnp.float32))


def grow_basis(basis: LayerBasis, summed: jax.Array, ratio: float, eps: float,
               squared_ratio: bool = False, min_new: int = 1, strict: bool = True
               ) -> tuple[LayerBasis, int]:
  """The server's FedProject step for one layer.

  Args:
    basis: current basis.
    summed: ``S [d, m]`` whose column space is the new inputs' residual (FOT: the
      secure sum of the masked residuals, ``m = d``; GPM: the residual itself).
    ratio: ``r_bar``, the residual's share of the inputs' norm.
    eps: this task's energy threshold.

  Returns:
    (new basis, number of columns added).
  """
  s = jnp.asarray(summed, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(s))):
    raise FloatingPointError("FedProject: the summed activations are not finite.")
  u_s, sigma, _ = jnp.linalg.svd(s, full_matrices=False)
  k = select_rank(sigma, adjusted_threshold(eps, ratio, squared_ratio), min_new, strict)
  room = basis.u.shape[1] - int(np.asarray(basis.mask).sum())
  k = min(k, room)
  return extend_basis(basis, u_s[:, :k]), k


# -------------------------------------------------------------- FedProject (clients)

def masked_residuals(rows: dict, bases: dict, n: jax.Array, rng: jax.Array) -> dict:
  """One client's FedProject upload.

  Args:
    rows: ``{layer: A^T [rows, d]}`` (padding rows zero).
    bases: ``{layer: LayerBasis}``.
    n: the client's example count (its weight in ``r_bar``).
    rng: the client's masking key.

  Returns:
    ``{'masked': {layer: R Q [d, d]}, 'ratio_n': {layer: r n}, 'n': n}``; summed over
    clients these are what the server sees.
  """
  masked, ratio_n = {}, {}
  for i, (name, a) in enumerate(sorted(rows.items())):
    basis = bases[name]
    u = basis.u * basis.mask
    r = a - (a @ u) @ u.T                                     # residual rows [rows, d]
    norm_a = jnp.linalg.norm(a)
    ratio = jnp.where(norm_a > 0, jnp.linalg.norm(r) / jnp.maximum(norm_a, 1e-30), 1.0)
    q = jax.random.uniform(jax.random.fold_in(rng, i), r.shape, r.dtype, -1.0, 1.0)
    masked[name] = r.T @ q                                    # R Q: [d, d], span(R) w.p. 1
    ratio_n[name] = ratio * n
  return {"masked": masked, "ratio_n": ratio_n, "n": n}


def secure_sum() -> Aggregator:
  """Sum of the uploads of the real (weight > 0) clients.

  Stands in for secure aggregation: with pairwise masks the server would learn only
  this sum, which is all FedProject uses, so a plain sum gives the same numbers.
  """
  def update(messages, weights, state, axis_name=None):
    total, _ = aggregate_lib.weighted_sum(messages, (weights > 0).astype(jnp.float32), axis_name)
    return total, state
  return Aggregator(init=lambda: (), update=update)


@dataclasses.dataclass
class FedProject:
  """The task-boundary step of FOT, as a hook ``(state, task, t, rng) -> (state, info)``.

  Attributes:
    apply_fn: the model's linen ``apply`` (activations are captured from it).
    eps: energy threshold of the first task; task t uses ``eps + t * eps_inc``.
    eps_inc: per-task increment.
    clients: ``extraction='global'``: clients that upload (0: every client of the task).
    samples: ``extraction='global'``: examples per client (0: all of them, as the
      authors' code, and as ``'local'`` always does).
    backend: how to map over the clients (``loop``/``vmap``/``sharded``).
    squared_ratio / min_new_columns: see the module docstring.
    extraction: ``'local'`` (the authors'): the task's last cohort, activations of each
      client's local model after its last local step (recomputed from x_{R-1} with the
      round's cohort and keys); ``'global'``: the global model x_R on ``clients``.
    clients_per_round: the rounds' cohort size (``'local'``).
    algorithm: the method whose local training is recomputed (``fot`` sets it).
  """
  apply_fn: Callable
  eps: float = 0.95
  eps_inc: float = 0.0
  clients: int = 0
  samples: int = 0
  backend: str = "vmap"
  squared_ratio: bool = False
  min_new_columns: int = 1
  extraction: str = "local"
  clients_per_round: int = 0
  algorithm: Optional[FederatedAlgorithm] = None

  def __post_init__(self):
    if not 0.0 < self.eps <= 1.0:
      raise ValueError(f"FedProject eps must be in (0, 1], got {self.eps}.")
    if self.extraction not in EXTRACTIONS:
      raise ValueError(f"Unknown extraction {self.extraction!r}; choose one of "
                       f"{', '.join(EXTRACTIONS)}.")
    self._stat = None

  def _upload(self, params, bases, data, size, rng):
    mask = jnp.arange(data["x"].shape[0]) < size
    rows = activations.layer_input_rows(self.apply_fn, params, data["x"], mask, set(bases))
    missing = set(bases) - set(rows)
    if missing:
      raise ValueError(f"FedProject: no Dense/Conv call captured for {sorted(missing)}; "
                       f"exclude them from the projection.")
    return masked_residuals(rows, bases, size.astype(jnp.float32), rng)

  def _client_fn(self, shared, one_client):
    params, bases = shared
    data, size, rng = one_client
    return self._upload(params, bases, data, size, rng), (size > 0).astype(jnp.float32), ()

  def _local_client_fn(self, shared, one_client):
    down, bases = shared
    data, size, key = one_client
    # The client's round as the engine ran it: same model, data, key and schedule.
    up, _, _ = self.algorithm.client_update(down, ((), data, size, key), data["x"].shape[0])
    local = jax.tree.map(jnp.add, down["params"], up["delta"])
    message = self._upload(local, bases, data, size, jax.random.fold_in(key, 0x0F07))
    return message, (size > 0).astype(jnp.float32), ()

  def _last_round(self, state, task):
    """``(state of the task's last round, its cohort ids, its client key)``."""
    if self.algorithm is None or self.clients_per_round < 1:
      raise ValueError("FedProject(extraction='local') needs the method and "
                       "clients_per_round (fot() and from_config set them).")
    previous = server_rules.require_state(state.rule_state, PreviousParams,
                                          "keep_previous_params")
    last = state._replace(params=previous.params, round=state.round - 1)
    ids, client_key = sample_cohort(last, task.train.num_clients, self.clients_per_round)
    return last, ids, client_key

  def last_local_models(self, state, task):
    """The local models ``[C, ...]`` of the task's last round (what ``'local'`` reads)."""
    last, ids, client_key = self._last_round(state, task)
    data = task.train
    max_examples = int(data.max_client_size)
    cohort, sizes = gather_cohort(*data.device_arrays(), ids, max_examples)
    keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(ids)
    down = self.algorithm.broadcast(last)

    def one(x, size, key):
      up, _, _ = self.algorithm.client_update(down, ((), x, size, key), max_examples)
      return jax.tree.map(jnp.add, down["params"], up["delta"])

    return jax.vmap(one)(cohort, sizes, keys)

  def _local_sums(self, state, task, bases):
    last, ids, client_key = self._last_round(state, task)
    data = task.train
    padded = parallel.get_backend(self.backend).padded_cohort_size(self.clients_per_round)
    ids = jnp.concatenate([ids, jnp.full((padded - ids.shape[0],), data.num_clients,
                                         jnp.int32)])
    max_examples = int(data.max_client_size)
    if self._stat is None:
      self._stat = continual.make_client_statistic(self._local_client_fn, secure_sum(),
                                                   self.backend)
    arrays, offsets = data.device_arrays()
    return self._stat((self.algorithm.broadcast(last), bases), arrays, offsets, ids,
                      client_key, max_examples)

  def __call__(self, state: ServerState, task, task_index: int, rng):
    bases = get_bases(state.rule_state)
    if self.extraction == "local":
      sums = self._local_sums(state, task, bases)
    else:
      if self._stat is None:
        self._stat = continual.make_client_statistic(self._client_fn, secure_sum(),
                                                     self.backend)
      sums = continual.run_client_statistic(
          self._stat, (state.params, bases), task.train, rng, self.clients, self.samples,
          self.backend)
    eps = min(self.eps + task_index * self.eps_inc, 1.0)
    n = float(sums["n"])
    new_bases, info = {}, {"eps": eps}
    for name, basis in bases.items():
      r_bar = float(sums["ratio_n"][name]) / max(n, 1e-30)
      new_bases[name], added = grow_basis(basis, sums["masked"][name], r_bar, eps,
                                          self.squared_ratio, self.min_new_columns)
      info[f"basis/{name}"] = int(np.asarray(new_bases[name].mask).sum())
      info[f"ratio/{name}"] = r_bar
    return state._replace(rule_state=set_bases(state.rule_state, new_bases)), info


def fot(example_loss, client_lr: float, server_lr: float = 1.0,
        schedule: LocalSchedule = LocalSchedule(), weighting: str = "uniform",
        exclude: Sequence[str] = (), max_columns: Optional[int] = None,
        weight_decay: float = 0.0, task_boundary: Optional[Callable] = None
        ) -> FederatedAlgorithm:
  """FOT's rounds: local SGD (optional weight decay, 1e-5 in the paper's runs), the
  aggregated update projected (the server rule) before the server SGD (``server_tx``,
  replaceable). ``task_boundary`` is FedProject's step (``FedProject``); ``from_config``
  attaches it when given the model."""
  client_tx = optax.sgd(client_lr)
  if weight_decay:
    client_tx = optax.chain(optax.add_decayed_weights(weight_decay), client_tx)
  rule = orthogonal_projection(tuple(exclude), max_columns)
  local = isinstance(task_boundary, FedProject) and task_boundary.extraction == "local"
  if local:
    rule = server_rules.chain(rule, keep_previous_params())
  method = FederatedAlgorithm(
      name="fot", oracle=oracles.first_order(example_loss), client_tx=client_tx,
      server_tx=optax.sgd(server_lr), server_rule=rule,
      schedule=schedule, weighting=weighting, task_boundary=task_boundary)
  if local and task_boundary.algorithm is None:
    task_boundary.algorithm = method
  return method


# ------------------------------------------------------------------------------ GPM

def gpm(example_loss, client_lr: float, schedule: LocalSchedule = LocalSchedule(),
        exclude: Sequence[str] = (), max_columns: Optional[int] = None,
        weight_decay: float = 0.0, task_boundary: Optional[Callable] = None
        ) -> FederatedAlgorithm:
  """GPM's training steps: every local gradient projected with the broadcast bases.

  Run it with a single client holding all of a task's data (centralized); the server
  then just adopts the client's model (``sgd(1.0)``).
  """
  steps = [client_projection()]
  if weight_decay:
    steps.append(optax.add_decayed_weights(weight_decay))
  steps.append(optax.sgd(client_lr))

  def broadcast(state):
    return {"params": state.params, "bases": state.extra["bases"]}

  def client_extra_args(message_down, client_state):
    return {**default_client_extra_args(message_down, client_state),
            "bases": message_down["bases"]}

  return FederatedAlgorithm(
      name="gpm", oracle=oracles.first_order(example_loss), client_tx=optax.chain(*steps),
      server_tx=optax.sgd(1.0), schedule=schedule, weighting="num_examples",
      init_extra=lambda params: {"bases": empty_bases(params, tuple(exclude), max_columns)},
      broadcast=broadcast, client_extra_args=client_extra_args, task_boundary=task_boundary)


@dataclasses.dataclass
class GPMUpdate:
  """GPM's basis update from the pooled task data (exact residual, no masking).

  Attributes:
    apply_fn: the model's linen ``apply``.
    eps: threshold of the first task; task t uses ``eps + t * eps_inc``.
    eps_inc: per-task increment.
    samples: examples drawn from the task's training data (GPM used 300 on PMNIST).
  """
  apply_fn: Callable
  eps: float = 0.95
  eps_inc: float = 0.0
  samples: int = 300

  def __call__(self, state: ServerState, task, task_index: int, rng):
    x = np.asarray(task.train.arrays["x"])
    take = np.random.default_rng(np.asarray(rng)).permutation(x.shape[0])
    if self.samples:
      take = take[:self.samples]
    bases = state.extra["bases"]
    rows = activations.layer_input_rows(self.apply_fn, state.params, jnp.asarray(x[take]),
                                        layers=set(bases))
    eps = min(self.eps + task_index * self.eps_inc, 1.0)
    new_bases, info = {}, {"eps": eps}
    for name, basis in bases.items():
      a = rows[name]
      u = basis.u * basis.mask
      r = a - (a @ u) @ u.T
      ratio = float(jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(a), 1e-30))
      new_bases[name], _ = grow_basis(basis, r.T, ratio, eps, squared_ratio=True, min_new=0,
                                      strict=False)
      info[f"basis/{name}"] = int(np.asarray(new_bases[name].mask).sum())
    return state._replace(extra={**state.extra, "bases": new_bases}), info


# --------------------------------------------------------------------------- configs

def from_config(config, example_loss, model=None) -> FederatedAlgorithm:
  """FOT from ``config``; with ``model`` (its linen ``apply``) FedProject runs at task ends."""
  return fot(example_loss, config.client_lr, config.get("server_lr", 1.0),
             schedule_from_config(config), config.get("weighting", "uniform"),
             tuple(config.get("fot_exclude", ())), config.get("fot_max_columns", None) or None,
             config.get("weight_decay", 0.0),
             None if model is None else fedproject_from_config(config, model,
                                                               config.get("backend", "vmap")))


def gpm_from_config(config, example_loss, model=None) -> FederatedAlgorithm:
  return gpm(example_loss, config.client_lr, schedule_from_config(config),
             tuple(config.get("fot_exclude", ())), config.get("fot_max_columns", None) or None,
             config.get("weight_decay", 0.0),
             None if model is None else gpm_update_from_config(config, model))


def fedproject_from_config(config, model, backend: str = "vmap") -> FedProject:
  return FedProject(model.apply, config.get("fot_eps", 0.95), config.get("fot_eps_inc", 0.0),
                    config.get("fot_clients", 0), config.get("fot_samples", 0), backend,
                    config.get("fot_squared_ratio", False), config.get("fot_min_new", 1),
                    config.get("fot_extraction", "local"), config.get("clients_per_round", 0))


def gpm_update_from_config(config, model, backend: str = "vmap") -> GPMUpdate:
  del backend
  return GPMUpdate(model.apply, config.get("fot_eps", 0.95), config.get("fot_eps_inc", 0.0),
                   config.get("gpm_samples", 300))
