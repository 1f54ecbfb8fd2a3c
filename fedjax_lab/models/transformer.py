"""A tiny causal transformer language model (char or byte level), with optional prompt tuning.

Pre-LN blocks (Radford et al. 2019, GPT-2): ``h += Attn(LN(h))``, ``h += MLP(LN(h))``,
causal multi-head self-attention, learned positions, a final LayerNorm and a dense head.
Every weight matrix is a 2-D ``kernel`` (q, k, v as one ``qkv`` Dense), so LoRA
(``fedjax_lab.lora``) can adapt any of them.

Prompt tuning (Lester, Al-Rfou, Constant, EMNLP 2021): ``num_prompt > 0`` prepends that
many learned embeddings (``params['prompt']``, no position) before the tokens; the real
tokens keep the positions ``0..L-1`` they had without a prompt, so a model pre-trained
with ``num_prompt = 0`` loads unchanged. Logits are returned for the real positions only
(``[B, L, vocab]``), so ``models.text.sequence_loss`` and its evaluator work unchanged.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models import Model, from_linen

_INIT = nn.initializers.normal(0.02)


class CausalSelfAttention(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, h):
    batch, length, width = h.shape
    if width % self.num_heads:
      raise ValueError(f"d_model={width} is not divisible by num_heads={self.num_heads}")
    head = width // self.num_heads
    qkv = nn.Dense(3 * width, kernel_init=_INIT, name="qkv")(h)
    q, k, v = jnp.split(qkv.reshape(batch, length, 3, self.num_heads, head), 3, axis=2)
    q, k, v = (t[:, :, 0] for t in (q, k, v))                # [B, T, H, hd]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head).astype(h.dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return nn.Dense(width, kernel_init=_INIT, name="out")(out.reshape(batch, length, width))


class Block(nn.Module):
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, h):
    h = h + CausalSelfAttention(self.num_heads, name="attn")(nn.LayerNorm(name="ln1")(h))
    u = nn.Dense(self.mlp_ratio * h.shape[-1], kernel_init=_INIT, name="fc")(nn.LayerNorm(name="ln2")(h))
    return h + nn.Dense(h.shape[-1], kernel_init=_INIT, name="proj")(nn.gelu(u))


class TransformerLM(nn.Module):
  """Token ids ``[B, L]`` -> next-token logits ``[B, L, vocab_size]``."""
  vocab_size: int
  num_layers: int = 2
  d_model: int = 32
  num_heads: int = 2
  mlp_ratio: int = 4
  max_len: int = 64
  num_prompt: int = 0

  @nn.compact
  def __call__(self, x):
    batch, length = x.shape
    if length > self.max_len:
      raise ValueError(f"sequence length {length} exceeds the model's max_len={self.max_len}")
    h = nn.Embed(self.vocab_size, self.d_model, embedding_init=_INIT, name="embed")(x)
    h = h + self.param("pos", _INIT, (self.max_len, self.d_model))[:length]
    if self.num_prompt:
      prompt = self.param("prompt", _INIT, (self.num_prompt, self.d_model))
      h = jnp.concatenate([jnp.broadcast_to(prompt, (batch,) + prompt.shape), h], axis=1)
    for i in range(self.num_layers):
      h = Block(self.num_heads, self.mlp_ratio, name=f"block{i}")(h)
    h = nn.LayerNorm(name="ln_f")(h[:, self.num_prompt:])
    return nn.Dense(self.vocab_size, kernel_init=_INIT, name="head")(h)


def transformer_lm(vocab_size: int, num_layers: int = 2, d_model: int = 32, num_heads: int = 2,
                   mlp_ratio: int = 4, max_len: int = 64, num_prompt: int = 0) -> Model:
  """A ``Model`` of ``TransformerLM``; params are its variables dict ``{'params': ...}``."""
  for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers),
                      ("d_model", d_model), ("num_heads", num_heads), ("max_len", max_len)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if num_prompt < 0:
    raise ValueError(f"num_prompt must be >= 0, got {num_prompt}")
  return from_linen(TransformerLM(vocab_size, num_layers, d_model, num_heads, mlp_ratio,
                                  max_len, num_prompt))
