"""The robust aggregators' conventions against numpy, and the shared robustness / DP keys.

Median and trimmed mean are unweighted by default (Yin et al. 2018), weighted as an
option; Krum's scores are Blanchard et al.'s; Krum's f is a count or a fraction; every
launch.train config takes the robustness and DP overrides.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from algorithms.fedavg import fedavg
from fedjax_lab import aggregate
from launch import robust
from reference import linear_example_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("fedavg_digits", "fal_digits", "fedhyper_digits", "robust_digits")
PADDING = 3


def cohort(count, seed=0):
  """``count`` valid clients with random weights, then PADDING rows of weight 0.

  Messages ``{'a': [C, 3, 2], 'b': [C]}`` float32; the padding rows hold large values
  of both signs, so a statistic that counts them moves. Returns (messages, weights,
  valid messages as float64).
  """
  rng = np.random.default_rng(seed)
  valid = {"a": rng.normal(size=(count, 3, 2)), "b": rng.normal(size=(count,))}
  garbage = lambda shape: rng.choice([-1e3, 1e3], size=shape)
  messages = {k: np.concatenate([v, garbage((PADDING,) + v.shape[1:])]).astype(np.float32)
              for k, v in valid.items()}
  weights = np.concatenate([rng.integers(1, 9, size=count), np.zeros(PADDING)]).astype(np.float32)
  return messages, weights, {k: v.astype(np.float32).astype(np.float64) for k, v in valid.items()}


def flat_rows(tree):
  """``[C, D]`` float64 rows in ravel_pytree's leaf order ('a' then 'b')."""
  count = len(tree["b"])
  return np.concatenate([np.asarray(tree[k], np.float64).reshape(count, -1) for k in ("a", "b")],
                        axis=1)


def aggregated(agg, messages, weights, jit=True):
  update = lambda m, w: agg.update(m, w, agg.init(), None)[0]
  out = (jax.jit(update) if jit else update)(messages, weights)
  return jax.tree.map(np.asarray, out)


# --------------------------------------------------------------------------- numpy references


def np_trimmed_mean(values, beta):
  """Yin et al.'s beta-trimmed mean: drop floor(beta n) from each end per coordinate."""
  n = len(values)
  k = int(np.floor(beta * n))
  return np.mean(np.sort(values, axis=0)[k:n - k], axis=0)


def np_weighted_median(values, weights):
  """Per coordinate: mean of the first sorted values where 2 cum >= W and 2 cum > W."""
  out = np.empty(values.shape[1:])
  for idx in np.ndindex(*values.shape[1:]):
    col = values[(slice(None),) + idx]
    order = np.argsort(col, kind="stable")
    v, cum = col[order], np.cumsum(weights[order])
    out[idx] = 0.5 * (v[np.flatnonzero(2 * cum >= cum[-1])[0]] +
                      v[np.flatnonzero(2 * cum > cum[-1])[0]])
  return out


def np_weighted_trimmed_mean(values, weights, beta):
  """Drops weight beta W from each end of the sorted values (boundary rows in part)."""
  out = np.empty(values.shape[1:])
  total = weights.sum()
  trim = beta * total
  for idx in np.ndindex(*values.shape[1:]):
    col = values[(slice(None),) + idx]
    order = np.argsort(col, kind="stable")
    v, w = col[order], weights[order]
    hi = np.cumsum(w)
    keep = np.clip(np.minimum(hi, total - trim) - np.maximum(hi - w, trim), 0, None)
    out[idx] = np.sum(keep * v) / (total - 2 * trim)
  return out


def np_krum_scores(x, f):
  """Blanchard et al. 2017: score_i = sum of the n - f - 2 smallest ||x_i - x_j||^2, j != i."""
  n = len(x)
  scores = np.empty(n)
  for i in range(n):
    d = np.sort([np.sum((x[i] - x[j]) ** 2) for j in range(n) if j != i])
    scores[i] = np.sum(d[:n - f - 2])
  return scores


# --------------------------------------------------------------------------- median, trimmed mean


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("count", [7, 8])
def test_unweighted_median_is_numpy_median_of_the_valid_clients(count, jit):
  messages, weights, valid = cohort(count, seed=count)
  out = aggregated(aggregate.coordinate_median(), messages, weights, jit)
  for k in valid:
    np.testing.assert_allclose(out[k], np.median(valid[k], axis=0), atol=1e-6)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("count,beta", [(7, 0.1), (9, 0.2), (10, 0.25), (12, 0.3), (8, 0.0)])
