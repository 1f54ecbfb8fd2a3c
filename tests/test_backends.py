"""Backends as objects: names and objects agree, the varying-axes check catches an
aggregator that forgets its collective, and the loop backend names what failed."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms.fedavg import fedavg
from fedjax_lab import aggregate, parallel
from fedjax_lab.algorithm import make_multi_round, make_round, sample_cohort
from fedjax_lab.client import LocalSchedule
from fedjax_lab.parallel import ForEachClientError, LoopBackend, ShardedBackend, VmapBackend
from fedjax_lab.transforms import LOCAL_COLLECTIVES, Aggregator, SumStream, as_collectives
from reference import linear_example_loss, linear_problem, tree_close

SIZES = (5, 3, 7, 2, 9, 4, 6)
SCHEDULE = LocalSchedule(batch_size=2, epochs=2)


def rounds(backend, rounds=2, cohort=5):
  data, params = linear_problem(SIZES, seed=1)
  method = fedavg(linear_example_loss, 0.05, 1.0, SCHEDULE)
  run = make_multi_round(make_round(method, data, cohort, backend), backend)
  state = method.init(params, jax.random.PRNGKey(3), data.num_clients)
  arrays, offsets = data.device_arrays()
  return run(state, arrays, offsets, rounds)


def test_names_give_backend_objects_and_both_run_the_same_rounds():
  assert parallel.BACKENDS == ("loop", "vmap", "sharded")
  objects = {"loop": LoopBackend(), "vmap": VmapBackend(), "sharded": ShardedBackend()}
  for name, backend in objects.items():
    assert parallel.get_backend(name) == backend and backend.name == name
    assert hash(parallel.get_backend(name)) == hash(backend)
    assert parallel.get_backend(backend) is backend
  assert [b.compiled for b in objects.values()] == [False, True, True]
  assert LoopBackend(jit=False) != LoopBackend()
  assert ShardedBackend(check_local_vma=True) != ShardedBackend()
  three = parallel.client_mesh(jax.devices()[:3])
  assert parallel.get_backend("sharded", three) == ShardedBackend(three)
  assert ShardedBackend(three).padded_cohort_size(5) == 6
  assert ShardedBackend().padded_cohort_size(5) == 8 == parallel.padded_cohort_size(5, "sharded")
  assert VmapBackend().padded_cohort_size(5) == 5 == LoopBackend().padded_cohort_size(5)

  reference, reference_metrics = rounds("vmap")
  for backend in [*objects.values(), ShardedBackend(three)]:
    state, metrics = rounds(backend)
    tree_close(state.params, reference.params, atol=1e-5)
    np.testing.assert_allclose(metrics["train_loss"], reference_metrics["train_loss"], rtol=1e-5)


def test_unknown_names_and_misplaced_meshes_are_named():
  with pytest.raises(ValueError, match="Unknown backend 'pmapp'; choose one of loop, vmap, sharded"):
    parallel.get_backend("pmapp")
  with pytest.raises(ValueError, match="Unknown backend 3"):
    parallel.validate_backend(3)
  with pytest.raises(ValueError, match=r"ShardedBackend\(mesh\)"):
    parallel.get_backend(VmapBackend(), parallel.client_mesh())
  with pytest.raises(ValueError, match="axis 'clients'"):
    ShardedBackend(jax.sharding.Mesh(np.array(jax.devices()), ("data",)))


def test_collectives_are_the_identity_locally_and_axis_names_are_refused():
  tree = {"a": jnp.arange(3.0)}
  assert as_collectives(None) is LOCAL_COLLECTIVES
  assert LOCAL_COLLECTIVES.sum(tree) is tree and LOCAL_COLLECTIVES.gather(tree) is tree
  assert VmapBackend().collectives is LOCAL_COLLECTIVES is LoopBackend().collectives
  with pytest.raises(TypeError, match="no longer take a mesh axis name"):
    aggregate.weighted_mean().update(tree, jnp.ones(3), (), "clients")


# ------------------------------------------------ sharded: the varying-axes check is on


def _mean_without_sum(messages, weights, state, collectives=None):
  """Broken on purpose: this placement's mean, never summed over placements."""
  del collectives
  total = jax.tree.map(lambda m: jnp.tensordot(weights, m, axes=1), messages)
  return jax.tree.map(lambda t: t / jnp.maximum(jnp.sum(weights), 1e-12), total), state


def _mean_with_sum(messages, weights, state, collectives=None):
  total = jax.tree.map(lambda m: jnp.tensordot(weights, m, axes=1), messages)
  total, weight = as_collectives(collectives).sum((total, jnp.sum(weights)))
  return jax.tree.map(lambda t: t / jnp.maximum(weight, 1e-12), total), state


def _median_without_gather(messages, weights, state, collectives=None):
  del weights, collectives
  return jax.tree.map(lambda m: jnp.median(m, axis=0), messages), state


