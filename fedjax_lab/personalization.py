"""Personalized FL: per-client models in the client-state table, evaluated per client.

A personalized method keeps client i's own model (or the part of it that is
personal) in its row of ``ServerState.client_states`` (on the device or in a host
table, as SCAFFOLD's control variates), starts local training from it with
``FederatedAlgorithm.init_local_params`` and says which model client i is evaluated
with through ``FederatedAlgorithm.personalize``. This module holds what the methods
share: selecting layers of a params tree, local fine-tuning, and the per-client
evaluation on each client's own held-out split with its summary metrics:

    personal_accuracy_mean   mean over clients of client i's accuracy on its test split
    personal_accuracy_p10    10th percentile of those accuracies (the worse-off clients)
    personal_loss_mean, _p10, _p90  the per-client losses' mean and percentiles (p90: the
                             worse-off clients); next-token tasks score per target token
    participation_gap        (Yuan et al., "What Do We Mean by Generalization in Federated
                             Learning?", ICLR 2022): the global model's mean accuracy on the
                             participating clients' test splits minus its mean accuracy on
                             held-out clients that never trained
"""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fedjax_lab import client as client_lib
from fedjax_lab.data.federated import FederatedData, gather_cohort
from fedjax_lab.models import text as text_models
from fedjax_lab.transforms import GradientOracle, as_extra_args
from fedjax_lab.types import Params, PyTree

# ``(global_params, client_state, train_data, size, rng) -> params`` (FederatedAlgorithm.personalize).
Personalize = Callable[[Params, PyTree, dict, jax.Array, jax.Array], Params]


def _is_personal(path: tuple, names: Sequence[str]) -> bool:
  return any(str(key) in names for key in path)