def test_unweighted_trimmed_mean_drops_floor_beta_n_from_each_end(count, beta, jit):
  messages, weights, valid = cohort(count, seed=10 + count)
  out = aggregated(aggregate.trimmed_mean(beta), messages, weights, jit)
  for k in valid:
    np.testing.assert_allclose(out[k], np_trimmed_mean(valid[k], beta), atol=1e-5)
  from scipy.stats import trim_mean   # an independent second reference
  np.testing.assert_allclose(out["b"], trim_mean(valid["b"], beta), atol=1e-5)


def test_unweighted_statistics_ignore_the_weights_and_padding_is_left_out():
  messages, weights, _ = cohort(9, seed=3)
  other = np.where(weights > 0, np.float32(1.0), np.float32(0.0))
  for agg in (aggregate.coordinate_median(), aggregate.trimmed_mean(0.2)):
    a, b = aggregated(agg, messages, weights), aggregated(agg, messages, other)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      assert np.all(np.abs(a[k]) < 10)                 # no padding value (1e3) leaks in


@pytest.mark.parametrize("count", [7, 8])
def test_weighted_option_matches_the_weighted_references(count):
  messages, weights, valid = cohort(count, seed=20 + count)
  w = weights[:count].astype(np.float64)
  out = aggregated(aggregate.coordinate_median(weighted=True), messages, weights)
  for k in valid:
    np.testing.assert_allclose(out[k], np_weighted_median(valid[k], w), atol=1e-6)
  for beta in (0.1, 0.25):
    out = aggregated(aggregate.trimmed_mean(beta, weighted=True), messages, weights)
    for k in valid:
      np.testing.assert_allclose(out[k], np_weighted_trimmed_mean(valid[k], w, beta), atol=1e-5)
  # The weighted and unweighted medians differ on these weights.
  unweighted = aggregated(aggregate.coordinate_median(), messages, weights)
  assert not np.allclose(unweighted["a"], out["a"])


# --------------------------------------------------------------------------- Krum


@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_scores_selection_and_multi_krum_follow_blanchard(f):
  count = 8                                       # n > 2f + 2 for f <= 2
  messages, weights, valid = cohort(count, seed=30 + f)
  x = flat_rows(valid)
  flat = jnp.asarray(flat_rows(messages), jnp.float32)
  scores = np.asarray(aggregate.krum_scores(flat, jnp.asarray(weights > 0), f))
  np.testing.assert_allclose(scores[:count], np_krum_scores(x, f), rtol=1e-5)
  assert np.all(np.isinf(scores[count:]))
  best = int(np.argmin(np_krum_scores(x, f)))
  out = aggregated(aggregate.krum(num_byzantine=f), messages, weights)
  np.testing.assert_allclose(flat_rows(jax.tree.map(lambda v: v[None], out))[0], x[best],
                             atol=1e-6)
  # Multi-Krum: the unweighted mean of the m = n - f lowest-scored clients.
  chosen = np.argsort(np_krum_scores(x, f), kind="stable")[:count - f]
  out = aggregated(aggregate.multi_krum(num_byzantine=f), messages, weights)
  np.testing.assert_allclose(flat_rows(jax.tree.map(lambda v: v[None], out))[0],
                             x[chosen].mean(0), atol=1e-5)


