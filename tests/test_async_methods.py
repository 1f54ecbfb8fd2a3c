"""FedAMD and AFA-CD under the clock against plain numpy / heapq references, and the
clock's client training on the loop, vmap and sharded backends."""
import heapq

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import client as client_lib
from fedjax_lab import oracles, parallel
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.asynchronous import anchor, clock, methods, system as system_lib
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import gather_cohort
from tests.reference import linear_example_loss, linear_grad, linear_problem, to_numpy

SIZES = [3, 4, 5, 2, 6, 3, 4]
STEP_S = np.array([1.0, 2.0, 1.0, 2.0, 1.0, 3.0, 0.5], np.float32)
COMM_S = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0], np.float32)
LR, BATCH, EPOCHS = 0.1, 2, 2


def _problem(server_lr=1.0):
  data, params = linear_problem(SIZES, dim=3)
  alg = FederatedAlgorithm(
      "fedavg", oracles.first_order(linear_example_loss), optax.sgd(LR), optax.sgd(server_lr),
      LocalSchedule(batch_size=BATCH, epochs=EPOCHS, shuffle=False), weighting="uniform")
  system = system_lib.SystemModel(jnp.asarray(STEP_S), jnp.asarray(COMM_S))
  return data, params, alg, system


def _batches(x, y, max_steps=None):
  """The unshuffled batches of EPOCHS epochs (at most ``max_steps`` of them)."""
  out = [(x[lo:lo + BATCH], y[lo:lo + BATCH]) for _ in range(EPOCHS)
         for lo in range(0, len(y), BATCH)]
  return out if max_steps is None else out[:max_steps]


def _draw(rng, tag, n):
  return jax.random.fold_in(jax.random.fold_in(rng, tag), n)


def _run(alg, data, system, spec, params, rng, steps, backend="vmap"):
  run = clock.make_async(alg, data, system, spec, backend=backend)
  arrays, offsets = data.device_arrays()
  state = jax.jit(run.init)(params, rng, arrays, offsets)
  step = jax.jit(run.step_with_arrivals)
  log = []
  for _ in range(steps):
    state, metrics, arrivals = step(state, arrays, offsets)
    log.append([(int(c), int(tau), float(t), int(k)) for ok, c, tau, t, k in zip(
        *(np.asarray(a) for a in (arrivals.valid, arrivals.client, arrivals.staleness,
                                  arrivals.finish, arrivals.steps))) if ok])
  return log, state, metrics


def test_fedamd_matches_numpy_anchor_sampling():
  data, params, alg, system = _problem()
  rng, n, m, p, rounds = jax.random.PRNGKey(4), data.num_clients, 3, 0.5, 4
  amd, spec = methods.fedamd(alg, concurrency=m, anchor_prob=p)
  log, state, _ = _run(amd, data, system, spec, params, rng, rounds)

  x = to_numpy(params)
  clients = [data.client(i) for i in range(n)]
  table = [linear_grad(x, c["x"], c["y"]) for c in clients]     # anchors at x_0
  groups = []
  for t in range(rounds):
    v = {k: np.mean([g[k] for g in table], axis=0) for k in x}
    chosen, deltas = [], []
    for slot in range(m):
      counter = t * m + slot
      u = np.asarray(jax.random.uniform(_draw(rng, 1, counter), (n,)))
      i = max((j for j in range(n) if j not in chosen), key=lambda j: u[j])
      chosen.append(i)
      key = _draw(rng, 3, counter)
      if bool(jax.random.bernoulli(jax.random.fold_in(key, anchor._ANCHOR_COIN), p)):
        table[i] = linear_grad(x, clients[i]["x"], clients[i]["y"])
        groups.append("anchor")
        continue
      groups.append("miner")
      y, previous, d = dict(x), dict(x), dict(v)       # SARAH from v, Algorithm 1
      for k, (bx, by) in enumerate(_batches(clients[i]["x"], clients[i]["y"])):
        if k:
          g, h = linear_grad(y, bx, by), linear_grad(previous, bx, by)
          d = {q: d[q] + g[q] - h[q] for q in x}
        previous, y = y, {q: y[q] - LR * d[q] for q in x}
      deltas.append({q: y[q] - x[q] for q in x})
    assert sorted(c for c, *_ in log[t]) == sorted(chosen)
    if deltas:
      x = {q: x[q] + np.mean([dl[q] for dl in deltas], axis=0) for q in x}
  assert {"anchor", "miner"} <= set(groups)
  for q in x:
    np.testing.assert_allclose(np.asarray(state.params[q]), x[q], atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.client_states[q]),
                               np.stack([g[q] for g in table]), atol=1e-5)
  with pytest.raises(ValueError, match="anchor probability"):
    methods.fedamd(alg, 3, anchor_prob=1.5)