def layer_mask(params: Params, names: Sequence[str]) -> PyTree:
  """Bool tree like ``params``: True for leaves under a key in ``names`` (e.g. ``'Dense_1'``)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: _is_personal(p, names) for p in flat})


def take_layers(params: Params, names: Sequence[str]) -> Params:
  """The sub-tree of ``params`` under the keys ``names`` (a nested dict)."""
  flat = traverse_util.flatten_dict(params)
  part = {p: v for p, v in flat.items() if _is_personal(p, names)}
  if not part:
    keys = sorted({"/".join(map(str, p)) for p in flat})
    raise ValueError(f"no parameter lies under any of the layers {list(names)}; the "
                     f"params' paths are: {', '.join(keys)}.")
  return traverse_util.unflatten_dict(part)


def put_layers(params: Params, part: Params) -> Params:
  """``params`` with the leaves of ``part`` (from ``take_layers``) put in their place."""
  flat = traverse_util.flatten_dict(params)
  flat.update(traverse_util.flatten_dict(part))
  return traverse_util.unflatten_dict(flat)


def zero_layers(tree: PyTree, names: Sequence[str]) -> PyTree:
  """``tree`` with the leaves under ``names`` set to zero (a delta that keeps them local)."""
  mask = layer_mask(tree, names)
  return jax.tree.map(lambda m, x: jnp.zeros_like(x) if m else x, mask, tree)


def last_layer(params: Params) -> str:
  """Name of the last flax layer (largest ``_<index>``, e.g. ``'Dense_1'``): the head."""
  inner = params.get("params", params)
  def index(name):
    tail = str(name).rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1
  return max(inner, key=index)


def local_finetuning(oracle: GradientOracle, tx: optax.GradientTransformation,
                     schedule: client_lib.LocalSchedule) -> Personalize:
  """``personalize`` that fine-tunes the global model on the client's train split.

  Client i's model is ``local_train(global_params, its train split)`` with ``tx`` and
  ``schedule`` (the FedAvg + fine-tuning baseline of Wang et al. 2019, "Federated
  Evaluation of On-device Personalization", and Yu et al. 2020).
  """
  tx = as_extra_args(tx)

  def personalize(global_params, client_state, data, size, rng):
    del client_state
    max_examples = jax.tree.leaves(data)[0].shape[0]
    local = client_lib.local_train(oracle, tx, schedule, global_params, data, size, rng,
                                   {"global_params": global_params}, max_examples)
    return local.params

  return personalize


TASKS = ("classification", "next_token")


def _sums(logits, y, rows, task):
  """Correct predictions, summed loss and the count of scored targets of one client."""
  if task == "classification":
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return (jnp.sum((jnp.argmax(logits, -1) == y) & rows), jnp.sum(jnp.where(rows, loss, 0.0)),
            jnp.sum(rows))
  losses, targets = text_models.token_losses(logits, y)   # y [n, L]: per token, PAD unscored
  targets = targets & rows[:, None]
  return (jnp.sum((jnp.argmax(logits, -1) == y) & targets),
          jnp.sum(jnp.where(targets, losses, 0.0)), jnp.sum(targets))


def evaluate_clients(apply_fn: Callable, personalize: Optional[Personalize], params: Params,
                     client_states: PyTree, train: FederatedData, test: FederatedData,
                     rng: jax.Array, batch_size: int = 16, task: str = "classification") -> dict:
  """Each client's model on its own test split.

  Client i is evaluated with ``personalize(params, client_states[i], train_i, n_i, key_i)``
  (None: the global ``params``) on ``test_i``: classification (``y [n]``: accuracy and
  loss per example) or ``'next_token'`` (``y [n, L]``: per non-PAD target token).

  Args:
    apply_fn: ``(params, x) -> logits`` (``Model.apply``).
    personalize: the method's ``FederatedAlgorithm.personalize``, or None.
    params: the global model.
    client_states: the table ``[N, ...]`` (device or host leaves), or ``()``.
    train, test: the clients' train and test splits, both of ``N`` clients.
    rng: key; client i's is ``fold_in(rng, i)``.
    batch_size: clients evaluated at once.

  Returns:
    numpy ``{'accuracy' [N], 'loss' [N], 'num_examples' [N]}`` (accuracy and loss 0
    for clients without test examples; for next-token, ``num_examples`` counts tokens).
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
  if train.num_clients != test.num_clients:
    raise ValueError(f"train has {train.num_clients} clients but test has {test.num_clients}; "
                     f"they must be the same clients' splits.")
  num = test.num_clients
  tr_arrays, tr_offsets = train.device_arrays()
  te_arrays, te_offsets = test.device_arrays()
  max_train, max_test = max(train.max_client_size, 1), max(test.max_client_size, 1)
  table = jax.tree.map(jnp.asarray, client_states)

  @jax.jit
  def run(params, table, tr_arrays, tr_offsets, te_arrays, te_offsets, rng):
    def one(i):
      ids = i[None]
      data, size = gather_cohort(tr_arrays, tr_offsets, ids, max_train)
      data = {k: v[0] for k, v in data.items()}
      model = params
      if personalize is not None:
        row = jax.tree.map(lambda t: t[i], table)
        model = personalize(params, row, data, size[0], jax.random.fold_in(rng, i))
      tdata, tsize = gather_cohort(te_arrays, te_offsets, ids, max_test)
      logits = apply_fn(model, tdata["x"][0])
      correct, loss, count = _sums(logits, tdata["y"][0], jnp.arange(max_test) < tsize[0], task)
      return {"correct": correct, "loss": loss, "count": count}
    return jax.lax.map(one, jnp.arange(num), batch_size=batch_size)

  sums = jax.tree.map(np.asarray, run(params, table, tr_arrays, tr_offsets, te_arrays,
                                      te_offsets, rng))
  count = sums["count"].astype(np.int64)
  denominator = np.maximum(count, 1)
  return {"accuracy": sums["correct"] / denominator, "loss": sums["loss"] / denominator,
          "num_examples": count}


def summarize(per_client: dict, prefix: str = "personal_") -> dict:
  """``{prefix}accuracy_mean``, ``{prefix}accuracy_p10``, ``{prefix}loss_mean`` and the
  loss's 10th and 90th percentiles (``loss_p90``: the worse-off clients) over the clients
  that have test examples (unweighted: every client counts once)."""
  has = per_client["num_examples"] > 0
  if not np.any(has):
    raise ValueError("no client has test examples; raise client_test_fraction.")
  acc = per_client["accuracy"][has]
  return {f"{prefix}accuracy_mean": float(np.mean(acc)),
          f"{prefix}accuracy_p10": float(np.percentile(acc, 10)),
          f"{prefix}loss_mean": float(np.mean(per_client["loss"][has])),
          f"{prefix}loss_p10": float(np.percentile(per_client["loss"][has], 10)),
          f"{prefix}loss_p90": float(np.percentile(per_client["loss"][has], 90))}


def participation_gap(apply_fn: Callable, params: Params, train: FederatedData,
                      test: FederatedData, held_out_train: FederatedData,
                      held_out_test: FederatedData) -> dict:
  """The global model's participation gap (Yuan et al. 2022, Sec. 3).

  Mean per-client accuracy of ``params`` on the participating clients' test splits
  minus that on the held-out clients' examples (their train and test splits both:
  they never trained). Returns ``participating_accuracy``, ``held_out_accuracy`` and
  ``participation_gap``.
  """
  rng = jax.random.PRNGKey(0)   # the global model needs no key
  inside = summarize(evaluate_clients(apply_fn, None, params, (), train, test, rng), "g_")
  everything = _concatenate_clients(held_out_train, held_out_test)
  outside = summarize(evaluate_clients(apply_fn, None, params, (), everything, everything, rng),
                      "g_")
  a, b = inside["g_accuracy_mean"], outside["g_accuracy_mean"]
  return {"participating_accuracy": a, "held_out_accuracy": b, "participation_gap": a - b}


def _concatenate_clients(first: FederatedData, second: FederatedData) -> FederatedData:
  """Client i's rows of ``first`` then of ``second``, for the same N clients."""
  if first.num_clients != second.num_clients:
    raise ValueError(f"{first.num_clients} clients vs {second.num_clients}.")
  ids = np.concatenate([np.repeat(np.arange(first.num_clients), first.client_sizes),
                        np.repeat(np.arange(second.num_clients), second.client_sizes)])
  arrays = {k: np.concatenate([first.arrays[k], second.arrays[k]]) for k in first.arrays}
  return FederatedData.from_client_ids(arrays, ids, first.num_clients)
