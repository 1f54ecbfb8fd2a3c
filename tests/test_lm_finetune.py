"""Federated fine-tuning of language models: the transformer, LoRA, prompt tuning, FedKSeed."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from algorithms.fedkseed import fedkseed
from fedjax_lab import centralized, lora
from fedjax_lab import client as client_lib
from fedjax_lab.algorithm import aggregate_and_step
from fedjax_lab.client import LocalSchedule
from fedjax_lab.models import Model
from fedjax_lab.models import transformer
from fedjax_lab.transforms import as_extra_args
from fedjax_lab.zeroth_order import kseed
from reference import linear_example_loss, linear_grad, linear_problem, to_numpy


def test_transformer_is_causal_and_its_attention_matches_numpy():
  model = transformer.transformer_lm(11, num_layers=1, d_model=8, num_heads=2, max_len=6,
                                     num_prompt=2)
  x = np.array([[3, 4, 5, 6, 7, 8], [9, 3, 3, 4, 10, 5]], np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(model.apply)
  logits = apply(params, x)
  assert logits.shape == (2, 6, 11)
  changed = x.copy()
  changed[:, 4:] = 3                        # future tokens of positions 0..3
  np.testing.assert_allclose(apply(params, changed)[:, :4], logits[:, :4], atol=1e-6)
  assert np.abs(apply(params, changed)[:, 4:] - logits[:, 4:]).max() > 1e-4
  # One attention layer against numpy: softmax(q k^T / sqrt(hd) + causal mask) v.
  attn = transformer.CausalSelfAttention(num_heads=2)
  h = np.random.default_rng(0).normal(size=(1, 5, 8)).astype(np.float32)
  p = jax.jit(attn.init)(jax.random.PRNGKey(1), h)["params"]
  qkv = h[0] @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])
  q, k, v = (qkv[:, i * 8:(i + 1) * 8].reshape(5, 2, 4) for i in range(3))
  out = np.zeros((5, 2, 4))
  for head in range(2):
    s = q[:, head] @ k[:, head].T / 2.0 + np.triu(np.full((5, 5), -1e30), 1)
    w = np.exp(s - s.max(-1, keepdims=True))
    out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, head]
  ref = out.reshape(5, 8) @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"])
  np.testing.assert_allclose(jax.jit(attn.apply)({"params": p}, h)[0], ref, atol=1e-5)
  with pytest.raises(ValueError, match="exceeds the model's max_len=6"):
    model.apply(params, np.zeros((1, 7), np.int32))


def _linear_layer(fan_in=4, fan_out=3, n=32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, fan_in)).astype(np.float32)
  y = (x @ rng.normal(size=(fan_in, fan_out)) + 0.1 * rng.normal(size=(n, fan_out))).astype(np.float32)
  base = {"params": {"dense": {"kernel": jnp.asarray(rng.normal(size=(fan_in, fan_out)), jnp.float32)}}}
  model = Model(init=lambda r, x: base, apply=lambda p, x: x @ p["params"]["dense"]["kernel"])
  return model, base, x, y


def test_lora_starts_at_the_base_and_rank_full_reaches_the_least_squares_optimum():
  model, base, x, y = _linear_layer()
  w_star = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)[0]
  tuned = lora.lora_model(model, base, rank=3, alpha=6.0)       # rank = min(in, out)
  adapters = tuned.init(jax.random.PRNGKey(0), None)
  np.testing.assert_array_equal(tuned.apply(adapters, x), model.apply(base, x))
  # merge is W0 + (alpha / r) A B.
  a = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
  b = np.random.default_rng(2).normal(size=(3, 3)).astype(np.float32)
  merged = lora.merge(base, {"params": {"dense": {"kernel": {"lora_a": a, "lora_b": b}}}}, 6.0)
  np.testing.assert_allclose(merged["params"]["dense"]["kernel"],
                             np.asarray(base["params"]["dense"]["kernel"]) + 2.0 * a @ b, atol=1e-5)
  def fit(m, params, steps=2000):   # full-batch Adam with a decaying rate
    tx = optax.adam(optax.exponential_decay(0.05, steps, 0.01))
    loss = lambda p: 0.5 * jnp.mean(jnp.sum((m.apply(p, x) - y) ** 2, -1))
    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, steps)[0][0])(params)
  full, low_rank = fit(model, base), fit(tuned, adapters)
  np.testing.assert_allclose(full["params"]["dense"]["kernel"], w_star, atol=2e-3)
  np.testing.assert_allclose(lora.merge(base, low_rank, 6.0)["params"]["dense"]["kernel"], w_star,
                             atol=2e-3)
  # Only the adapters are the message: 4*3 + 3*3 floats.
  assert lora.tree_bytes(adapters) == 4 * (4 * 3 + 3 * 3)
  with pytest.raises(ValueError, match="rank must be >= 1"):
    lora.init(base, 0, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="matches no parameter"):
    lora.init(base, 1, jax.random.PRNGKey(0), select=lora.named("nothing"))


def test_prompt_tuning_trains_only_the_prompt_by_the_full_models_gradient():
  model = transformer.transformer_lm(9, num_layers=1, d_model=8, num_heads=1, max_len=5,
                                     num_prompt=2)
  x = np.array([[3, 4, 5, 6, 7], [8, 7, 6, 5, 4]], np.int32)
  base = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  tuned = lora.subset_model(model, base, lora.named("prompt"))
  prompt = tuned.init(None, None)
  assert jax.tree.structure(prompt) == jax.tree.structure({"params": {"prompt": 0}})
  def loss(m):
    return lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m.apply(p, x), x))
  lr = 0.5
  step = jax.tree.map(lambda p, g: p - lr * g, prompt, jax.jit(jax.grad(loss(tuned)))(prompt))
  full_grad = jax.jit(jax.grad(loss(model)))(base)["params"]["prompt"]
  np.testing.assert_allclose(step["params"]["prompt"],
                             np.asarray(base["params"]["prompt"]) - lr * np.asarray(full_grad),
                             atol=1e-6)
  merged = traverse_util.flatten_dict(lora.put(base, step))
  for path, leaf in traverse_util.flatten_dict(base).items():
    if path != ("params", "prompt"):
      np.testing.assert_array_equal(merged[path], leaf)
  assert lora.tree_bytes(prompt) == 4 * 2 * 8


def _client(data, i):
  lo, hi = int(data.client_offsets[i]), int(data.client_offsets[i + 1])
  return {k: jnp.asarray(v[lo:hi]) for k, v in data.arrays.items()}, jnp.int32(hi - lo)


def test_fedkseed_client_steps_match_numpy_with_one_seed():
  """K = 1: every step uses z_0, so the trajectory is fixed and numpy replays it step by step."""
  data, params = linear_problem((5,), dim=3)
  lr, eps, steps, batch = 0.05, 1e-3, 4, 2
  seeds_key = jax.random.PRNGKey(7)
  method = fedkseed(linear_example_loss, lr, seeds_key, num_seeds=1, eps=eps,
                    schedule=LocalSchedule(batch_size=batch, epochs=None, steps=steps, shuffle=False))
  arrays, size = _client(data, 0)
  start = jax.tree.map(jnp.asarray, params)
  local = client_lib.local_train(method.oracle, as_extra_args(method.client_tx), method.schedule,
                                 start, arrays, size, jax.random.PRNGKey(0),
                                 {"global_params": start}, 5)
  message, _ = method.client_final(local, {"params": start}, ())
  z = to_numpy(kseed.perturbation(seeds_key, 0, start))
  x, y = np.asarray(arrays["x"], np.float64), np.asarray(arrays["y"], np.float64)
  f = lambda w, rows: np.mean(0.5 * (x[rows] @ w["w"] + w["b"] - y[rows]) ** 2)
  w, total = to_numpy(params), 0.0
  for t in range(steps):
    rows = [(t * batch + b) % 5 for b in range(batch)]
    g = (f({k: w[k] + eps * z[k] for k in w}, rows) - f({k: w[k] - eps * z[k] for k in w}, rows)) / (2 * eps)
    w = {k: w[k] - lr * g * z[k] for k in w}
    total += g
  for k in w:
    np.testing.assert_allclose(np.asarray(local.params[k], np.float64), w[k], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(message["delta"][0]), -lr * total, rtol=2e-2)
  assert message["delta"].shape == (1,)


def test_fedkseed_replay_of_the_averaged_scalars_equals_the_clients_average_model():
  data, params = linear_problem((5, 3, 7), dim=3)
  lr, seeds_key = 0.05, jax.random.PRNGKey(3)
  method = fedkseed(linear_example_loss, lr, seeds_key, num_seeds=16, eps=1e-3,
                    schedule=LocalSchedule(batch_size=2, epochs=None, steps=5))
  start = jax.tree.map(jnp.asarray, params)
  state = method.init(start, jax.random.PRNGKey(0), 3)
  messages, finals, weights = [], [], []
  for i in range(3):
    arrays, size = _client(data, i)
    padded = {k: jnp.zeros((7,) + v.shape[1:], v.dtype).at[:v.shape[0]].set(v) for k, v in arrays.items()}
    local = client_lib.local_train(method.oracle, as_extra_args(method.client_tx), method.schedule,
                                   start, padded, size, jax.random.PRNGKey(10 + i),
                                   {"global_params": start}, 7)
    message, _ = method.client_final(local, {"params": start}, ())
    # The client's own trajectory is its start plus sum_j c_j z_j (numpy, every seed).
    c = np.asarray(message["delta"], np.float64)
    zs = [to_numpy(kseed.perturbation(seeds_key, j, start)) for j in range(16)]
    for k in params:
      direct = np.asarray(params[k], np.float64) + sum(c[j] * zs[j][k] for j in range(16))
      np.testing.assert_allclose(np.asarray(local.params[k], np.float64), direct, atol=1e-5)
    assert np.count_nonzero(c) <= 5
    messages.append(message)
    finals.append(to_numpy(local.params))
    weights.append(float(size))
  stacked = jax.tree.map(lambda *m: jnp.stack(m), *messages)
  new_state, _ = aggregate_and_step(method, state, stacked, jnp.asarray(weights))
  p = np.asarray(weights) / sum(weights)
  for k in params:
    expected = sum(p[i] * finals[i][k] for i in range(3))   # FedAvg of the clients' models
    np.testing.assert_allclose(np.asarray(new_state.params[k], np.float64), expected, atol=1e-5)
  assert kseed.uplink_bytes(method.schedule.steps) == 40
  with pytest.raises(ValueError, match="fixed number of local steps"):
    fedkseed(linear_example_loss, lr, seeds_key, schedule=LocalSchedule(batch_size=2, epochs=1))


def _leaf_file(path):
  users = {"ROMEO": ["the king sees the old queen . the ", "the old horse sees the red king . "],
           "JULIET": ["the queen loves the bird . the ki", "the brave ghost hides the lamp . "]}
  user_data = {u: {"x": [s[:-1] for s in snippets], "y": [s[-1] for s in snippets]}
               for u, snippets in users.items()}
  with open(path, "w") as f:
    json.dump({"users": list(users), "num_samples": [2, 2], "user_data": user_data}, f)
  return users


def test_launch_reads_leaf_shakespeare_clients_with_one_vocabulary(tmp_path):
  from launch import lm
  from launch.configs import fedkseed_text
  users = _leaf_file(os.path.join(tmp_path, "train.json"))
  config = fedkseed_text.get_config("tiny")
  config.data = f"leaf:{tmp_path}/train.json"
  config.test_fraction = 0.5
  names, texts = lm.client_texts(config)
  assert names == ["ROMEO", "JULIET"] and texts == [users["ROMEO"], users["JULIET"]]
  config.pretrain_steps, config.algorithm = 0, "fedavg"
  exp = lm.build(config)
  vocab = exp.info.vocab
  assert exp.train_data.num_clients == 2
  # Client 0's training rows are BOS text EOS of its first snippet, cut into rows of 16.
  rows = exp.train_data.arrays["x"][:int(exp.train_data.client_offsets[1])]
  assert vocab.decode(rows) == users["ROMEO"][0]
  assert vocab.decode(exp.test_arrays["y"]) == users["ROMEO"][1] + users["JULIET"][1]
  # LoRA's message: A [in, r] and B [r, out] of every dense kernel, float32.
  config.finetune, config.lora_rank = "lora", 2
  summary = lm.report(config, lm.build(config))
  kernels = [leaf.shape for path, leaf in traverse_util.flatten_dict(exp.init_params).items()
             if path[-1] == "kernel"]
  assert summary["uplink_bytes_per_client_round"] == 4 * sum(2 * (i + o) for i, o in kernels)
  assert summary["full_finetune_uplink_bytes"] == 4 * sum(
      np.size(x) for x in jax.tree.leaves(exp.init_params))
  config.finetune = "adapters"
  with pytest.raises(ValueError, match="unknown finetune 'adapters'; choose one of full, lora, prompt"):
    lm.build(config)
  config.finetune, config.data = "lora", "shakespeare"
  with pytest.raises(ValueError, match="unknown data 'shakespeare' for LM fine-tuning"):
    lm.build(config)


@pytest.mark.slow
def test_launch_fedkseed_lowers_the_pretrained_lms_test_loss_in_few_bytes():
  from launch import common
  from launch.configs import fedkseed_text
  config = fedkseed_text.get_config("tiny")
  config.pretrain_steps, config.rounds, config.local_steps = 30, 3, 30
  config.client_lr = 2e-3
  _, _, summary = common.run(config, progress=False)
  assert summary["test_loss"] < summary["initial_test_loss"] - 1e-3
  assert summary["uplink_bytes_per_client_round"] == 8 * 30 < 18_000
  assert summary["full_finetune_uplink_bytes"] == 4 * summary["trainable_params"]


def test_central_pretraining_is_sgd_on_the_drawn_rows_and_deterministic():
  data, params = linear_problem((9,), dim=3)
  arrays = {k: jnp.asarray(v) for k, v in data.arrays.items()}
  rng, lr, steps, batch = jax.random.PRNGKey(4), 0.1, 3, 4
  final, losses = centralized.train(linear_example_loss, jax.tree.map(jnp.asarray, params), arrays,
                                    steps, batch, optax.sgd(lr), rng)
  x, y = np.asarray(data.arrays["x"], np.float64), np.asarray(data.arrays["y"], np.float64)
  w = to_numpy(params)
  for t, key in enumerate(jax.random.split(rng, steps)):
    rows = np.asarray(jax.random.randint(jax.random.split(key)[0], (batch,), 0, 9))
    grad = linear_grad(w, x[rows], y[rows])
    np.testing.assert_allclose(float(losses[t]), np.mean(0.5 * (x[rows] @ w["w"] + w["b"] - y[rows]) ** 2),
                               rtol=1e-5)
    w = {k: w[k] - lr * grad[k] for k in w}
  for k in w:
    np.testing.assert_allclose(np.asarray(final[k], np.float64), w[k], rtol=1e-5, atol=1e-6)
  again, _ = centralized.train(linear_example_loss, jax.tree.map(jnp.asarray, params), arrays,
                               steps, batch, optax.sgd(lr), rng)
  for k in w:
    np.testing.assert_array_equal(again[k], final[k])


def _authors_probabilities(histories, clip):
  """FedKSeed-Pro's p from per-seed lists of scalars (each history starts with 0), numpy."""
  amp = np.array([np.mean(np.abs(np.clip([0.0] + h, -clip, clip))) for h in histories])
  amp = (amp - amp.min()) / (amp.max() - amp.min() + 1e-10)
  return np.exp(amp) / np.exp(amp).sum()


