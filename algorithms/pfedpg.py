"""pFedPG: a server-side generator of client-specific prompts for a frozen pre-trained model.

Yang, Wang, Wang. "Efficient Model Personalization in Federated Learning via
Client-Specific Prompt Generation", ICCV 2023 (arXiv 2308.15367), Sec. 3. The backbone
is frozen; what is tuned is a prompt P [m, d] (m embeddings prepended to the input).
The server holds a prompt generator G (parameters phi), a client-agnostic prompt basis
P_base and a bank of client descriptors D = {d_n} (d_n [m, d]):

    generation:  P_n = G(d_n) = P_base + softmax((d_n W_q)(P_base W_k)^T / sqrt(h))
                                         (P_base W_v) W_o       cross-attention, query d_n
    adaptation:  client n starts from P_n and takes its local SGD steps on its own data:
                 P~_n; it uploads Delta P_n = P~_n - P_n (the local optimisation direction)
    update:      the server treats Delta P_n as the descent direction of its output P_n
                 and back-propagates it through G (the chain rule of pFedHN, Shamsian et
                 al. 2021, on which the paper builds):
                     {phi, P_base} <- {phi, P_base} + beta sum_n p_n (dP_n/d{phi, P_base})^T Delta P_n
                     d_n           <- d_n           + beta (dP_n/dd_n)^T Delta P_n

In the engine: ``ServerState.params`` is ``{'base': P_base (the prompt tree), 'attn':
{query, key, value, out}}``; client n's descriptor is its row of the client-state table;
each client's message is the vector-Jacobian product (dP_n/d{phi, P_base})^T Delta P_n
(computed where Delta P_n is, the same numbers as the server's step), so the weighted
mean (p_n = n_n / sum n) and ``server_tx = sgd(beta)`` give the update above, and any
optax ``server_tx`` can replace it; the descriptor takes its SGD step with rate beta.
The uplink in the paper is Delta P_n (m d floats).

Choices of ours, named: W_o starts at zero, so every generated prompt starts at P_base =
the pre-trained prompt (as every fine-tuning variant here starts at the pre-trained
model) and the first round moves P_base as FedAvg on prompts does; the linear maps have
no bias; every descriptor starts at the same random draw (the table's rows start equal),
so the descriptors part as their clients' Delta P differ. The paper's clients also train
a personal classification head; the language model here has none to train (its output
layer is part of the frozen backbone). Client n is evaluated (``personalize``) with its
generated prompt adapted on its train split (``eval_adapt``, the paper's personalized
prompt; the same fine-tuning as ``local_finetune`` gives the FedAvg prompt), or with
P_n itself (``eval_adapt=False``); the global model is the backbone with P_base.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from algorithms.fedavg import schedule_from_config
from fedjax_lab import hyperparams
from fedjax_lab import oracles
from fedjax_lab import personalization as pers
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.models import Model


def prompt_leaf(tree) -> jax.Array:
  """The one ``[m, d]`` leaf of a prompt tree (prompt tuning's trainable tree)."""
  leaves = jax.tree.leaves(tree)
  if len(leaves) != 1 or jnp.ndim(leaves[0]) != 2:
    shapes = [tuple(jnp.shape(x)) for x in leaves]
    raise ValueError(f"pFedPG generates prompt embeddings: the trainable tree must be one "
                     f"[m, d] leaf (finetune='prompt'), got leaves of shapes {shapes}.")
  return leaves[0]


def init_generator(base_tree, key, attn_dim: Optional[int] = None) -> dict:
  """phi_0: ``base`` = the prompt tree, W_q, W_k, W_v ~ N(0, 1/d) ``[d, h]``, W_o = 0 ``[h, d]``."""
  d = prompt_leaf(base_tree).shape[1]
  h = int(attn_dim or d)
  if h < 1:
    raise ValueError(f"attn_dim must be >= 1, got {attn_dim}.")
  keys = jax.random.split(key, 3)
  draw = lambda k: jax.random.normal(k, (d, h), jnp.float32) / np.sqrt(d)
  return {"base": base_tree,
          "attn": {"query": draw(keys[0]), "key": draw(keys[1]), "value": draw(keys[2]),
                   "out": jnp.zeros((h, d), jnp.float32)}}


def init_descriptor(generator: dict, key) -> jax.Array:
  """d_n ``[m, d]`` ~ U(+-sqrt(6 / d)) (xavier-uniform bound)."""
  m, d = prompt_leaf(generator["base"]).shape
  bound = np.sqrt(6.0 / d)
  return jax.random.uniform(key, (m, d), jnp.float32, -bound, bound)


def generate(generator: dict, descriptor: jax.Array):
  """P_n = P_base + Attn(query d_n, keys and values P_base), as the prompt tree."""
  base = prompt_leaf(generator["base"])
  a = generator["attn"]
  q, k, v = descriptor @ a["query"], base @ a["key"], base @ a["value"]
  weights = jax.nn.softmax(q @ k.T / np.sqrt(q.shape[-1]).astype(np.float32), axis=-1)
  prompt = base + (weights @ v) @ a["out"]
  return jax.tree.unflatten(jax.tree.structure(generator["base"]), [prompt])


def generator_step_inputs(generator: dict, descriptor, adapted) -> tuple:
  """``(J_phi^T dP, J_d^T dP)`` with dP = adapted - G(d): the chain rule of the update."""
  prompt, vjp = jax.vjp(generate, generator, descriptor)
  change = jax.tree.map(jnp.subtract, adapted, prompt)
  return vjp(change)


def generator_model(tuned: Model, base_tree, key, attn_dim: Optional[int] = None
                    ) -> tuple[Model, dict]:
  """The run's global model on the generator's params: ``tuned`` with the prompt ``base``."""
  generator = init_generator(base_tree, key, attn_dim)
  return Model(init=lambda rng, x: generator,
               apply=lambda phi, x: tuned.apply(phi["base"], x)), generator


def pfedpg(example_loss, client_lr: float, generator_lr: float = 1.0, eval_adapt: bool = True,
           finetune_lr=None, finetune_epochs: int = 1, finetune_batch_size=None,
           descriptor_seed: int = 0, schedule: LocalSchedule = LocalSchedule(),
           weighting: str = "num_examples") -> FederatedAlgorithm:
  """pFedPG; ``example_loss`` takes the prompt tree (``lora.subset_model``'s params).

  ``generator_lr`` is beta (the generator's SGD rate, also the descriptors'); the local
  adaptation is SGD(``client_lr``) on the schedule.
  """
  hyperparams.check(generator_lr, lambda lr: lr >= 0.0,
                    f"pFedPG's generator_lr must be >= 0, got {generator_lr}.")
  if finetune_epochs < 1:
    raise ValueError(f"finetune_epochs must be >= 1, got {finetune_epochs}.")
  oracle = oracles.first_order(example_loss)
  adapt = pers.local_finetuning(
      oracle, optax.sgd(client_lr if finetune_lr is None else finetune_lr),
      LocalSchedule(batch_size=finetune_batch_size, epochs=finetune_epochs))

  def init_local_params(message_down, descriptor):
    return generate(message_down["params"], descriptor)

  def client_final(local, message_down, descriptor):
    g_phi, g_d = generator_step_inputs(message_down["params"], descriptor, local.params)
    return {"delta": g_phi}, descriptor + generator_lr * g_d

  def personalize(generator, descriptor, data, size, rng):
    prompt = generate(generator, descriptor)
    if eval_adapt:
      prompt = adapt(prompt, None, data, size, rng)
    return {**generator, "base": prompt}

  return FederatedAlgorithm(
      name="pfedpg", oracle=oracle, client_tx=optax.sgd(client_lr),
      server_tx=optax.sgd(generator_lr), schedule=schedule, weighting=weighting,
      init_client_state=lambda generator: init_descriptor(
          generator, jax.random.PRNGKey(descriptor_seed)),
      init_local_params=init_local_params, client_final=client_final,
      personalize=personalize)


def from_config(config, example_loss):
  return pfedpg(example_loss, config.client_lr, config.server_lr,
                bool(config.get("pfedpg_eval_adapt", True)),
                config.get("finetune_lr") or None, config.get("finetune_epochs", 1),
                config.get("batch_size") or None, config.get("seed", 0),
                schedule_from_config(config), config.get("weighting", "num_examples"))
