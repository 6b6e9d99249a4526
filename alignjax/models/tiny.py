"""A small pre-norm causal transformer in Flax NNX, trained from scratch.

Used by the embedded default job, tests and notebooks, where a model must be
built locally in seconds. It honours padding masks exactly: padded positions
neither attend nor are attended to, so a sequence's logits do not depend on how
much padding follows it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
  vocab_size: int = 16
  max_len: int = 32
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 128
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "max_len", "d_model", "num_layers", "num_heads", "d_ff"):
      if getattr(self, name) <= 0:
        raise ValueError(f"TinyLMConfig: `{name}` must be positive, got {getattr(self, name)}.")
    if self.d_model % self.num_heads:
      raise ValueError(
          f"TinyLMConfig: `d_model` ({self.d_model}) must be divisible by "
          f"`num_heads` ({self.num_heads})."
      )


class Block(nnx.Module):

  def __init__(self, cfg: TinyLMConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.d_model // cfg.num_heads
    self.attn_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, use_bias=False, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(cfg.d_model, cfg.d_model, use_bias=False, dtype=dtype, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.up = nnx.Linear(cfg.d_model, cfg.d_ff, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(cfg.d_ff, cfg.d_model, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, attn_mask: jax.Array) -> jax.Array:
    B, T, D = x.shape
    q, k, v = jnp.split(self.qkv(self.attn_norm(x)), 3, axis=-1)
    shape = (B, T, self.num_heads, self.head_dim)
    q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
    scores = jnp.where(attn_mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, D)
    x = x + self.out(attn)
    return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nnx.Module):
  """Decoder-only LM: ``tokens [B, T] -> logits [B, T, V]`` (position t predicts t+1)."""

  def __init__(self, cfg: TinyLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.pos = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"TinyLM: `tokens` must be [B, T], got shape {tokens.shape}.")
    B, T = tokens.shape
    if T > self.cfg.max_len:
      raise ValueError(f"TinyLM: sequence length {T} exceeds max_len {self.cfg.max_len}.")
    if attention_mask is None:
      attention_mask = jnp.ones((B, T), bool)
    if attention_mask.shape != tokens.shape:
      raise ValueError(
          f"TinyLM: `attention_mask` {attention_mask.shape} must match `tokens` {tokens.shape}."
      )
    valid = attention_mask.astype(bool)
    causal = jnp.tril(jnp.ones((T, T), bool))
    # Every query attends at least to itself, so padded rows stay finite.
    mask = (causal[None] & valid[:, None, :] & valid[:, :, None]) | jnp.eye(T, dtype=bool)[None]
    positions = jnp.clip(jnp.cumsum(valid, axis=-1) - 1, 0, self.cfg.max_len - 1)
    x = self.embed(tokens) + self.pos(positions)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x)).astype(jnp.float32)
