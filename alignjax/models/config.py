"""One frozen configuration for every decoder family alignjax runs.

A `ModelConfig` describes the architecture (what transformers' `config.json` says) plus
the numerics (compute dtype, parameter dtype, rematerialisation policy). The per-family
adapters in `alignjax.models.families` translate Hugging Face configs into it and back.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def dtype_name(dtype, *, where: str) -> str:
  """Canonical name ("float32", "bfloat16", ...) of a jnp dtype or dtype name; ValueError otherwise."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"{where}: expected a floating dtype in {DTYPES}, got {dtype!r}.")
  return name


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Architecture and numerics of one decoder-only transformer.

  The family fixes the block layout (norm type, MLP type, positional scheme, where the
  norms sit); the numeric fields are what the Hugging Face config gives.
  """

  family: str = "llama"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  norm_eps: float = 1e-6
  activation: str = "silu"
  # Rotary embeddings (all families but gpt2).
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  # Biases: q/k/v projections, output projection, MLP.
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  # Attention variants.
  query_pre_attn_scalar: float | None = None  # scale = this ** -0.5 (else head_dim ** -0.5)
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None  # per layer; None -> all full attention
  tie_embeddings: bool = False
  # Tokens (kept for export).
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Numerics.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  # Layers: False -> one module per layer; True -> block parameters stacked along a leading
  # "layers" axis and run under `nnx.scan` (compile time and HLO size independent of depth).
  scan_layers: bool = False

  def __post_init__(self):
    where = "ModelConfig"
    if self.family not in FAMILIES:
      raise ValueError(f"{where}: `family` must be one of {FAMILIES}, got {self.family!r}.")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: `{name}` must be a positive int, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"{where}: `num_heads` ({self.num_heads}) must be a multiple of `num_kv_heads` "
          f"({self.num_kv_heads}).")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"{where}: `activation` must be one of {ACTIVATIONS}, got {self.activation!r}.")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"{where}: `rope_type` must be one of {ROPE_TYPES}, got {self.rope_type!r}.")
    if self.head_dim % 2 and self.family != "gpt2":
      raise ValueError(f"{where}: `head_dim` must be even for rotary embeddings, got {self.head_dim}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"{where}: `remat` must be one of {REMAT_POLICIES}, got {self.remat!r}.")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"{where}: `scan_layers` must be a bool, got {self.scan_layers!r}.")
    object.__setattr__(self, "dtype", dtype_name(self.dtype, where=f"{where}.dtype"))
    object.__setattr__(self, "param_dtype", dtype_name(self.param_dtype, where=f"{where}.param_dtype"))
    if self.layer_types is not None:
      layer_types = tuple(self.layer_types)
      if len(layer_types) != self.num_layers or any(t not in LAYER_TYPES for t in layer_types):
        raise ValueError(
            f"{where}: `layer_types` must list {self.num_layers} entries from {LAYER_TYPES}, "
            f"got {self.layer_types!r}.")
      object.__setattr__(self, "layer_types", layer_types)
      if "sliding_attention" in layer_types and self.sliding_window is None:
        raise ValueError(f"{where}: `layer_types` has sliding layers but `sliding_window` is None.")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"{where}: `sliding_window` must be positive or None, got {self.sliding_window}.")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"{where}: `{name}` must be positive or None, got {value}.")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  # Derived layout, fixed by the family.
  @property
  def norm_type(self) -> str:
    """"layernorm" (gpt2), "rms_one_plus" (gemma: x * (1 + w)), or "rms"."""
    if self.family == "gpt2":
      return "layernorm"
    return "rms_one_plus" if self.family in ("gemma", "gemma2") else "rms"

  @property
  def gated_mlp(self) -> bool:
    return self.family != "gpt2"

  @property
  def learned_positions(self) -> bool:
    return self.family == "gpt2"

  @property
  def post_norms(self) -> bool:
    """Gemma 2 normalises the attention and MLP outputs too (pre + post norms)."""
    return self.family == "gemma2"

  @property
  def scale_embeddings(self) -> bool:
    """Gemma multiplies the embeddings by sqrt(hidden_size)."""
    return self.family in ("gemma", "gemma2")

  @property
  def attention_scale(self) -> float:
    base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
    return float(base) ** -0.5

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of layer `layer`, or None for full attention."""
    if self.sliding_window is None:
      return None
    if self.layer_types is None:
      return self.sliding_window
    return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    D, F, V, H, K, Dh = (self.hidden_size, self.intermediate_size, self.vocab_size, self.num_heads,
                         self.num_kv_heads, self.head_dim)
    attn = D * Dh * (2 * H + 2 * K)
    mlp = (3 if self.gated_mlp else 2) * D * F
    norms = (4 if self.post_norms else 2) * D
    per_layer = attn + mlp + norms
    total = self.num_layers * per_layer + V * D + D + (0 if self.tie_embeddings else V * D)
    if self.learned_positions:
      total += self.max_position_embeddings * D
    return total

  # Presets.
  @classmethod
  def llama_tiny(cls, **overrides) -> "ModelConfig":
    """A tiny Llama (~0.16M parameters): tests, notebooks and the embedded default job."""
    kw = dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=256, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
              rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def llama_100m(cls, **overrides) -> "ModelConfig":
    """A ~100M-parameter Llama (benchmarks): 12 layers, hidden 768, GQA 12/4, vocab 32000."""
    kw = dict(family="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
              num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
              max_position_embeddings=2048, rope_theta=500000.0, norm_eps=1e-5,
              tie_embeddings=True)
    kw.update(overrides)
    return cls(**kw)
