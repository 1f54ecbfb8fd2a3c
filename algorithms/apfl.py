"""APFL: each client mixes a personal model with the global one, and learns the mix.

Deng, Kamani, Mahdavi. "Adaptive Personalized Federated Learning", arXiv 2003.13461
(Algorithm 1, eqs. 6, 8 and 10). Client i keeps v_i and alpha_i; at each local step

    w     <- w - eta grad f_i(w)                                       (local FedAvg model)
    vbar   = alpha v + (1 - alpha) w                                   (eq. 6)
    v     <- v - eta grad_v f_i(vbar) = v - eta alpha grad f_i(vbar)   (eq. 8)
    alpha <- clip(alpha - eta_alpha <v - w, grad f_i(vbar)>, 0, 1)      (eq. 10)

and the server averages w. Client i is evaluated with alpha_i v_i + (1 - alpha_i) w,
w the global model. (v_i, alpha_i) live in the client-state table; v_i starts as
w^0 and alpha_i as ``alpha_init`` (0.5 by default, a choice of ours: the paper's
experiments report several fixed and adaptive starts).
"""
import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import GradientOracle


def mix(alpha, v, w):
  """``alpha v + (1 - alpha) w`` (eq. 6)."""
  return jax.tree.map(lambda a, b: alpha * a + (1.0 - alpha) * b, v, w)


def apfl_oracle(example_loss) -> GradientOracle:
  """Gradients for ``{'w', 'v', 'alpha'}``: grad f(w); alpha grad f(vbar); <v - w, grad f(vbar)>."""
  loss = oracles.batch_loss(example_loss)

  def update(params, batch, rng, state):
    value, g_w = jax.value_and_grad(loss)(params["w"], batch, rng)
    # w enters vbar as a constant: only f(w) moves w (eq. 8 differentiates in v and alpha).
    w_const = jax.lax.stop_gradient(params["w"])
    mixed = lambda v, alpha: loss(mix(alpha, v, w_const), batch, rng)
    personal_value, (g_v, g_alpha) = jax.value_and_grad(mixed, argnums=(0, 1))(
        params["v"], params["alpha"])
    return ({"w": g_w, "v": g_v, "alpha": g_alpha},
            {"loss": value, "personal_loss": personal_value}, state)

  return GradientOracle(init=lambda params: (), update=update)


def apfl_sgd(lr, alpha_lr) -> optax.GradientTransformation:
  """SGD on w and v with ``lr``, projected SGD on alpha in [0, 1] with ``alpha_lr``."""
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("apfl_sgd needs params (alpha is projected on [0, 1]).")
    step = jax.tree.map(lambda g: -lr * g, {"w": updates["w"], "v": updates["v"]})
    alpha = jnp.clip(params["alpha"] - alpha_lr * updates["alpha"], 0.0, 1.0)
    return {**step, "alpha": alpha - params["alpha"]}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def apfl(example_loss, client_lr: float, alpha_lr: float = 0.1, alpha_init: float = 0.5,
         server_lr: float = 1.0, schedule: LocalSchedule = LocalSchedule(),
         weighting: str = "num_examples") -> FederatedAlgorithm:
  if not 0.0 <= alpha_init <= 1.0:
    raise ValueError(f"APFL's alpha_init must be in [0, 1], got {alpha_init}.")

  def init_client_state(params):
    return {"v": params, "alpha": jnp.asarray(alpha_init, jnp.float32)}

  def init_local_params(message_down, row):
    return {"w": message_down["params"], "v": row["v"], "alpha": row["alpha"]}

  def client_final(local, message_down, row):
    delta = jax.tree.map(jnp.subtract, local.params["w"], message_down["params"])
    return {"delta": delta}, {"v": local.params["v"], "alpha": local.params["alpha"]}

  def personalize(global_params, row, data, size, rng):
    return mix(row["alpha"], row["v"], global_params)

  return FederatedAlgorithm(
      name="apfl", oracle=apfl_oracle(example_loss), client_tx=apfl_sgd(client_lr, alpha_lr),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      init_client_state=init_client_state, init_local_params=init_local_params,
      client_final=client_final, personalize=personalize)


def from_config(config, example_loss):
  return apfl(example_loss, config.client_lr, config.get("apfl_alpha_lr", 0.1),
              config.get("apfl_alpha_init", 0.5), config.server_lr,
              schedule_from_config(config), config.get("weighting", "num_examples"))
