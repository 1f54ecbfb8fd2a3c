"""pFedPG against numpy: the generator, its chain-rule update over two rounds, a launch run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import pfedpg as pp
from fedjax_lab.client import LocalSchedule
from fedjax_lab.data.federated import FederatedData
from reference import run_rounds

M, D = 2, 3          # prompt [m, d]
SIZES = (4, 6)
LR, BETA, STEPS = 0.2, 0.7, 2


def prompt_loss(tree, batch, rng):
  """A prompt 'model': 0.5 (<P, x_k> - y_k)^2 with x_k reshaped to [m, d]."""
  del rng
  p = tree["params"]["prompt"]
  return 0.5 * (jnp.einsum("nmd,md->n", batch["x"], p) - batch["y"]) ** 2


def problem():
  rng = np.random.default_rng(0)
  n = sum(SIZES)
  x = rng.normal(size=(n, M, D)).astype(np.float32)
  # Each client's own target prompt: the clients want different prompts.
  targets = rng.normal(size=(2, M, D))
  y = np.concatenate([np.einsum("nmd,md->n", x[:4], targets[0]),
                      np.einsum("nmd,md->n", x[4:], targets[1])]).astype(np.float32)
  data = FederatedData({"x": x, "y": y}, np.array([0, 4, 10]))
  base = {"params": {"prompt": jnp.asarray(rng.normal(size=(M, D)), jnp.float32)}}
  return data, base


def np_generate(phi, d):
  """P = P_base + softmax((d Wq)(P Wk)^T / sqrt(h)) (P Wv) Wo, float64, and its attention A V."""
  p, a = phi["base"], phi["attn"]
  s = (d @ a["query"]) @ (p @ a["key"]).T / np.sqrt(a["query"].shape[1])
  w = np.exp(s - s.max(1, keepdims=True))
  av = (w / w.sum(1, keepdims=True)) @ (p @ a["value"])
  return p + av @ a["out"], av


def np_adapt(p, x, y):
  """STEPS full-batch SGD steps on the mean of prompt_loss."""
  for _ in range(STEPS):
    r = np.einsum("nmd,md->n", x, p) - y
    p = p - LR * np.einsum("n,nmd->md", r, x) / len(y)
  return p


def flat_phi(state_params):
  return {"base": np.asarray(state_params["base"]["params"]["prompt"], np.float64),
          "attn": {k: np.asarray(v, np.float64) for k, v in state_params["attn"].items()}}


def np_vjp(phi, d, change, h=1e-6):
  """Gradient of <G(phi, d), change> in every leaf of phi and in d (central differences)."""
  f = lambda phi, d: np.sum(np_generate(phi, d)[0] * change)
  def fd(get, put):
    v = get()
    g = np.zeros_like(v)
    for i in np.ndindex(v.shape):
      up, down = v.copy(), v.copy()
      up[i] += h
      down[i] -= h
      g[i] = (put(up) - put(down)) / (2 * h)
    return g
  g_base = fd(lambda: phi["base"], lambda v: f({**phi, "base": v}, d))
  g_attn = {k: fd(lambda k=k: phi["attn"][k],
                  lambda v, k=k: f({**phi, "attn": {**phi["attn"], k: v}}, d))
            for k in phi["attn"]}
  return g_base, g_attn, fd(lambda: d, lambda v: f(phi, v))


def test_two_rounds_match_the_closed_form_then_the_chain_rule_in_numpy():
  data, base = problem()
  phi0 = pp.init_generator(base, jax.random.PRNGKey(1))
  method = pp.pfedpg(prompt_loss, LR, BETA, descriptor_seed=2,
                     schedule=LocalSchedule(batch_size=None, epochs=STEPS, shuffle=False))
  states = run_rounds(method, data, phi0, 2)
  phi = flat_phi(phi0)
  descriptors = [np.asarray(states[0].client_states[i], np.float64) for i in range(2)]
  np.testing.assert_array_equal(descriptors[0], descriptors[1])
  weights = np.asarray(SIZES, np.float64) / sum(SIZES)
  xs = [np.asarray(data.client(i)["x"], np.float64) for i in range(2)]
  ys = [np.asarray(data.client(i)["y"], np.float64) for i in range(2)]
  # Round 1, W_o = 0: every P_n is P_base, and G is linear in (P_base, W_o) there, so
  # P_base' = P_base + beta sum_n p_n dP_n, W_o' = beta sum_n p_n (A_n V)^T dP_n, d_n' = d_n.
  changes, avs = [], []
  for i in range(2):
    p, av = np_generate(phi, descriptors[i])
    np.testing.assert_allclose(p, phi["base"])
    changes.append(np_adapt(p, xs[i], ys[i]) - p)
    avs.append(av)
  after = flat_phi(states[1].params)
  np.testing.assert_allclose(after["base"], phi["base"] + BETA * sum(
      w * c for w, c in zip(weights, changes)), atol=1e-5)
  np.testing.assert_allclose(after["attn"]["out"], BETA * sum(
      w * av.T @ c for w, av, c in zip(weights, avs, changes)), atol=1e-5)
  for k in ("query", "key", "value"):
    np.testing.assert_allclose(after["attn"][k], phi["attn"][k], atol=1e-7)
  np.testing.assert_allclose(np.asarray(states[1].client_states, np.float64),
                             np.stack(descriptors), atol=1e-7)
  # Round 2, W_o != 0: the full chain rule through the attention, in numpy.
  phi, total = after, None
  for i in range(2):
    p, _ = np_generate(phi, descriptors[i])
    change = np_adapt(p, xs[i], ys[i]) - p
    g_base, g_attn, g_d = np_vjp(phi, descriptors[i], change)
    step = {"base": weights[i] * g_base, **{k: weights[i] * v for k, v in g_attn.items()}}
    total = step if total is None else {k: total[k] + step[k] for k in step}
    descriptors[i] = descriptors[i] + BETA * g_d
  final = flat_phi(states[2].params)
  np.testing.assert_allclose(final["base"], phi["base"] + BETA * total["base"], atol=1e-5)
  for k in phi["attn"]:
    np.testing.assert_allclose(final["attn"][k], phi["attn"][k] + BETA * total[k], atol=1e-5,
                               err_msg=k)
  rows = np.asarray(states[2].client_states, np.float64)
  np.testing.assert_allclose(rows, np.stack(descriptors), atol=1e-5)
  assert np.abs(rows[0] - rows[1]).max() > 1e-4       # the descriptors parted
  # Client 1 is evaluated with its generated prompt (eval_adapt=False) or that adapted.
  row = states[2].client_states[1]
  p1, _ = np_generate(final, rows[1])
  plain = pp.pfedpg(prompt_loss, LR, BETA, eval_adapt=False)
  np.testing.assert_allclose(plain.personalize(states[2].params, row, None, None, None)
                             ["base"]["params"]["prompt"], p1, atol=1e-5)
  with pytest.raises(ValueError, match="one \\[m, d\\] leaf"):
    pp.init_generator({"a": jnp.zeros(3)}, jax.random.PRNGKey(0))


@pytest.mark.slow   # a launch run: pre-training-free, but compile-bound on 2 cores
def test_launch_run_reports_per_client_losses_and_the_prompt_uplink():
  from launch import common
  from launch.configs import fedkseed_text
  config = fedkseed_text.get_config("pfedpg_tiny")
  state, _, summary = common.run(config, progress=False)
  assert summary["algorithm"] == "pfedpg" and summary["personal_clients"] == 6
  assert summary["uplink_bytes_per_client_round"] == 4 * config.prompt_length * config.lm_d_model
  assert summary["personal_loss_p10"] <= summary["personal_loss_mean"] <= summary["personal_loss_p90"]
  assert state.client_states.shape == (6, config.prompt_length, config.lm_d_model)
  config.finetune = "lora"
  with pytest.raises(ValueError, match="needs finetune='prompt'"):
    common.build(config)
