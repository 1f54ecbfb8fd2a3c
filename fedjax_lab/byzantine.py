"""Byzantine (adversarial) clients as wrappers of a ``FederatedAlgorithm``.

A reproducible set of clients, chosen by client id from a seed
(``malicious_clients``), misbehaves whenever it is sampled. The attacks:

====================  =====================================================  ==============
attack                what a malicious client sends                           ``scale``
====================  =====================================================  ==============
``sign_flip``         ``-s * delta``  (a plain flip, s=1, only shrinks the    s (1)
                      mean; s=10 with 20% of clients reverses it)
``scale``             ``s * delta`` (boosting, model replacement)            s (10)
``gaussian``          ``s * xi``, ``xi ~ N(0, I)`` (Blanchard et al. 2017)    s (1)
``free_rider``        zeros (no training contributed)                        --
``free_rider_noise``  ``U[-s, s]`` per coordinate (disguised free rider,     s (1)
                      Lin et al. 2019; RFFL's free rider)
``label_flip``        an honest update on poisoned labels ``K - 1 - y``       --
                      (data poisoning, Fang et al. 2020)
``alie``              ``mu - z * sigma`` per coordinate, the same for all     z (from n, f)
                      malicious clients ("A Little Is Enough", Baruch,
                      Baruch, Goldberg, NeurIPS 2019)
====================  =====================================================  ==============

How they plug in without engine changes:

* ``with_client_tags`` returns a ``TaggedAlgorithm`` (a ``FederatedAlgorithm``
  subclass whose ``init`` knows the population size) that keeps, per client,
  ``{'tags': {'client_id', 'malicious', ...}, 'inner': the method's own state}``.
  The round gathers the cohort's rows, so each client sees its own id and flag;
  every hook of the method still receives its own state only.
* Update attacks wrap ``client_final``: the honest message is computed, then the
  floating-point leaves of a malicious client's message are replaced. Their
  randomness comes from ``fold_in(round key, client id)``, added to the broadcast.
* ``label_flip`` wraps the oracle; the flag reaches it through ``init_oracle_state``.
* ``alie`` needs the other clients' updates: malicious clients tag their message
  (``MALICIOUS_KEY``) and a wrapper around the aggregator replaces their rows by
  ``mu - z sigma`` of the cohort's honest updates (an omniscient, colluding
  attacker) before the real aggregator runs; the tag never reaches it.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import hyperparams
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from fedjax_lab.transforms import Aggregator, GradientOracle, as_collectives

ATTACKS = ("none", "sign_flip", "scale", "gaussian", "free_rider", "free_rider_noise",
           "label_flip", "alie")
DEFAULT_SCALE = {"sign_flip": 1.0, "scale": 10.0, "gaussian": 1.0, "free_rider_noise": 1.0}
ATTACK_KEY = "attack_key"          # added to the broadcast message
MALICIOUS_KEY = "_malicious"       # message tag read (and removed) by the ALIE aggregator
_ATTACK_SALT = 0x0B1A5ED


# ---------------------------------------------------------------------------
# Client identity: tags in the per-client state.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaggedAlgorithm(FederatedAlgorithm):
  """A method whose per-client state carries tags ``[N]`` known at ``init``.

  Attributes:
    client_tags: ``((name, num_clients -> array [N]), ...)``; ``client_id`` is
      always added (``arange(N)``). Hooks of the wrapped method see only
      ``state['inner']``.
  """
  client_tags: tuple = ()

  def init(self, params, rng, num_clients: int) -> ServerState:
    state = super().init(params, rng, num_clients)
    tags = {"client_id": jnp.arange(num_clients, dtype=jnp.int32)}
    for name, make in self.client_tags:
      tags[name] = jnp.asarray(make(num_clients))
      if tags[name].shape[:1] != (num_clients,):
        raise ValueError(f"Client tag {name!r} must have a leading axis of {num_clients} "
                         f"clients, got shape {tags[name].shape}.")
    return state._replace(client_states={**state.client_states, "tags": tags})


def _tag_template(client_tags):
  # Per-client placeholder (overwritten by TaggedAlgorithm.init) of the right dtype.
  tags = {"client_id": jnp.zeros((), jnp.int32)}
  for name, make in client_tags:
    tags[name] = jnp.zeros_like(jnp.asarray(make(1))[0])
  return tags


def with_client_tags(method: FederatedAlgorithm, **tags: Callable[[int], np.ndarray]
                     ) -> TaggedAlgorithm:
  """``method`` with per-client tags (``client_id`` plus ``tags``) in its client state.

  Args:
    method: any federated algorithm (a ``TaggedAlgorithm`` gets the tags merged).
    **tags: name -> ``num_clients -> array [num_clients, ...]``.
  """
  if isinstance(method, TaggedAlgorithm):
    merged = dict(method.client_tags)
    merged.update(tags)
    merged = tuple(merged.items())
    init_inner = method.init_client_state
    return dataclasses.replace(
        method, client_tags=merged,
        init_client_state=lambda params: {"tags": _tag_template(merged),
                                          "inner": init_inner(params)["inner"]})
  if type(method) is not FederatedAlgorithm:
    raise ValueError(f"with_client_tags wraps plain FederatedAlgorithm instances; got a "
                     f"{type(method).__name__}, whose overridden methods would be lost.")
  client_tags = tuple(tags.items())
  inner_init = method.init_client_state
  inner_extra = method.client_extra_args
  inner_oracle_state = method.init_oracle_state
  inner_final = method.client_final

  def init_client_state(params):
    return {"tags": _tag_template(client_tags),
            "inner": () if inner_init is None else inner_init(params)}

  def client_extra_args(message_down, client_state):
    return inner_extra(message_down, client_state["inner"])

  def init_oracle_state(message_down, client_state):
    if inner_oracle_state is None:
      return None
    return inner_oracle_state(message_down, client_state["inner"])

  def client_final(local, message_down, client_state):
    message_up, inner = inner_final(local, message_down, client_state["inner"])
    return message_up, {"tags": client_state["tags"], "inner": inner}

  fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(FederatedAlgorithm)}
  fields.update(init_client_state=init_client_state, client_extra_args=client_extra_args,
                init_oracle_state=init_oracle_state, client_final=client_final)
  return TaggedAlgorithm(**fields, client_tags=client_tags)


def malicious_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
  """bool ``[num_clients]``: ``round(fraction * num_clients)`` clients chosen by ``seed``.

  The set depends only on (num_clients, fraction, seed); a larger fraction with the
  same seed contains the smaller one's clients.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"malicious_fraction must be in [0, 1], got {fraction}.")
  count = int(round(fraction * num_clients))
  order = np.random.default_rng(seed).permutation(num_clients)
  mask = np.zeros(num_clients, bool)
  mask[order[:count]] = True
  return mask


