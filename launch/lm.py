"""Config -> a pre-trained transformer LM fine-tuned federatedly (full, LoRA or prompt).

``common.build`` hands a config with a ``finetune`` key here. Steps:

1. text: a public text (``fedjax_lab.data.corpus.public_texts``) and the clients' text,
   ``config.data = 'corpus'`` (generated, per-client styles) or ``'leaf:PATH'`` (LEAF
   Shakespeare json: each user's snippets); each client's last ``test_fraction`` of
   texts is held out, and the pooled held-out rows are the test set;
2. one fixed char vocabulary, the 95 printable ASCII characters (other characters are
   out of vocabulary), so pre-training and every client's text share it;
3. pre-training: ``centralized.train`` (Adam) of ``transformer_lm`` on the public text;
   The model carries ``prompt_length`` prompt embeddings, pre-trained with it;
4. the fine-tuned model (``config.finetune``): ``full`` (every parameter), ``lora``
   (``lora.lora_model``, rank ``lora_rank``, alpha ``lora_alpha``, all dense kernels) or
   ``prompt`` (only the prompt embeddings, Lester et al. 2021, started from the
   pre-trained ones; ``lora.subset_model``); its params are the trainable tree only, so
   any registered method (fedavg, fedprox, fedkseed, ...) trains it, and every variant
   starts at the pre-trained model.

Each client's held-out texts are also its own test split (``info.client_test``), so the
summary has per-client losses (``personal_loss_mean``, ``_p10``, ``_p90``; the global
model, or the method's ``personalize``). ``pfedpg`` (the prompt generator of Yang et al.
2023) runs on ``finetune='prompt'``: the server's params are its generator.

``report`` adds the message sizes to the summary: ``uplink_bytes_per_client_round``
(the trainable tree, or FedKSeed's 8 bytes a local step) next to
``full_finetune_uplink_bytes`` (the whole model's).
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import algorithms
from fedjax_lab import centralized
from fedjax_lab import data as data_lib
from fedjax_lab import lora
from fedjax_lab.data import corpus
from fedjax_lab.data import text as text_lib
from fedjax_lab.models import text as text_models
from fedjax_lab.models import transformer
from launch import common
from launch import compression as compression_launch
from launch import robust

FINETUNE = ("full", "lora", "prompt")


@dataclasses.dataclass
class LMInfo(data_lib.DataInfo):
  """``DataInfo`` plus what pre-training produced."""
  pretrain_loss: Optional[float] = None       # mean of the last 10 pre-training steps' losses
  full_finetune_uplink_bytes: int = 0         # the whole model's bytes (full fine-tuning's message)


def client_texts(config) -> tuple[list, list[list[str]]]:
  """``(names, [texts of client i])`` of ``config.data``: ``'corpus'`` or ``'leaf:PATH'``."""
  if config.data == "corpus":
    texts = corpus.client_texts(config.num_clients, config.texts_per_client, config.data_seed,
                                style=config.get("corpus_style", 0.3))
    return list(range(len(texts))), texts
  if isinstance(config.data, str) and config.data.startswith("leaf:"):
    from fedjax_lab.data import leaf_source
    names, clients = leaf_source.read_leaf(config.data[len("leaf:"):])
    if leaf_source.detect_task(clients[0]) != "shakespeare":
      raise ValueError(f"{config.data}: fine-tuning a language model needs LEAF Shakespeare "
                       f"(string x, next-character y)")
    return names, [[x + y for x, y in zip(c["x"], c["y"])] for c in clients]
  raise ValueError(f"unknown data {config.data!r} for LM fine-tuning; use 'corpus' or 'leaf:PATH'")


def ascii_vocabulary() -> text_lib.Vocabulary:
  """The printable ASCII characters, space to '~' (ids 3..97, OOV 98)."""
  return text_lib.Vocabulary(tuple(chr(c) for c in range(32, 127)), "char")


def _split(texts: list, fraction: float) -> tuple[list, list]:
  if len(texts) < 2:
    raise ValueError(f"a client needs >= 2 texts to hold some out, got {len(texts)}")
  held = min(max(1, int(round(fraction * len(texts)))), len(texts) - 1)
  return texts[:-held], texts[-held:]


def _transformer(config, vocab):
  return transformer.transformer_lm(vocab.size, config.lm_layers, config.lm_d_model,
                                    config.lm_heads, max_len=config.sequence_length,
                                    num_prompt=config.prompt_length)


def pretrained_lm(config, vocab: text_lib.Vocabulary, public: list):
  """``(model, params, losses)``: ``transformer_lm`` pre-trained on ``public``.

  The model has ``prompt_length`` prompt embeddings, pre-trained with it (a learned
  prefix), so prompt tuning starts from the pre-trained model itself.
  """
  if config.prompt_length < 0:
    raise ValueError(f"prompt_length must be >= 0, got {config.prompt_length}")
  model = _transformer(config, vocab)
  rows = text_lib.char_sequences(public, vocab, config.sequence_length)
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed + 1), rows["x"][:1])
  params, losses = centralized.train(
      text_models.sequence_loss(model), params, {k: jnp.asarray(v) for k, v in rows.items()},
      config.pretrain_steps, config.pretrain_batch_size, optax.adam(config.pretrain_lr),
      jax.random.PRNGKey(config.seed + 2))
  return model, params, losses


def finetuned_model(config, model, params):
  """``(fine-tuned model, its initial trainable params)``; every variant starts at ``params``."""
  kind = config.finetune
  if kind not in FINETUNE:
    raise ValueError(f"unknown finetune {kind!r}; choose one of {', '.join(FINETUNE)}")
  if kind == "full":
    return model, params
  if kind == "lora":
    tuned = lora.lora_model(model, params, config.lora_rank, config.get("lora_alpha") or None)
    return tuned, tuned.init(jax.random.PRNGKey(config.seed + 3), None)
  if config.prompt_length < 1:
    raise ValueError(f"prompt tuning needs prompt_length >= 1, got {config.prompt_length}")
  tuned = lora.subset_model(model, params, lora.named("prompt"))
  return tuned, tuned.init(None, None)


def build(config) -> common.Experiment:
  if config.finetune not in FINETUNE:   # before any text or pre-training
    raise ValueError(f"unknown finetune {config.finetune!r}; choose one of {', '.join(FINETUNE)}")
  if config.algorithm == "pfedpg" and config.finetune != "prompt":
    raise ValueError(f"pFedPG generates prompts: it needs finetune='prompt', got "
                     f"{config.finetune!r}")
  names, texts = client_texts(config)
  split = [_split(t, config.get("test_fraction", 0.2)) for t in texts]
  public = corpus.public_texts(config.public_texts, config.data_seed)
  vocab = ascii_vocabulary()
  train_data, _ = text_lib.federated_text([train for train, _ in split], vocab,
                                          config.sequence_length)
  test_arrays = text_lib.char_sequences([s for _, test in split for s in test], vocab,
                                        config.sequence_length)
  # The same held-out texts per client: each client's own test split.
  client_test, _ = text_lib.federated_text([test for _, test in split], vocab,
                                           config.sequence_length)
  model, params, losses = pretrained_lm(config, vocab, public)
  tuned, init_params = finetuned_model(config, model, params)
  example_loss = text_models.sequence_loss(tuned)
  method = algorithms.build(config.algorithm, config, example_loss, model=tuned)
  if config.algorithm == "pfedpg":
    # The server's params are the prompt generator; its global model uses P_base.
    tuned, init_params = algorithms.pfedpg.generator_model(
        tuned, init_params, jax.random.PRNGKey(config.seed + 4),
        config.get("pfedpg_attn_dim") or None)
  evaluate = text_models.make_sequence_evaluator(tuned)
  method = robust.apply_robustness(method, config, train_data.num_clients)
  method = compression_launch.apply_compression(method, config)
  info = LMInfo("next_token", vocab.size, vocab, names, f"lm:{config.data}",
                pretrain_loss=float(np.mean(np.asarray(losses)[-10:])) if len(losses) else None,
                full_finetune_uplink_bytes=lora.tree_bytes(params), client_test=client_test)
  return common.Experiment(method, tuned, train_data, test_arrays, init_params, evaluate, None,
                           info, example_loss)


def report(config, exp: common.Experiment) -> dict:
  """Message sizes and the fine-tuning setup, for the run's summary."""
  extra = {}
  if config.algorithm == "fedkseed":
    uplink = algorithms.fedkseed.uplink_bytes(config)
    extra = {"kseed_sampling": config.get("kseed_sampling", "uniform")}
  elif config.algorithm == "pfedpg":
    uplink = lora.tree_bytes(exp.init_params["base"])   # Delta P_n, the prompt's size
  else:
    uplink = lora.tree_bytes(exp.init_params)
  return {"finetune": config.finetune, "uplink_bytes_per_client_round": uplink,
          "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(exp.init_params))),
          "pretrain_loss": exp.info.pretrain_loss,
          "full_finetune_uplink_bytes": exp.info.full_finetune_uplink_bytes, **extra}
