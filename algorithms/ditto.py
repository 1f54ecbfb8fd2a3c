"""Ditto: a personal model per client, kept near the global one by a proximal term.

Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021 (Algorithm 1, objective eq. 2):

    global (FedAvg):  w_k <- w_k - eta grad F_k(w_k)             from w^t, s local steps
    personal:         v_k <- v_k - eta_v (grad F_k(v_k) + lambda (v_k - w^t))     (eq. 2)
    server:           w^{t+1} = w^t + sum_k p_k (w_k - w^t)

v_k lives in client k's row of the client-state table (``[N, ...]``, on the device
or on the host), starts as w^0, and is the model client k is evaluated with. Both
models take their steps on the same batches of the round (the authors' code trains
v_k then w_k on the client's data; the two updates do not depend on each other).
"""
import jax
import jax.numpy as jnp
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import oracles
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import GradientOracle, stateless_with_extra_args


def two_models_oracle(example_loss) -> GradientOracle:
  """Gradients of F_k at ``params['global']`` and ``params['personal']`` on one batch.

  ``aux['loss']`` is the global model's loss (the round's ``train_loss``);
  ``aux['personal_loss']`` the personal model's.
  """
  loss = oracles.batch_loss(example_loss)

  def update(params, batch, rng, state):
    value, g_global = jax.value_and_grad(loss)(params["global"], batch, rng)
    personal_value, g_personal = jax.value_and_grad(loss)(params["personal"], batch, rng)
    return ({"global": g_global, "personal": g_personal},
            {"loss": value, "personal_loss": personal_value}, state)

  return GradientOracle(init=lambda params: (), update=update)


def ditto_proximal(lam, personal_scale=1.0) -> optax.GradientTransformationExtraArgs:
  """Adds ``lambda (v - w^t)`` to the personal model's gradient (eq. 2) and scales it by
  ``personal_scale`` (eta_v / eta); the global model's gradient passes unchanged."""
  def fn(updates, params, global_params):
    personal = jax.tree.map(lambda g, v, w: personal_scale * (g + lam * (v - w)),
                            updates["personal"], params["personal"], global_params)
    return {"global": updates["global"], "personal": personal}

  return stateless_with_extra_args(fn, "ditto_proximal()", ("global_params",), needs_params=True)


def ditto(example_loss, client_lr: float, lam: float, personal_lr=None, server_lr: float = 1.0,
          schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
          ) -> FederatedAlgorithm:
  """Ditto with local SGD(``client_lr``) on w, SGD(``personal_lr``, default ``client_lr``) on v."""
  if lam < 0:
    raise ValueError(f"Ditto's lambda must be >= 0, got {lam}.")
  scale = 1.0 if personal_lr is None else personal_lr / client_lr

  def init_local_params(message_down, personal):
    return {"global": message_down["params"], "personal": personal}

  def client_final(local, message_down, personal):
    delta = jax.tree.map(jnp.subtract, local.params["global"], message_down["params"])
    return {"delta": delta}, local.params["personal"]

  return FederatedAlgorithm(
      name="ditto", oracle=two_models_oracle(example_loss),
      client_tx=optax.chain(ditto_proximal(lam, scale), optax.sgd(client_lr)),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      init_client_state=lambda params: params, init_local_params=init_local_params,
      client_final=client_final,
      personalize=lambda global_params, personal, data, size, rng: personal)


def from_config(config, example_loss):
  return ditto(example_loss, config.client_lr, config.get("ditto_lambda", 0.1),
               config.get("personal_lr") or None, config.server_lr,
               schedule_from_config(config), config.get("weighting", "num_examples"))