# ---------------------------------------------------------------------------
# Update attacks: formulas on one client's message.
# ---------------------------------------------------------------------------


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _map_float(fn, tree, *rest):
  return jax.tree.map(lambda x, *r: fn(x, *r) if _is_float(x) else x, tree, *rest)


def _leaf_noise(tree, key, sample):
  """``sample(key_i, shape, dtype)`` for each float leaf ``i`` of ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  out = [sample(jax.random.fold_in(key, i), jnp.shape(x), jnp.asarray(x).dtype)
         if _is_float(x) else x for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, out)


def attacked_message(kind: str, message, key: jax.Array, scale: Optional[float] = None):
  """The message a malicious client of attack ``kind`` sends instead of ``message``.

  Args:
    kind: an update attack (``sign_flip``, ``scale``, ``gaussian``, ``free_rider``,
      ``free_rider_noise``); ``label_flip`` and ``alie`` return ``message``.
    message: the honest message pytree of one client.
    key: PRNG key of this client and round (noise attacks).
    scale: the attack's strength (see the module table); None: its default. A number
      or a scalar array.
  """
  _check_kind(kind)
  if scale is None:
    s = DEFAULT_SCALE.get(kind, 1.0)
  else:
    s = float(scale) if hyperparams.is_concrete(scale) else scale
  if kind == "sign_flip":
    return _map_float(lambda x: (-s * x).astype(x.dtype), message)
  if kind == "scale":
    return _map_float(lambda x: (s * x).astype(x.dtype), message)
  if kind == "gaussian":
    return _leaf_noise(message, key, lambda k, shape, dt: s * jax.random.normal(k, shape, dt))
  if kind == "free_rider":
    return _map_float(jnp.zeros_like, message)
  if kind == "free_rider_noise":
    return _leaf_noise(message, key,
                       lambda k, shape, dt: jax.random.uniform(k, shape, dt, -s, s))
  return message


def flip_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """Label flipping ``y -> K - 1 - y`` (data poisoning)."""
  return (num_classes - 1 - labels).astype(labels.dtype)


def alie_z(num_clients: jax.Array, num_malicious: jax.Array) -> jax.Array:
  """Baruch et al. (2019), Algorithm 3: ``s = floor(n/2 + 1) - f``, ``z = Phi^-1((n - s) / n)``."""
  n = jnp.asarray(num_clients, jnp.float32)
  s = jnp.floor(n / 2 + 1) - num_malicious
  return jax.scipy.special.ndtri(jnp.clip((n - s) / jnp.maximum(n, 1.0), 1e-6, 1 - 1e-6))


def alie_aggregator(inner: Aggregator, z: Optional[float] = None) -> Aggregator:
  """Runs ``inner`` after replacing tagged rows by ``mu - z sigma`` ("A Little Is Enough").

  ``mu`` and ``sigma`` are the coordinate-wise mean and standard deviation of the
  honest updates of every valid client (malicious ones compute theirs honestly
  first), so all malicious clients send the same crafted message. ``z`` None uses
  ``alie_z(n, f)`` for the round's valid and malicious counts. Sums cross placements
  with ``collectives.sum``.
  """
  def update(messages, weights, state, collectives=None):
    if not isinstance(messages, dict) or MALICIOUS_KEY not in messages:
      raise ValueError("alie_aggregator needs messages tagged by with_attack(kind='alie').")
    messages = dict(messages)
    flag = messages.pop(MALICIOUS_KEY)
    valid = (weights > 0).astype(jnp.float32)
    bad = valid * flag.astype(jnp.float32)

    total = as_collectives(collectives).sum

    count = jnp.maximum(total(jnp.sum(valid)), 1.0)
    expand = lambda v, x: v.reshape(v.shape + (1,) * (x.ndim - 1))
    mean = jax.tree.map(lambda x: total(jnp.sum(expand(valid, x) * x, 0)) / count, messages)
    std = jax.tree.map(
        lambda x, mu: jnp.sqrt(total(jnp.sum(expand(valid, x) * (x - mu) ** 2, 0)) / count),
        messages, mean)
    zz = alie_z(count, total(jnp.sum(bad))) if z is None else z
    crafted = jax.tree.map(lambda mu, sd: mu - zz * sd, mean, std)
    messages = jax.tree.map(
        lambda x, c: jnp.where(expand(bad, x) > 0, c[None].astype(x.dtype), x) if _is_float(x) else x,
        messages, crafted)
    return inner.update(messages, weights, state, collectives)

  return Aggregator(init=inner.init, update=update)


def _check_kind(kind):
  if kind not in ATTACKS:
    raise ValueError(f"Unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}.")


# ---------------------------------------------------------------------------
# The wrapper.
# ---------------------------------------------------------------------------


def _flag_oracle(oracle: GradientOracle, num_classes: int) -> GradientOracle:
  """Oracle whose state ``{'flip', 'inner'}`` says whether to poison the labels."""
  def init(params):
    return {"flip": jnp.zeros((), bool), "inner": oracle.init(params)}

  def update(params, batch, rng, state):
    if "y" not in batch:
      raise ValueError("label_flip needs integer labels under the batch key 'y'.")
    batch = {**batch, "y": jnp.where(state["flip"], flip_labels(batch["y"], num_classes),
                                     batch["y"])}
    grads, aux, inner = oracle.update(params, batch, rng, state["inner"])
    return grads, aux, {"flip": state["flip"], "inner": inner}

  return GradientOracle(init=init, update=update)


def with_attack(method: FederatedAlgorithm, kind: str, fraction: float,
                scale: Optional[float] = None, seed: int = 0, num_classes: int = 10
                ) -> FederatedAlgorithm:
  """``method`` with ``fraction`` of the population (by id, from ``seed``) malicious.

  Args:
    method: any federated algorithm.
    kind: one of ``ATTACKS``.
    fraction: share of clients that are malicious, in ``[0, 1]``; a Python number
      (it fixes the malicious set when the method is built).
    scale: the attack's strength (module table), a number or a scalar array; None:
      its default.
    seed: chooses the malicious set (``malicious_clients``).
    num_classes: label count for ``label_flip``.

  Returns:
    A ``TaggedAlgorithm``; ``state.client_states['tags']['malicious']`` is the set.
  """
  _check_kind(kind)
  malicious_clients(1, fraction, seed)   # validates fraction
  if kind == "none" or fraction == 0:
    return method
  if kind == "label_flip" and num_classes < 2:
    raise ValueError(f"label_flip needs num_classes >= 2, got {num_classes}.")
  method = with_client_tags(method, malicious=lambda n: malicious_clients(n, fraction, seed))
  inner_broadcast = method.broadcast
  inner_final = method.client_final

  def broadcast(state):
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _ATTACK_SALT), state.round)
    return {**inner_broadcast(state), ATTACK_KEY: key}

  if kind == "label_flip":
    inner_oracle_state = method.init_oracle_state

    def init_oracle_state(message_down, client_state):
      inner = inner_oracle_state(message_down, client_state)
      if inner is None:
        inner = method.oracle.init(message_down["params"])
      return {"flip": client_state["tags"]["malicious"], "inner": inner}

    def client_final(local, message_down, client_state):
      local = local._replace(oracle_state=local.oracle_state["inner"])
      return inner_final(local, message_down, client_state)

    return dataclasses.replace(method, oracle=_flag_oracle(method.oracle, num_classes),
                               init_oracle_state=init_oracle_state, client_final=client_final)

  if kind == "alie":
    def client_final(local, message_down, client_state):
      message_up, client_state = inner_final(local, message_down, client_state)
      if not isinstance(message_up, dict):
        raise ValueError("The alie attack needs dict messages (e.g. {'delta': ...}).")
      return {**message_up, MALICIOUS_KEY: client_state["tags"]["malicious"]}, client_state

    return dataclasses.replace(method, client_final=client_final,
                               aggregator=alie_aggregator(method.aggregator, scale))

  def client_final(local, message_down, client_state):
    message_up, new_state = inner_final(local, message_down, client_state)
    tags = client_state["tags"]
    key = jax.random.fold_in(message_down[ATTACK_KEY], tags["client_id"])
    bad = attacked_message(kind, message_up, key, scale)
    message_up = jax.tree.map(lambda b, h: jnp.where(tags["malicious"], b, h), bad, message_up)
    return message_up, new_state

  return dataclasses.replace(method, broadcast=broadcast, client_final=client_final)