def test_fedkseed_pro_samples_by_the_history_and_the_server_sums_it():
  data, params = linear_problem((5, 4), dim=3)
  lr, eps, clip, steps, batch, seeds_key = 0.05, 1e-3, 0.3, 4, 2, jax.random.PRNGKey(5)
  method = fedkseed(linear_example_loss, lr, seeds_key, num_seeds=4, eps=eps,
                    schedule=LocalSchedule(batch_size=batch, epochs=None, steps=steps, shuffle=False),
                    sampling="pro", clip=clip)
  start = jax.tree.map(jnp.asarray, params)
  state = method.init(start, jax.random.PRNGKey(0), 2)
  down = method.broadcast(state)
  np.testing.assert_allclose(np.exp(down["seed_log_p"]), 0.25, rtol=1e-6)   # no history yet
  # All mass on seed 2: the client's steps are fixed, numpy replays them with the clip.
  down = {**down, "seed_log_p": jnp.log(jnp.array([0.0, 0.0, 1.0, 0.0]))}
  messages, gs = [], []
  for i in range(2):
    arrays, size = _client(data, i)
    padded = {k: jnp.zeros((5,) + v.shape[1:], v.dtype).at[:v.shape[0]].set(v) for k, v in arrays.items()}
    local = client_lib.local_train(method.oracle, as_extra_args(method.client_tx), method.schedule,
                                   start, padded, size, jax.random.PRNGKey(i),
                                   {"global_params": start}, 5, method.init_oracle_state(down, ()))
    message, _ = method.client_final(local, down, ())
    z = to_numpy(kseed.perturbation(seeds_key, 2, start))
    x, y, n = np.asarray(arrays["x"], np.float64), np.asarray(arrays["y"], np.float64), int(size)
    f = lambda w, rows: np.mean(0.5 * (x[rows] @ w["w"] + w["b"] - y[rows]) ** 2)
    w, g_steps = to_numpy(params), []
    for t in range(steps):
      rows = [(t * batch + b) % n for b in range(batch)]
      g = (f({k: w[k] + eps * z[k] for k in w}, rows) - f({k: w[k] - eps * z[k] for k in w}, rows)) / (2 * eps)
      w = {k: w[k] - lr * g * z[k] for k in w}
      g_steps.append(g)
    np.testing.assert_allclose(message["count"], [0, 0, steps, 0])
    np.testing.assert_allclose(float(message["abs"][2]), np.sum(np.abs(np.clip(g_steps, -clip, clip))),
                               rtol=2e-2)
    np.testing.assert_allclose(float(message["delta"][2]), -lr * np.sum(g_steps), rtol=2e-2)
    messages.append(message)
    gs.append(g_steps)
  stacked = jax.tree.map(lambda *m: jnp.stack(m), *messages)
  new_state, _ = aggregate_and_step(method, state, stacked, jnp.array([5.0, 4.0]))
  history = jax.tree.map(np.asarray, new_state.rule_state[0])
  np.testing.assert_allclose(history.count, [0, 0, 2 * steps, 0])           # summed, not averaged
  np.testing.assert_allclose(history.abs_total[2], sum(float(m["abs"][2]) for m in messages), rtol=1e-6)
  # The next broadcast's p is the authors' formula on the per-seed histories.
  expected = _authors_probabilities([[], [], gs[0] + gs[1], []], clip)
  np.testing.assert_allclose(np.exp(method.broadcast(new_state)["seed_log_p"]), expected, rtol=1e-5)
  direct = _authors_probabilities([[0.5, -2.0], [], [3.0], [-0.1, 0.1, 0.2]], clip=1.0)
  hist = kseed.SeedHistory(jnp.array([1.5, 0.0, 1.0, 0.4]), jnp.array([2.0, 0.0, 1.0, 3.0]))
  np.testing.assert_allclose(np.exp(kseed.seed_log_probabilities(hist)), direct, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown sampling 'biased'"):
    fedkseed(linear_example_loss, lr, seeds_key, sampling="biased")