def test_afa_cd_matches_a_heapq_simulation_with_clients_own_steps():
  data, params, alg, system = _problem(server_lr=2.0)
  rng, n, m, buffer, updates = jax.random.PRNGKey(7), data.num_clients, 3, 2, 8
  afa, spec = methods.afa_cd(alg, concurrency=m, buffer_size=buffer, min_steps=1, max_steps=5)
  log, state, _ = _run(afa, data, system, spec, params, rng, updates)

  clients = [data.client(i) for i in range(n)]
  x, version, dispatched, in_flight, heap, ref_log = to_numpy(params), 0, 0, set(), [], []

  def dispatch(t):
    nonlocal dispatched
    u = np.asarray(jax.random.uniform(_draw(rng, 1, dispatched), (n,)))
    i = max((j for j in range(n) if j not in in_flight), key=lambda j: u[j])
    own = int(jax.random.randint(_draw(rng, 4, dispatched), (), 1, 6))     # the client's K
    batches = _batches(clients[i]["x"], clients[i]["y"])
    steps = min(own, len(batches))
    y = dict(x)
    for bx, by in batches[:steps]:
      g = linear_grad(y, bx, by)
      y = {q: y[q] - LR * g[q] for q in x}
    finish = np.float32(t) + (COMM_S[i] + np.float32(steps) * STEP_S[i])
    heapq.heappush(heap, (finish, i, version, steps, {q: y[q] - x[q] for q in x}))
    in_flight.add(i)
    dispatched += 1

  for _ in range(m):
    dispatch(0.0)
  for _ in range(updates):
    got = []
    for _ in range(buffer):
      finish, i, downloaded, steps, delta = heapq.heappop(heap)
      in_flight.discard(i)
      ref_log.append((i, version - downloaded, float(finish), steps))
      got.append({q: delta[q] / steps for q in x})          # Delta_i / K_i
      dispatch(finish)
    x = {q: x[q] + 2.0 * np.mean([g[q] for g in got], axis=0) for q in x}
    version += 1
  assert [a for step in log for a in step] == ref_log
  assert len({k for *_, k in ref_log}) > 2 and max(tau for _, tau, _, _ in ref_log) >= 1
  for q in x:
    np.testing.assert_allclose(np.asarray(state.params[q]), x[q], atol=1e-5)
  with pytest.raises(ValueError, match="min_steps <= max_steps"):
    methods.afa_cd(alg, 3, min_steps=4, max_steps=2)


def test_step_limit_counts_real_steps_across_epochs():
  # Client 3 has 2 examples of max 6: one real step then two empty ones per epoch.
  data, params, alg, system = _problem()
  arrays, offsets = data.device_arrays()
  cohort, sizes = gather_cohort(arrays, offsets, jnp.array([3]), int(data.max_client_size))
  one = jax.tree.map(lambda a: a[0], cohort)
  limited = client_lib.local_train(
      alg.oracle, alg.client_tx, alg.schedule, params, one, sizes[0], jax.random.PRNGKey(0), {},
      int(data.max_client_size), step_limit=jnp.int32(2))
  assert int(limited.num_steps) == 2
  # Both epochs' single batch: two SGD steps on examples 0-1 of client 3.
  x, y = data.client(3)["x"], data.client(3)["y"]
  w = to_numpy(params)
  for _ in range(2):
    g = linear_grad(w, x, y)
    w = {q: w[q] - LR * g[q] for q in w}
  for q in w:
    np.testing.assert_allclose(np.asarray(limited.params[q]), w[q], atol=1e-6)


@pytest.mark.parametrize("method", ["fedbuff", pytest.param("fedamd", marks=pytest.mark.slow)])
def test_clock_backends_agree(method):
  """loop, vmap and sharded (8 forced CPU devices, as conftest sets) give one run."""
  assert jax.device_count() == 8
  data, params, alg, system = _problem()
  rng = jax.random.PRNGKey(2)
  if method == "fedbuff":
    alg, spec = methods.fedbuff(alg, concurrency=3, buffer_size=2)
  else:
    alg, spec = methods.fedamd(alg, concurrency=3, anchor_prob=0.5)
  (log0, state0, metrics0), *others = [
      _run(alg, data, system, spec, params, rng, 2, backend)
      for backend in ("vmap", parallel.LoopBackend(), parallel.ShardedBackend())]
  for log, state, metrics in others:
    assert log == log0
    for q in state0.params:
      np.testing.assert_allclose(np.asarray(state.params[q]), np.asarray(state0.params[q]),
                                 atol=1e-6)
    np.testing.assert_allclose(float(metrics["train_loss"]), float(metrics0["train_loss"]),
                               rtol=1e-5)