def _mapped(aggregator, backend, chunk_size=None, count=16):
  rng = np.random.default_rng(0)
  messages = {"w": jnp.asarray(rng.normal(size=(count, 3)), jnp.float32)}
  weights = jnp.asarray(rng.uniform(1, 2, size=count), jnp.float32)
  client_fn = lambda shared, one: (one[0], one[1], {})
  mapper = jax.jit(parallel.make_mapper(client_fn, aggregator, backend, chunk_size=chunk_size))
  aggregate_, _, _ = mapper((), (messages, weights), aggregator.init())
  return aggregate_["w"]


def test_an_aggregator_that_forgets_its_collective_fails_on_sharded():
  broken = Aggregator(init=lambda: (), update=_mean_without_sum)
  fixed = Aggregator(init=lambda: (), update=_mean_with_sum)
  expected = _mapped(aggregate.weighted_mean(), "vmap")
  # On one device the forgotten sum is invisible ...
  np.testing.assert_allclose(_mapped(broken, "vmap"), expected, rtol=1e-6)
  # ... on eight it would be one device's mean: the varying-axes check refuses it.
  with pytest.raises(ValueError, match="still depends on one device.s clients"):
    _mapped(broken, "sharded")
  np.testing.assert_allclose(_mapped(fixed, "sharded"), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="still depends on one device.s clients"):
    _mapped(Aggregator(init=lambda: (), update=_median_without_gather), "sharded")


def test_a_stream_that_forgets_its_collective_fails_on_sharded():
  good = aggregate.mean_stream()
  broken = SumStream(good.zero, good.add,
                     lambda acc, state, collectives=None: good.finish(acc, state, None))
  expected = _mapped(aggregate.weighted_mean(), "vmap")
  # Four clients per device in chunks of 3: the stream's running sum is used.
  np.testing.assert_allclose(_mapped(aggregate.from_stream(good), "sharded", chunk_size=3),
                             expected, rtol=1e-5)
  with pytest.raises(ValueError, match="still depends on one device.s clients"):
    _mapped(aggregate.from_stream(broken), "sharded", chunk_size=3)


def _grad_client(shared, one):
  """Each client's gradient of 0.5 ||p - x_i||^2 at the shared p: p - x_i."""
  x, weight = one
  grad = jax.grad(lambda p: 0.5 * jnp.sum((p["w"] - x) ** 2))(shared)
  return {"w": grad["w"]}, weight, {"grad": grad["w"]}


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_local_updates_can_run_with_the_check_too(chunk_size):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  weights = jnp.asarray(rng.uniform(1, 2, size=16), jnp.float32)
  shared = {"w": jnp.array([0.5, -1.0, 2.0])}
  results = {}
  for name, backend in (("vmap", VmapBackend()),
                        ("checked", ShardedBackend(check_local_vma=True))):
    mapper = backend.make_mapper(_grad_client, aggregate.weighted_mean(), chunk_size)
    aggregate_, outputs, _ = jax.jit(mapper)(shared, (x, weights), ())
    results[name] = (aggregate_["w"], outputs["grad"])
  # The shared params are marked varying first: each client's gradient is its own,
  # not summed over the eight devices.
  np.testing.assert_allclose(results["checked"][1], shared["w"] - x, rtol=1e-6)
  for got, want in zip(results["checked"], results["vmap"]):
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_client_scans_from_constants_are_why_the_local_check_is_off_by_default():
  def counting_client(shared, one):
    x, weight = one
    count = jax.lax.scan(lambda c, xi: (c + (xi > 0).astype(jnp.int32), None),
                         jnp.zeros((), jnp.int32), x)[0]       # a carry from a constant
    return {"w": x * shared}, weight, {"count": count}
  x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 3)), jnp.float32)
  args = (jnp.float32(2.0), (x, jnp.ones(16)), ())
  counts = jax.jit(ShardedBackend().make_mapper(counting_client, aggregate.weighted_mean()))(
      *args)[1]["count"]
  np.testing.assert_array_equal(counts, np.sum(np.asarray(x) > 0, axis=1))
  checked = ShardedBackend(check_local_vma=True).make_mapper(counting_client,
                                                             aggregate.weighted_mean())
  with pytest.raises(TypeError, match="carry input and carry output must have equal types"):
    jax.jit(checked)(*args)


# ------------------------------------------------ loop: errors name the client and stage


def _client_fn(shared, one):
  message, weight = one
  return {"w": message * shared}, weight, {}


