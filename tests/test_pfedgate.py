"""pFedGate against numpy: the blocks, the knapsack selection, one round, the personal model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import algorithms
from algorithms import pfedgate as pg
from fedjax_lab.client import LocalSchedule
from reference import linear_example_loss, linear_problem, run_rounds, to_numpy


# ---- numpy reference of the rules (written from the module docstring, not from the code)

def np_blocks(shape, split, granularity):
  """(sizes, firsts, element -> block) of one leaf."""
  units = (shape[-1] if shape else 1) if granularity == "units" else int(np.prod(shape))
  per_unit = int(np.prod(shape)) // units
  each = int(np.ceil(units / min(split, units)))
  unit_block = np.arange(units) // each
  count = unit_block[-1] + 1
  sizes = [per_unit * int(np.sum(unit_block == j)) for j in range(count)]
  if granularity == "units" and shape:
    element = np.tile(unit_block, int(np.prod(shape[:-1])))
  else:
    element = np.repeat(unit_block, per_unit)
  return sizes, [j == 0 for j in range(count)], element


def np_greedy(scores, sizes, firsts, s, split, levels):
  s_min = min(max(1.0 / split, 0.1), s)
  if s >= 1.0:
    return np.ones(len(scores), bool)
  sizes, cand = np.asarray(sizes, float), ~np.asarray(firsts)
  capacity = np.round(sizes[cand].sum() * (s - s_min))
  values = np.round(levels * scores) if levels else scores
  keep, total = ~cand, 0.0
  for j in sorted(np.flatnonzero(cand), key=lambda j: (-values[j], j)):
    if total + sizes[j] <= capacity:
      keep[j], total = True, total + sizes[j]
  return keep


def np_gate(gate, x, s, split, sizes, firsts, levels=0):
  """g * keep for the rows of x (float64)."""
  x = x.reshape(len(x), -1)
  x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
  z = x @ gate["kernel"] + gate["bias"]
  z = gate["scale"] * (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) + gate["shift"]
  g = np.maximum(np.mean(1.0 / (1.0 + np.exp(-z)), 0), min(max(1.0 / split, 0.1), s))
  return g * np_greedy(g, sizes, firsts, s, split, levels)


# ---- tests

SHAPES = {"a": (7, 12), "b": (12,), "c": (3, 3, 2, 9), "d": ()}


@pytest.mark.parametrize("granularity", ["units", "flat"])
def test_blocks_and_knapsack_selection_match_numpy_greedy(granularity):
  params = {k: jnp.zeros(v) for k, v in SHAPES.items()}
  split = 5
  layout = pg.block_layout(params, split, granularity)
  sizes, firsts, offset = [], [], 0
  for name in sorted(SHAPES):                      # jax.tree order: sorted keys
    s, f, element = np_blocks(SHAPES[name], split, granularity)
    np.testing.assert_array_equal(layout.element_blocks[sorted(SHAPES).index(name)],
                                  offset + element)
    sizes, firsts, offset = sizes + s, firsts + f, offset + len(s)
  np.testing.assert_array_equal(layout.sizes, sizes)
  np.testing.assert_array_equal(layout.first, firsts)
  assert layout.sizes.sum() == sum(int(np.prod(v)) for v in SHAPES.values())
  # s traced (a traceable hyper-parameter), one compilation per score rule.
  keep_fns = {levels: jax.jit(lambda sc, s, levels=levels: pg.knapsack_keep(sc, layout, s, levels))
              for levels in (0, 10)}
  rng = np.random.default_rng(0)
  for trial in range(6):
    scores = rng.uniform(0.0, 1.0, len(sizes)).astype(np.float32)
    for s in (0.3, 0.5, 0.8, 1.0):
      for levels in (0, 10):
        expected = np_greedy(scores.astype(np.float64), sizes, firsts, s, split, levels)
        got = np.asarray(keep_fns[levels](jnp.asarray(scores), jnp.float32(s)))
        np.testing.assert_array_equal(got, expected, err_msg=f"s={s} levels={levels}")
  with pytest.raises(ValueError, match="unknown block granularity 'rows'"):
    pg.block_layout(params, 5, "rows")
  with pytest.raises(ValueError, match="block_split must be >= 1"):
    pg.block_layout(params, 0)


def finite_difference(f, tree, h=1e-6):
  grads = {}
  for k, v in tree.items():
    v = np.asarray(v, np.float64)
    g = np.zeros_like(v)
    for i in np.ndindex(v.shape):
      up, down = v.copy(), v.copy()
      up[i] += h
      down[i] -= h
      g[i] = (f({**tree, k: up}) - f({**tree, k: down})) / (2 * h)
    grads[k] = g
  return grads


def clipped(grads, max_norm=10.0):
  norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
  return {k: g * min(1.0, max_norm / max(norm, 1e-30)) for k, g in grads.items()}


def test_one_round_of_two_clients_matches_numpy_step_by_step():
  sizes_ = (4, 6)
  data, params = linear_problem(sizes_, dim=5, seed=3)
  split, s, lr, gate_lr, steps = 3, 0.9, 0.1, 0.5, 2
  schedule = LocalSchedule(batch_size=None, epochs=steps, shuffle=False)   # 2 full-batch steps
  method = pg.pfedgate(linear_example_loss, lr, gate_lr, s, split, input_dim=5, gate_seed=1,
                       schedule=schedule)
  states = run_rounds(method, data, params, 1)
  gate0 = jax.tree.map(lambda t: np.asarray(t[0], np.float64), states[0].client_states)
  # The blocks of {'b': (), 'w': (5,)}: b | w[0:2] | w[2:4] | w[4]; only w's last two compete.
  sizes, firsts = [1, 2, 2, 1], [True, True, False, False]
  element = {"b": np.array([0]), "w": np.array([1, 1, 2, 2, 3])}

  def gated(theta, weights):
    return {"b": theta["b"] * weights[0], "w": theta["w"] * weights[element["w"]]}

  def loss(theta, gate, x, y):
    p = gated(theta, np_gate(gate, x, s, split, sizes, firsts))
    return np.mean(0.5 * (x @ p["w"] + p["b"] - y) ** 2)

  theta0 = to_numpy(params)
  finals, gates = [], []
  for i in range(2):
    c = data.client(i)
    x, y = np.asarray(c["x"], np.float64), np.asarray(c["y"], np.float64)
    theta, gate = dict(theta0), dict(gate0)
    for _ in range(steps):
      g_theta = clipped(finite_difference(lambda t: loss(t, gate, x, y), theta))
      g_gate = clipped(finite_difference(lambda g: loss(theta, g, x, y), gate))
      theta = {k: theta[k] - lr * g_theta[k] for k in theta}
      gate = {k: gate[k] - gate_lr * g_gate[k] for k in gate}
    finals.append(theta)
    gates.append(gate)
  weights = np.asarray(sizes_, np.float64) / sum(sizes_)
  expected = {k: sum(w * f[k] for w, f in zip(weights, finals)) for k in theta0}
  for k in expected:
    np.testing.assert_allclose(np.asarray(states[1].params[k], np.float64), expected[k],
                               atol=2e-5, err_msg=k)
  for i in range(2):
    row = jax.tree.map(lambda t: np.asarray(t[i], np.float64), states[1].client_states)
    for k in row:
      np.testing.assert_allclose(row[k], gates[i][k], atol=2e-5, err_msg=f"client {i} {k}")
  # The clients' gates moved apart.
  assert not np.allclose(gates[0]["kernel"], gates[1]["kernel"])
  # Client 1's personal model: the new theta gated by its gate on its whole train split.
  c = data.client(1)
  x = np.asarray(c["x"], np.float64)
  personal = method.personalize(states[1].params, jax.tree.map(lambda t: t[1],
                                                               states[1].client_states),
                                {k: jnp.asarray(v) for k, v in c.items()}, jnp.int32(6), None)
  w = np_gate(gates[1], x, s, split, sizes, firsts)
  ref = gated(expected, w)
  for k in ref:
    np.testing.assert_allclose(np.asarray(personal[k], np.float64), ref[k], atol=2e-5)
  assert np.count_nonzero(w) == 3   # one of w's two competing blocks was dropped
  with pytest.raises(ValueError, match="sparse factor must be in"):
    pg.pfedgate(linear_example_loss, lr, sparsity=0.0)


@pytest.mark.slow   # a launch run: compile-bound on 2 cores
def test_launch_run_on_personal_digits_keeps_at_most_the_budget():
  from launch import common
  config = algorithms.example_config("pfedgate")
  config.num_clients, config.hidden, config.rounds, config.local_steps = 10, (16,), 2, 3
  config.clients_per_round, config.held_out_clients, config.eval_every = 4, 2, 0
  state, _, summary = common.run(config, progress=False)
  assert summary["algorithm"] == "pfedgate" and summary["personal_clients"] == 8
  assert 0.0 <= summary["personal_accuracy_p10"] <= summary["personal_accuracy_mean"] <= 1.0
  exp = common.build(config)
  c = exp.train_data.client(0)
  row = jax.tree.map(lambda t: t[0], state.client_states)
  kept = float(pg.kept_fraction(state.params, row, jnp.asarray(c["x"]),
                                jnp.ones(len(c["y"]), bool), config.pfedgate_sparsity,
                                config.pfedgate_block_split))
  # First blocks (1/5 of each leaf's units, rounded up) plus at most (s - s_min) of the rest.
  assert 0.2 <= kept <= config.pfedgate_sparsity + 0.05