def test_krum_f_is_a_count_or_a_fraction_not_both():
  messages, weights, _ = cohort(8, seed=40)       # 8 valid clients + 3 padding
  for count, fraction in ((2, 0.25), (1, 0.2), (0, 0.1)):   # floor(fraction * 8) = count
    for name in ("krum", "multi_krum"):
      by_count = robust.make_aggregator(name, ml_collections.ConfigDict(
          {"krum_byzantine": count}))
      by_fraction = robust.make_aggregator(name, ml_collections.ConfigDict(
          {"krum_byzantine_fraction": fraction}))
      by_malicious = robust.make_aggregator(name, ml_collections.ConfigDict(
          {"malicious_fraction": fraction}))
      library = (aggregate.krum(num_byzantine=count) if name == "krum"
                 else aggregate.multi_krum(num_byzantine=count))
      ref = aggregated(library, messages, weights)
      for agg in (by_count, by_fraction, by_malicious):
        out = aggregated(agg, messages, weights)
        for k in ref:
          np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{name} f={count}")
  # f = 2 and f = 0 choose differently here, so the equalities above are not vacuous.
  assert not np.allclose(aggregated(aggregate.multi_krum(num_byzantine=2), messages, weights)["a"],
                         aggregated(aggregate.multi_krum(num_byzantine=0), messages, weights)["a"])
  both = ml_collections.ConfigDict({"aggregator": "krum", "krum_byzantine": 2,
                                    "krum_byzantine_fraction": 0.25})
  base = fedavg(linear_example_loss, client_lr=0.1)
  with pytest.raises(ValueError, match="krum_byzantine=2.*krum_byzantine_fraction=0.25"):
    robust.apply_robustness(base, both)
  with pytest.raises(ValueError, match="num_byzantine.*byzantine_fraction"):
    aggregate.multi_krum(num_byzantine=2, byzantine_fraction=0.25)
  with pytest.raises(ValueError, match="count"):
    robust.make_aggregator("krum", ml_collections.ConfigDict({"krum_byzantine": 1.5}))


def test_robust_weighted_reaches_the_aggregators():
  messages, weights, valid = cohort(8, seed=50)
  w = weights[:8].astype(np.float64)
  median = lambda **keys: aggregated(robust.make_aggregator(
      "median", ml_collections.ConfigDict(keys)), messages, weights)["a"]
  np.testing.assert_allclose(median(), np.median(valid["a"], axis=0), atol=1e-6)
  np.testing.assert_allclose(median(robust_weighted=False), np.median(valid["a"], axis=0),
                             atol=1e-6)
  np.testing.assert_allclose(median(robust_weighted=True), np_weighted_median(valid["a"], w),
                             atol=1e-6)


# --------------------------------------------------------------------------- configs


def parse(name, *overrides):
  """``name``'s config with ``--config.KEY=VALUE`` overrides, parsed as launch.train does."""
  argv = ["train"] + list(overrides)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", os.path.join(REPO, "launch", "configs", f"{name}.py"), flag_values=values,
      sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_train_config_takes_the_shared_keys_and_is_off_by_default(name):
  base = fedavg(linear_example_loss, client_lr=0.1)
  config = parse(name)
  if name != "robust_digits":
    assert robust.apply_robustness(base, config) is base
  config = parse(name, "--config.aggregator=multi_krum", "--config.attack=gaussian",
                 "--config.attack_scale=2.0", "--config.malicious_fraction=0.1",
                 "--config.trim_fraction=0.1", "--config.krum_byzantine=2",
                 "--config.robust_weighted=True", "--config.dp.clip=0.5",
                 "--config.dp.noise_multiplier=1.0", "--config.dp.adaptive=True")
  assert (config.aggregator, config.attack, config.attack_scale) == ("multi_krum", "gaussian", 2.0)
  assert (config.krum_byzantine, config.robust_weighted, config.dp.clip) == (2, True, 0.5)
  assert config.krum_byzantine_fraction is None and config.dp.noise_multiplier == 1.0
  # The fraction form parses as well.
  assert parse(name, "--config.krum_byzantine_fraction=0.2").krum_byzantine_fraction == 0.2


def test_robust_digits_overrides_only_what_differs():
  from launch.configs import fedavg_digits, robust_digits, shared
  config, plain = robust_digits.get_config(), fedavg_digits.get_config()
  for key, value in shared.defaults().items():
    if key not in ("aggregator", "attack", "attack_scale", "malicious_fraction", "attack_seed"):
      assert config[key] == value == plain[key], key
  assert (config.aggregator, config.robust_weighted, config.krum_byzantine) == ("median", None,
                                                                                 None)


def test_dp_override_on_the_default_config_trains():
  """python -m launch.train --config.dp.clip=0.5 --config.dp.noise_multiplier=1.0
  --config.rounds=3, in this process."""
  from launch import common
  config = parse("fedavg_digits", "--config.dp.clip=0.5", "--config.dp.noise_multiplier=1.0",
                 "--config.rounds=3")
  state, _, summary = common.run(config, progress=False)
  assert summary["rounds"] == 3 and np.isfinite(summary["test_accuracy"])
  assert float(state.agg_state.noise_multiplier) == 1.0          # the DP-FedAvg aggregator ran