def test_loop_backend_names_the_failing_client_and_stage():
  messages = jnp.arange(12.0).reshape(4, 3)
  weights = jnp.array([1.0, 2.0, -1.0, 1.0])
  ids = jnp.array([10, 11, 12, 13])

  # Eager (jit=False): a value-dependent failure at cohort position 2.
  def picky(shared, one):
    if float(one[1]) < 0:
      raise ValueError("negative weight")
    return _client_fn(shared, one)
  mapper = LoopBackend(jit=False).make_mapper(picky, aggregate.weighted_mean())
  with pytest.raises(ForEachClientError) as info:
    mapper(jnp.float32(2.0), (messages, weights), (), client_ids=ids)
  error = info.value
  assert (error.stage, error.position, error.client_id) == ("local update", 2, 12)
  assert isinstance(error.__cause__, ValueError)
  assert re.search(r"local update failed for the client at cohort position 2 of 4 "
                   r"\(client id 12\): ValueError: negative weight", str(error))

  # Jitted clients: a tracing error is the first client's; without ids, no id.
  def bad_shapes(shared, one):
    return {"w": one[0] + jnp.ones(5)}, one[1], {}
  mapper = LoopBackend().make_mapper(bad_shapes, aggregate.weighted_mean())
  with pytest.raises(ForEachClientError, match="position 0 of 4: TypeError") as info:
    mapper(jnp.float32(2.0), (messages, weights), ())
  assert info.value.client_id is None and isinstance(info.value.__cause__, TypeError)

  # The aggregation stage.
  def refuse(messages, weights, state, collectives=None):
    raise RuntimeError("no quorum")
  mapper = LoopBackend().make_mapper(_client_fn, Aggregator(lambda: (), refuse))
  with pytest.raises(ForEachClientError, match=r"aggregation failed \(cohort of 4 clients\): "
                     "RuntimeError: no quorum") as info:
    mapper(jnp.float32(2.0), (messages, weights), (), client_ids=ids)
  assert info.value.stage == ForEachClientError.AGGREGATION and info.value.position is None


def test_loop_round_reports_the_sampled_client_id():
  data, params = linear_problem(SIZES, seed=1)

  def broken_loss(params, batch, rng):
    return linear_example_loss(params, batch, rng) + jnp.ones(7)   # wrong shape
  method = fedavg(broken_loss, 0.05, 1.0, SCHEDULE)
  state = method.init(params, jax.random.PRNGKey(3), data.num_clients)
  first_id = int(sample_cohort(state, data.num_clients, 4)[0][0])
  round_fn = make_round(method, data, 4, "loop")
  with pytest.raises(ForEachClientError,
                     match=f"position 0 of 4 \\(client id {first_id}\\)") as info:
    round_fn(state, *data.device_arrays())
  assert info.value.client_id == first_id


def test_loop_backend_without_jit_runs_the_local_steps_eagerly():
  seen = []

  def recording_loss(params, batch, rng):
    seen.append(isinstance(batch["x"], jax.core.Tracer))
    return linear_example_loss(params, batch, rng)
  data, params = linear_problem(SIZES, seed=1)
  arrays, offsets = data.device_arrays()
  finals = {}
  for name, backend in (("eager", LoopBackend(jit=False)), ("vmap", VmapBackend())):
    method = fedavg(recording_loss, 0.05, 1.0, SCHEDULE)
    state = method.init(params, jax.random.PRNGKey(3), data.num_clients)
    seen.clear()
    finals[name] = make_round(method, data, 4, backend)(state, arrays, offsets)[0]
    if name == "eager":
      # The local steps ran on concrete arrays (4 clients, 2 epochs or more); only the
      # shape probe of local training (jax.eval_shape, once per client) traces.
      assert seen.count(False) >= 4 * 2 and seen.count(True) == 4
  tree_close(finals["eager"].params, finals["vmap"].params, atol=1e-5)


def test_loop_scan_is_lax_scan_run_from_python():
  f = lambda c, x: (c + x, c * x)
  xs = jnp.arange(5.0)
  for got, want in ((LoopBackend().scan(f, 1.0, xs), jax.lax.scan(f, 1.0, xs)),
                    (LoopBackend().scan(f, 1.0, xs[:0]), jax.lax.scan(f, 1.0, xs[:0])),
                    (LoopBackend().scan(lambda c, _: (c * 2, c), 1.0, length=3),
                     jax.lax.scan(lambda c, _: (c * 2, c), 1.0, length=3))):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b) or a.shape == b.shape, got, want)
    assert got[1].shape == want[1].shape
  assert LoopBackend().jit(f) is f


# ------------------------------------------------ one place decides by backend name


def test_nothing_outside_parallel_compares_backend_names():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  name = r"""["'](?:loop|vmap|sharded)["']"""
  comparison = re.compile(rf"(?:==|!=)\s*{name}|{name}\s*(?:==|!=)|backend\w*\s*(?:==|!=|\bin\b|\bnot in\b)")
  found = []
  for top in ("fedjax_lab", "algorithms", "launch"):
    for folder, _, files in os.walk(os.path.join(root, top)):
      for file in files:
        path = os.path.join(folder, file)
        if not file.endswith(".py") or path.endswith(os.path.join("fedjax_lab", "parallel.py")):
          continue
        with open(path) as f:
          found += [f"{os.path.relpath(path, root)}:{i}: {line.strip()}"
                    for i, line in enumerate(f, 1) if comparison.search(line)]
  assert not found, "\n".join(found)
