"""Central (non-federated) training: pre-training a model before federated fine-tuning.

One jitted ``lax.scan`` of optax steps on minibatches drawn uniformly (with
replacement) from ``arrays``; a pure function of its inputs (same key, same params).
"""
import jax
import jax.numpy as jnp
import optax

from fedjax_lab import oracles


def train(example_loss, params, arrays: dict, steps: int, batch_size: int,
          tx: optax.GradientTransformation, rng: jax.Array):
  """``(params, losses [steps])`` after ``steps`` steps of ``tx`` on the mean loss.

  Args:
    example_loss: ``(params, batch, rng) -> [B]`` per-example losses.
    params: starting params.
    arrays: ``{name: [N, ...]}``, the training rows.
    steps: number of steps (0: ``params`` unchanged).
    batch_size: rows per step.
    tx: the optimizer (e.g. ``optax.adam(1e-3)``).
    rng: key of the minibatch draws.
  """
  if steps < 0 or batch_size < 1:
    raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
  num_rows = jax.tree.leaves(arrays)[0].shape[0]
  if num_rows == 0:
    raise ValueError("no training rows")
  if steps == 0:
    return params, jnp.zeros((0,), jnp.float32)
  loss = oracles.batch_loss(example_loss)

  @jax.jit
  def run(params, arrays, rng):
    def step(carry, key):
      params, opt_state = carry
      key_rows, key_loss = jax.random.split(key)
      rows = jax.random.randint(key_rows, (batch_size,), 0, num_rows)
      batch = {k: v[rows] for k, v in arrays.items()}
      batch["mask"] = jnp.ones((batch_size,), bool)
      value, grads = jax.value_and_grad(loss)(params, batch, key_loss)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       jax.random.split(rng, steps))
    return params, losses

  return run(params, arrays, rng)
