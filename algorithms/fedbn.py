"""FedBN: batch-normalisation layers stay local; everything else is averaged.

Li, Jiang, Zhang, Kamp, Dou. "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR 2021 (Algorithm 1): clients run FedAvg's local SGD on a
model with BN layers; the server averages every parameter except the BN layers'
(scale gamma, bias beta) and running statistics (mean, var), which each client keeps:

    w^{t+1}_{non-BN} = sum_k p_k w_k^{non-BN}      w_k^{BN}, stats_k stay on client k

Client k's BN parameters and statistics are its row of the client-state table;
local training normalises with the batch statistics of the batch's real examples
and updates the running ones (flax ``BatchNorm``, momentum 0.9); client k is
evaluated with its own BN layers and running statistics. Needs a model with BN
layers (``fedjax_lab.models.batchnorm.mlp_bn``, ``--config.model=mlp_bn``).
"""
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from algorithms.fedavg import schedule_from_config
from fedjax_lab import oracles
from fedjax_lab import personalization as pers
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import GradientOracle


def bn_layers(variables) -> tuple:
  """``'batch_stats'`` and the names of the BatchNorm layers in a flax variables dict."""
  if "batch_stats" not in variables:
    raise ValueError("FedBN needs a model with batch normalisation (variables with "
                     "'batch_stats'), e.g. --config.model=mlp_bn.")
  names = {str(k) for path in traverse_util.flatten_dict(variables) for k in path
           if str(k).startswith("BatchNorm")}
  return ("batch_stats",) + tuple(sorted(names))


def bn_train_oracle(model) -> GradientOracle:
  """Softmax cross-entropy with batch statistics; the oracle state is the running stats.

  Gradients are taken in ``variables['params']`` (those of ``'batch_stats'`` are zero);
  the updated running statistics come back as the new oracle state.
  """
  def update(variables, batch, rng, stats):
    del rng
    def loss(params):
      logits, new = model.apply({"params": params, "batch_stats": stats}, batch["x"], train=True,
                                mask=batch["mask"], mutable=["batch_stats"])
      values = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return oracles.masked_mean(values, batch["mask"]), new["batch_stats"]
    (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    grads = {"params": grads,
             "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"])}
    return grads, {"loss": value}, new_stats

  return GradientOracle(init=lambda variables: variables["batch_stats"], update=update)


def fedbn(model, client_lr: float, server_lr: float = 1.0,
          schedule: LocalSchedule = LocalSchedule(), weighting: str = "num_examples"
          ) -> FederatedAlgorithm:
  def init_client_state(variables):
    return pers.take_layers(variables, bn_layers(variables))

  def init_local_params(message_down, row):
    return pers.put_layers(message_down["params"], row)

  def client_final(local, message_down, row):
    names = bn_layers(local.params)
    trained = pers.put_layers(local.params, {"batch_stats": local.oracle_state})
    delta = jax.tree.map(jnp.subtract, trained, message_down["params"])
    return {"delta": pers.zero_layers(delta, names)}, pers.take_layers(trained, names)

  return FederatedAlgorithm(
      name="fedbn", oracle=bn_train_oracle(model), client_tx=optax.sgd(client_lr),
      server_tx=optax.sgd(server_lr), schedule=schedule, weighting=weighting,
      init_client_state=init_client_state, init_local_params=init_local_params,
      init_oracle_state=lambda message_down, row: row["batch_stats"],
      client_final=client_final,
      personalize=lambda global_params, row, data, size, rng: pers.put_layers(global_params, row))


def from_config(config, example_loss, model=None):
  del example_loss   # the BN oracle needs the model's training mode
  if model is None:
    raise ValueError("fedbn needs the model (algorithms.build(..., model=model)).")
  return fedbn(model, config.client_lr, config.server_lr, schedule_from_config(config),
               config.get("weighting", "num_examples"))
