"""The one decoder: attention (GQA, RoPE variants, sliding windows, soft-capping), MLPs,
norms and a static KV cache, driven by `ModelConfig`.

It computes what transformers computes for Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 and
GPT-2 (see `alignjax.models.families` for the config and weight adapters). Every
parameter carries logical axis names (metadata key ``out_sharding``, never mesh axes);
`alignjax.sharding` maps them to the mesh with one rule table.

References: RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864, Eq. 34, half-split layout
as in transformers); grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245);
Llama 3.1 RoPE scaling (Meta 2024, "The Llama 3 Herd of Models", arXiv:2407.21783);
Gemma 2 soft-capping, local/global layers and pre+post norms (Gemma Team 2024,
arXiv:2408.00118); GPT-2 (Radford et al. 2019).

Padding: positions default to ``cumsum(mask) - 1`` and padded keys are never attended to,
so a left- or right-padded row scores exactly like the unpadded row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from alignjax.models.config import ModelConfig

_NEG = float(np.finfo(np.float32).min)


def _param(rngs: nnx.Rngs | None, shape, names, dtype, *, init: str = "normal", std=0.02):
  """An nnx.Param with logical axis names (not eagerly sharded)."""
  if init == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class KVCache(NamedTuple):
  """Static-shape KV cache.

  k, v: tuples (one entry per layer) of keys [B, Hkv, Dh, S] and values [B, Hkv, S, Dh]
  in the compute dtype, or, for a model with ``scan_layers``, one stacked [L, ...] array
  each (laid out so that a decode step's attention products read them in place, see
  ``Attention``);
  positions [B, S] int32 (position of each written slot); valid [B, S] bool (slot holds a
  real token); length: int32 scalar, slots written so far (same for every row).
  """
  k: tuple
  v: tuple
  positions: jax.Array
  valid: jax.Array
  length: jax.Array


# ---------------------------------------------------------------------------- numerics
def _activation(name: str):
  return {
      "silu": jax.nn.silu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
  }[name]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [Dh/2] in float32, as transformers' rope init functions.

  "default": θ^(-2i/d); "linear": divided by the factor; "llama3": Llama 3.1's
  wavelength-dependent interpolation (low frequencies / factor, smooth in between).
  """
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  if cfg.rope_type == "linear":
    inv = (inv / np.float32(cfg.rope_factor)).astype(np.float32)
  elif cfg.rope_type == "llama3":
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position_embeddings
    lo_wavelen, hi_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, half-split layout: x [B,T,H,Dh], positions [B,T].

  Angles, cos/sin and the rotation are computed in float32 and the result cast back to
  x's dtype once (transformers rounds cos/sin to bf16 and rotates in bf16: at positions
  in the thousands the rounded angles' error is what bf16 RoPE loses).
  """
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = jnp.cos(emb)[:, :, None]
  sin = jnp.sin(emb)[:, :, None]
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


class Norm(nnx.Module):
  """RMSNorm (x·w, or Gemma's x·(1+w)) or LayerNorm, over the last axis, math in float32."""

  def __init__(self, dim: int, cfg: ModelConfig, *, names=("norm",)):
    self.kind = cfg.norm_type
    self.eps = cfg.norm_eps
    pdt = jnp.dtype(cfg.param_dtype)
    init = "zeros" if self.kind == "rms_one_plus" else "ones"
    self.scale = _param(None, (dim,), names, pdt, init=init)
    self.bias = _param(None, (dim,), names, pdt, init="zeros") if self.kind == "layernorm" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    if self.kind == "layernorm":
      mean = xf.mean(-1, keepdims=True)
      var = jnp.square(xf - mean).mean(-1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
      return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
    if self.kind == "rms_one_plus":  # Gemma: (x * (1 + w)) in float32, then cast.
      return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    # Llama: cast the normalised x to the input dtype, then multiply by the weight.
    return (self.scale[...] * y.astype(x.dtype)).astype(x.dtype)


@jax.custom_vjp
def _bf16_cpu_product(x: jax.Array, w: jax.Array) -> jax.Array:
  """bf16 ``x [M, K] . w [K, N]`` for XLA's CPU backend: every matmul bf16 x bf16 -> float32.

  XLA's CPU backend runs a bf16 x bf16 -> bf16 dot as a float32 one (the operands
  upcast: ~0.2 TFLOP/s on a 2-core AMX Xeon), while bf16 x bf16 -> float32 goes to
  YNNPACK's bf16 kernels (~1.1-1.4 TFLOP/s; `bench/dpo_step.py --dtype=bfloat16`
  prints both). So the product and both gradient products accumulate in float32 and
  are rounded to bf16 once, as the plain bf16 dot's are. The weight gradient x^T dy
  is written as a batch of one over an explicitly transposed x (an optimization
  barrier keeps XLA from folding the transpose back into the dot, which would send
  it to the float32 path again).
  """
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_cpu_product_fwd(x, w):
  return _bf16_cpu_product(x, w), (x, w)


def _bf16_cpu_product_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = jnp.einsum("mn,kn->mk", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
  xt = jax.lax.optimization_barrier(x.T)[None]
  dw = jnp.einsum("bkm,bmn->bkn", xt, g[None], preferred_element_type=jnp.float32)[0].astype(w.dtype)
  return dx, dw


_bf16_cpu_product.defvjp(_bf16_cpu_product_fwd, _bf16_cpu_product_bwd)


def _weight_product(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
  """``tensordot(x, w, n_in)`` as one 2-D matmul [M, K] x [K, N] (see `_linear`).

  bf16 operands lowered for CPU take `_bf16_cpu_product` (same values, XLA's fast bf16
  kernels); every other case, and every other platform, is ``jnp.dot``.
  """
  lead, k = x.shape[:x.ndim - n_in], math.prod(w.shape[:n_in])
  x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
  if x2.dtype == jnp.bfloat16 and w2.dtype == jnp.bfloat16:
    y = jax.lax.platform_dependent(x2, w2, cpu=_bf16_cpu_product, default=jnp.dot)
  else:
    y = jnp.dot(x2, w2)
  return y.reshape(lead + w.shape[n_in:])


class OutMajor(nnx.Variable):
  """A weight held as its 2-D transpose ``[..., out, in]`` for decoding on CPU (see :func:`out_major`).

  Metadata ``out_shape``: the output axes of the original ``[in..., out...]`` weight.
  """


def _out_major_product(x: jax.Array, w: OutMajor, n_in: int, dtype) -> jax.Array:
  """``x . W`` from ``W^T [N, K]``: ``(W^T . x^T)^T``, the [N, M] product kept in that layout.

  The optimization barrier stops XLA from folding the final transpose into the dot,
  which would turn it back into the ``[M, K] . [K, N]`` GEMM this path avoids.
  """
  lead, k = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
  wt = w[...].astype(x.dtype)
  y = jax.lax.dot_general(wt, x.reshape(-1, k), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return jax.lax.optimization_barrier(y).T.astype(dtype).reshape(lead + tuple(w.out_shape))


# The weights a decode step reads transposed, per module class: name -> (axes contracted with x,
# rank in one layer). The MLP's are [in, out]; the attention's [D, heads, head_dim] (q, k, v) and
# [heads, head_dim, D] (o). A scanned model stacks them [L, ...].
_MLP_OUT_MAJOR = {"gate": (1, 2), "up": (1, 2), "down": (1, 2)}
_ATTENTION_OUT_MAJOR = {"q": (1, 3), "k": (1, 3), "v": (1, 3), "o": (2, 3)}


def _transposed(w: jax.Array, n_in: int, rank: int) -> OutMajor:
  """``w [L..., in..., out...]`` as ``OutMajor [L..., out, in]`` (one copy, kept by a barrier)."""
  lead = w.shape[:w.ndim - rank]
  ins, outs = w.shape[len(lead):len(lead) + n_in], w.shape[len(lead) + n_in:]
  w2 = w.reshape(lead + (math.prod(ins), math.prod(outs)))
  wt = jax.lax.optimization_barrier(jnp.swapaxes(w2, -1, -2))
  return OutMajor(wt, out_shape=tuple(outs), eager_sharding=False)


def out_major(model: nnx.Module) -> None:
  """Holds ``model``'s linear weights and unembedding transposed, ``[out, in]``, in place (decoding on CPU).

  XLA's CPU backend runs a product of a few rows ``x [M, K] . W [K, N]`` (a decode step:
  M = batch rows) as a GEMM that packs all of W at every call; from M = 2 on it reads
  W slower than ``W^T [N, K] . x^T`` streams it (at M = 8 and W of 768 x 32000: 9 vs
  16 GB/s). The sampler calls this on copies of its models merged inside its program,
  after the prefill and outside the decode loop, so the transposes are made once per
  program (the transposed weights are held beside the originals meanwhile); a tied
  unembedding already is ``[out, in]`` and costs nothing. bench/decoding.py's 100M model
  at B = 8: 55 ms per decode step with no transposed weights, 39 with the MLP weights and
  unembedding transposed, and 6% less again with the attention projections too (A/B in
  one process: 42.1 vs 44.7 ms). Values are the same up to float summation order; LoRA
  adapters are not transposed.
  """
  for _, node in list(nnx.iter_graph(model)):
    weights = _MLP_OUT_MAJOR if isinstance(node, MLP) else _ATTENTION_OUT_MAJOR if isinstance(node, Attention) else {}
    for name, (n_in, rank) in weights.items():
      var = getattr(node, name, None)
      if isinstance(var, nnx.Param):
        setattr(node, name, _transposed(var[...], n_in, rank))
    if isinstance(node, Transformer) and not isinstance(node.lm_head, OutMajor):
      if node.lm_head is not None:
        head = jax.lax.optimization_barrier(node.lm_head[...].T)
      elif node.config.tie_embeddings:
        head = node.embed[...]
      else:  # a reward model's backbone: no unembedding
        continue
      node.lm_head = nnx.data(OutMajor(head, out_shape=(head.shape[0],), eager_sharding=False))  # None was static


def _linear(module: nnx.Module, name: str, x: jax.Array, *, n_in: int) -> jax.Array:
  """``x . W`` for the weight ``module.<name>``, plus its LoRA adapter if it has one.

  A weight W [in..., out...] (its first `n_in` axes contracted with x's last ones) may
  carry ``<name>_lora_a`` [in..., r] and ``<name>_lora_b`` [r, out...] (nnx.LoRAParam, set
  by `alignjax.models.lora.apply_lora`); the output is then
  x·W + (alpha / r)·(dropout(x)·A)·B, as LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation
  of Large Language Models", arXiv:2106.09685, Eq. 3) and qwix's LoraProvider compute it.
  ``module.lora_enabled = False`` (`lora.adapters_off`) gives the base weights' output.

  The product runs as one 2-D matmul [M, K] x [K, N] (`_weight_product`: the leading axes
  of x and the contracted axes flattened), the sums of the einsum over the named axes; on
  CPU XLA then computes the weight gradient x^T dy without transposing activations first
  (bench/dpo_step.py's 100M DPO step: 7.3 s instead of 9.2 s on a 2-core AVX-512 host).
  """
  w = getattr(module, name)
  if isinstance(w, OutMajor):
    y = _out_major_product(x, w, n_in, x.dtype)
  else:
    y = _weight_product(x, w[...].astype(x.dtype), n_in)
  a = getattr(module, name + "_lora_a", None)
  scale = getattr(module, "lora_scale", None)  # set with the adapters by apply_lora
  if a is None or scale is None or not getattr(module, "lora_enabled", True):
    return y
  b = getattr(module, name + "_lora_b")
  dropout = getattr(module, "lora_dropout", None)
  xd = dropout(x) if dropout is not None else x
  xa = _weight_product(xd, a[...].astype(x.dtype), n_in)
  delta = _weight_product(xa, b[...].astype(x.dtype), 1)
  return y + (delta * scale).astype(y.dtype)


# ---------------------------------------------------------------------------- blocks
def _cache_product(a: jax.Array, c: jax.Array) -> jax.Array:
  """``a [B, K, M, X] . c [B, K, X, N]``, batched over (B, K), in float32: a plain product of each (b, k)'s matrices.

  On CPU the product is fenced by an optimization barrier: otherwise XLA's layout
  assignment swaps the operands of the probabilities' product with V (to fold the
  transpose that follows into the output) and runs it on a kernel that reads V about
  six times slower (ad hoc: 12 layers' decode attention at B = 8 and 576 slots took
  16 ms fenced, 36 ms not).
  """
  dims = (((3,), (2,)), ((0, 1), (0, 1)))
  product = lambda a, c: jax.lax.dot_general(a, c, dims, preferred_element_type=jnp.float32)
  fenced = lambda a, c: jax.lax.optimization_barrier(product(a, c))
  return jax.lax.platform_dependent(a, c, cpu=fenced, default=product)


def _cache_write(cache: jax.Array, update: jax.Array, starts) -> jax.Array:
  """``dynamic_update_slice(cache, update, starts)``, a 16-bit float cache on CPU through its bits.

  XLA's CPU backend computes a bf16 dynamic-update-slice in float32 (the whole cache
  converted, updated and converted back: one pass over it per layer and step instead of
  writing the new slots); on the same bits as uint16 it is a plain copy, about twice as
  fast (ad hoc, a [8, 4, 64, 576] key cache: 260 instead of 495 us per write).
  """
  update = update.astype(cache.dtype)
  plain = lambda c, u: jax.lax.dynamic_update_slice(c, u, starts)
  if cache.dtype not in (jnp.bfloat16, jnp.float16):
    return plain(cache, update)
  to_bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
  bits = lambda c, u: jax.lax.bitcast_convert_type(plain(to_bits(c), to_bits(u)), c.dtype)
  return jax.lax.platform_dependent(cache, update, cpu=bits, default=plain)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.window = cfg.layer_window(layer)
    self.q = _param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), pdt)
    self.k = _param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pdt)
    self.v = _param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pdt)
    self.o = _param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), pdt)
    if cfg.qkv_bias:
      self.q_bias = _param(None, (H, Dh), ("heads", "head_dim"), pdt, init="zeros")
      self.k_bias = _param(None, (K, Dh), ("kv_heads", "head_dim"), pdt, init="zeros")
      self.v_bias = _param(None, (K, Dh), ("kv_heads", "head_dim"), pdt, init="zeros")
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    self.o_bias = _param(None, (D,), ("embed",), pdt, init="zeros") if cfg.out_bias else None
    if cfg.qk_norm:
      self.q_norm = Norm(Dh, cfg, names=("head_dim",))
      self.k_norm = Norm(Dh, cfg, names=("head_dim",))
    else:
      self.q_norm = self.k_norm = None

  def _proj(self, x, name, b):
    y = _linear(self, name, x, n_in=1)  # btd,dhk->bthk
    return y if b is None else y + b[...].astype(x.dtype)

  def __call__(self, x, positions, key_mask, cache_kv=None, cache_index=None):
    """x [B,T,D]; key_mask [B,T,S] bool; cache_kv: (k [B,K,Dh,S], v [B,K,S,Dh]) or None.

    With a cache the attention's two products read the cache in place, as plain
    products of each (b, k)'s matrices (`_cache_product`): q [G*T, Dh] . k [Dh, S] and
    probs [G*T, S] . v [S, Dh]. A [B, S, K, Dh] cache would be transposed into such a
    layout, all S slots of K and V, in every layer at every decode step; keys held
    [S, Dh] make the scores a product with a transposed operand, which XLA's CPU kernels
    read at less than half the rate (ad hoc, 12 layers' scores at B = 8 and 576 slots:
    12.2 ms instead of 4.9). bench/decoding.py's 100M model at B = 8, 512 prompt tokens
    and 64 new: 58.7 ms per decode step with a [B, S, K, Dh] cache, 51.4 ms with this
    one (32 prompt tokens: 34.0 and 31.3 ms). Without a cache (training) k and v stay
    [B, T, K, Dh] and are read as [B, K, S, Dh]; the two products are the same per-(b, k)
    matrix products, whose operands XLA then copies into place once: written as one
    einsum over [B, T, K, G, Dh] instead, the attention took ~1.4x as long per layer
    (ad hoc, 16 x 128 tokens, GQA 12/4) and bench/dpo_step.py's 100M step 12.3 s
    instead of 11.5 (A/B, same session).
    """
    cfg = self.cfg
    q = self._proj(x, "q", self.q_bias)
    k = self._proj(x, "k", self.k_bias)
    v = self._proj(x, "v", self.v_bias)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if not cfg.learned_positions:
      inv_freq = rope_inv_freq(cfg)
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
    new_kv = None
    if cache_kv is not None:
      ck, cv = cache_kv
      k = _cache_write(ck, k.transpose(0, 2, 3, 1), (0, 0, 0, cache_index))
      v = _cache_write(cv, jnp.swapaxes(v, 1, 2), (0, 0, cache_index, 0))
      new_kv = (k, v)
      k, v = k.astype(x.dtype), v.astype(x.dtype)
    B, T, H, Dh = q.shape
    K = k.shape[2] if cache_kv is None else k.shape[1]
    G = H // K
    q = jnp.moveaxis(q.reshape(B, T, K, G, Dh), 1, 3).reshape(B, K, G * T, Dh)  # each (b, k)'s G*T rows together
    # Scores accumulate and stay in float32 (never rounded to bf16), softmax in float32.
    if cache_kv is None:  # q [B, K, G*T, Dh] . k [B, K, S, Dh] over Dh
      scores = jnp.einsum("bkqd,bksd->bkqs", q, jnp.swapaxes(k, 1, 2), preferred_element_type=jnp.float32)
    else:  # q [B, K, G*T, Dh] . k [B, K, Dh, S]
      scores = _cache_product(q, k)
    scores = scores.reshape(B, K, G, T, -1) * cfg.attention_scale
    if cfg.attn_logit_softcap is not None:
      cap = cfg.attn_logit_softcap
      scores = jnp.tanh(scores / cap) * cap
    scores = jnp.where(key_mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = probs.reshape(B, K, G * T, -1)
    if cache_kv is None:  # probs [B, K, G*T, S] . v [B, K, S, Dh] over S
      out = jnp.einsum("bkqs,bksd->bkqd", probs, jnp.swapaxes(v, 1, 2), preferred_element_type=jnp.float32)
    else:  # probs [B, K, G*T, S] . v [B, K, S, Dh] over S
      out = _cache_product(probs, v)
    out = jnp.moveaxis(out.reshape(B, K, G, T, Dh), 3, 1)
    out = out.astype(v.dtype).reshape(B, T, H, Dh)
    out = checkpoint_name(out, "attention_out")
    y = _linear(self, "o", out, n_in=2)  # bthk,hkd->btd
    if self.o_bias is not None:
      y = y + self.o_bias[...].astype(x.dtype)
    return y, new_kv


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    pdt = jnp.dtype(cfg.param_dtype)
    self.act = _activation(cfg.activation)
    self.gate = _param(rngs, (D, F), ("embed", "mlp"), pdt) if cfg.gated_mlp else None
    self.up = _param(rngs, (D, F), ("embed", "mlp"), pdt)
    self.down = _param(rngs, (F, D), ("mlp", "embed"), pdt)
    if cfg.mlp_bias:
      self.gate_bias = _param(None, (F,), ("mlp",), pdt, init="zeros") if cfg.gated_mlp else None
      self.up_bias = _param(None, (F,), ("mlp",), pdt, init="zeros")
      self.down_bias = _param(None, (D,), ("embed",), pdt, init="zeros")
    else:
      self.gate_bias = self.up_bias = self.down_bias = None

  def _dense(self, x, name, b):
    y = _linear(self, name, x, n_in=1)  # ...d,df->...f
    return y if b is None else y + b[...].astype(x.dtype)

  def __call__(self, x):
    # The activation (and the gate product) in float32, rounded to the compute dtype once.
    up = self._dense(x, "up", self.up_bias).astype(jnp.float32)
    if self.gate is not None:
      h = self.act(self._dense(x, "gate", self.gate_bias).astype(jnp.float32)) * up
    else:
      h = self.act(up)
    return self._dense(h.astype(x.dtype), "down", self.down_bias)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    D = cfg.hidden_size
    self.attn_norm = Norm(D, cfg)
    self.attn = Attention(cfg, layer, rngs=rngs)
    self.post_attn_norm = Norm(D, cfg) if cfg.post_norms else None
    self.mlp_norm = Norm(D, cfg)
    self.mlp = MLP(cfg, rngs=rngs)
    self.post_mlp_norm = Norm(D, cfg) if cfg.post_norms else None

  def __call__(self, x, positions, key_mask, cache_kv=None, cache_index=None):
    h, new_kv = self.attn(self.attn_norm(x), positions, key_mask, cache_kv, cache_index)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return x + h, new_kv


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def _run_block(block, x, positions, key_mask):
  return block(x, positions, key_mask)[0]


# nnx.vmap / nnx.scan insert (and remove) the logical axis "layers" in each stacked
# parameter's `out_sharding`; the rule table keeps it unsharded.
_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """One Block whose parameters carry a leading [num_layers] axis (as MaxText's scanned layers).

  Each layer draws its own initial values (one key per layer from ``rngs.params()``). A
  block's sliding window is not a parameter: the forward pass selects each layer's key mask.
  """
  keys = jax.random.split(rngs.params(), cfg.num_layers)

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=_LAYERS_AXIS)
  def create(key):
    return Block(cfg, 0, rngs=nnx.Rngs(params=key))

  return create(keys)


# ---------------------------------------------------------------------------- model
class Transformer(nnx.Module):
  """Decoder-only transformer for every family in `ModelConfig.family`.

  ``model(tokens [B,T] int32, attention_mask=None, *, positions=None, cache=None,
  return_hidden=False)`` -> logits [B,T,V] in float32 (or the final-normed hidden
  [B,T,D] with ``return_hidden``); with a cache -> ``(out, new_cache)``.
  ``all_hidden=True`` (no cache, per-layer models) -> every layer's output, a tuple of
  ``num_layers`` [B,T,D] arrays, the last one final-normed (transformers'
  ``output_hidden_states`` without the embeddings, ``hidden_states[1:]``).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    D, V = cfg.hidden_size, cfg.vocab_size
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (V, D), ("vocab", "embed"), pdt)
    self.pos_embed = (_param(rngs, (cfg.max_position_embeddings, D), ("positions", "embed"), pdt)
                      if cfg.learned_positions else None)
    if cfg.scan_layers:
      self.layers = _stacked_blocks(cfg, rngs)
    else:
      self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = Norm(D, cfg)
    self.lm_head = None if cfg.tie_embeddings else _param(rngs, (D, V), ("embed", "vocab"), pdt)

  # -------------------------------------------------------------- public helpers
  def unembed(self, hidden: jax.Array) -> jax.Array:
    """Float32 logits [..., V] from final-normed hidden [..., D] (tied or untied head, final soft-cap)."""
    # Float32 logits (accumulated in float32 from the compute-dtype hidden and weights): a
    # bf16 logit of magnitude 20 is only known to 0.125, which log-probs inherit.
    if isinstance(self.lm_head, OutMajor):
      logits = _out_major_product(hidden, self.lm_head, 1, jnp.float32)
    elif self.lm_head is None:
      logits = jnp.einsum("...d,vd->...v", hidden, self.embed[...].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("...d,dv->...v", hidden, self.lm_head[...].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)
    cap = self.config.final_logit_softcap
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return logits

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of `max_len` slots per row, in the compute dtype."""
    cfg = self.config
    k_shape = (batch_size, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    if cfg.scan_layers:
      k = jnp.zeros((cfg.num_layers,) + k_shape, dt)
      v = jnp.zeros((cfg.num_layers,) + v_shape, dt)
    else:
      k = tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.num_layers))
      v = tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.num_layers))
    return KVCache(k=k, v=v,
                   positions=jnp.zeros((batch_size, max_len), jnp.int32),
                   valid=jnp.zeros((batch_size, max_len), bool),
                   length=jnp.zeros((), jnp.int32))

  def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    table = self.embed[...]
    x = jnp.take(table, tokens, axis=0)
    if cfg.scale_embeddings:  # sqrt(hidden) rounded to the weights' dtype, as transformers does.
      x = x * jnp.asarray(cfg.hidden_size ** 0.5, dtype=table.dtype)
    x = x.astype(dt)
    if self.pos_embed is not None:
      pos = jnp.clip(positions, 0, cfg.max_position_embeddings - 1)
      x = x + jnp.take(self.pos_embed[...], pos, axis=0).astype(dt)
    return x

  # -------------------------------------------------------------- forward
  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: KVCache | None = None,
               return_hidden: bool = False, all_hidden: bool = False):
    cfg = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"Transformer: `tokens` must be [B, T], got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"Transformer: `tokens` must be integer, got {tokens.dtype}.")
    B, T = tokens.shape
    if attention_mask is None:
      mask = jnp.ones((B, T), bool)
    else:
      mask = jnp.asarray(attention_mask)
      if mask.shape != (B, T):
        raise ValueError(
            f"Transformer: `attention_mask` must have shape {(B, T)} like `tokens`, got {mask.shape}.")
      mask = mask.astype(bool)
    if positions is not None and jnp.shape(positions) != (B, T):
      raise ValueError(f"Transformer: `positions` must have shape {(B, T)}, got {jnp.shape(positions)}.")

    if cache is None:
      if positions is None:
        positions = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
      positions = positions.astype(jnp.int32)
      k_pos, k_valid = positions, mask
      q_slot = jnp.arange(T)
      k_slot = jnp.arange(T)
      cache_index = None
    else:
      S = cache.valid.shape[1]
      if cache.valid.shape[0] != B:
        raise ValueError(f"Transformer: cache batch {cache.valid.shape[0]} != tokens batch {B}.")
      if T > S:
        raise ValueError(f"Transformer: {T} new tokens exceed the cache's {S} slots.")
      if positions is None:
        count = cache.valid.sum(axis=-1, dtype=jnp.int32)
        positions = count[:, None] + jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
      positions = positions.astype(jnp.int32)
      cache_index = cache.length
      k_pos = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache_index))
      k_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache_index))
      q_slot = cache_index + jnp.arange(T)
      k_slot = jnp.arange(S)

    causal = (k_slot[None, :] <= q_slot[:, None])[None]  # [1,T,S]
    base = causal & k_valid[:, None, :] & (k_pos[:, None, :] <= positions[:, :, None])
    windows = {cfg.layer_window(i) for i in range(cfg.num_layers)}
    key_masks = {}
    for w in windows:
      if w is None:
        key_masks[w] = base
      else:
        key_masks[w] = base & (positions[:, :, None] - k_pos[:, None, :] < w)

    if all_hidden and (cache is not None or cfg.scan_layers):
      raise ValueError("Transformer: `all_hidden` needs a per-layer model (scan_layers=False) and no cache.")
    x = self.embed_tokens(tokens, positions)
    new_k, new_v, hiddens = [], [], []
    if cfg.scan_layers:
      x, new_k, new_v = self._scanned(x, positions, key_masks, cache, cache_index)
    for i, block in enumerate(() if cfg.scan_layers else self.layers):
      key_mask = key_masks[cfg.layer_window(i)]
      if cache is None:
        if cfg.remat != "none":
          fn = nnx.remat(_run_block, policy=_REMAT[cfg.remat])
          x = fn(block, x, positions, key_mask)
        else:
          x, _ = block(x, positions, key_mask)
      else:
        x, (k, v) = block(x, positions, key_mask, (cache.k[i], cache.v[i]), cache_index)
        new_k.append(k)
        new_v.append(v)
      if all_hidden:
        hiddens.append(x)
    x = self.final_norm(x)
    if all_hidden:
      return (*hiddens[:-1], x)
    out = x if return_hidden else self.unembed(x)
    if cache is None:
      return out
    if not cfg.scan_layers:
      new_k, new_v = tuple(new_k), tuple(new_v)
    new_cache = KVCache(k=new_k, v=new_v, positions=k_pos, valid=k_valid,
                        length=(cache.length + T).astype(jnp.int32))
    return out, new_cache

  def _scanned(self, x, positions, key_masks, cache, cache_index):
    """The blocks under one `nnx.scan` over the stacked parameters: (x, new_k, new_v).

    Each layer's key mask is picked from the distinct window masks by a per-layer index
    (Gemma 2 alternates sliding and full layers). With a cache, the stacked [L, ...]
    k/v arrays ride in the carry and only the new tokens' slots are written per layer.
    """
    cfg = self.config
    L = cfg.num_layers
    windows = [cfg.layer_window(i) for i in range(L)]
    distinct = sorted(set(windows), key=lambda w: -1 if w is None else w)
    masks = jnp.stack([key_masks[w] for w in distinct])  # [W,B,T,S]
    which = jnp.asarray([distinct.index(w) for w in windows], jnp.int32)
    policy = cfg.remat

    if cache is None:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None), out_axes=nnx.Carry,
                transform_metadata=_LAYERS_AXIS, graph=False)
      def run(h, block, w, pos, masks):
        if policy != "none":
          return nnx.remat(_run_block, policy=_REMAT[policy])(block, h, pos, masks[w])
        return block(h, pos, masks[w])[0]

      return run(x, self.layers, which, positions, masks), None, None

    if not isinstance(cache.k, jax.Array) or cache.k.ndim != 5:
      raise ValueError("Transformer: a scan_layers model needs a stacked cache (k [L, B, K, Dh, S], "
                       "v [L, B, K, S, Dh]) from its own `init_cache`.")
    T = x.shape[1]

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, None, None, None), out_axes=nnx.Carry,
              transform_metadata=_LAYERS_AXIS, graph=False)
    def run_cached(carry, block, w, layer, pos, masks, index):
      h, ck, cv = carry
      h, (k, v) = block(h, pos, masks[w], (ck[layer], cv[layer]), index)
      k_new = jax.lax.dynamic_slice_in_dim(k, index, T, axis=3)[None]
      v_new = jax.lax.dynamic_slice_in_dim(v, index, T, axis=2)[None]
      ck = _cache_write(ck, k_new, (layer, 0, 0, 0, index))
      cv = _cache_write(cv, v_new, (layer, 0, 0, index, 0))
      return h, ck, cv

    x, ck, cv = run_cached((x, cache.k, cache.v), self.layers, which,
                           jnp.arange(L, dtype=jnp.int32), positions, masks, cache_index)
    return x, ck, cv


# ---------------------------------------------------------------------------- layouts
def _walk_params(model: nnx.Module):
  """(path tuple, Variable) of every nnx.Variable of `model`."""
  return [(tuple(p), v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]


def _get_var(model, path):
  obj = model
  for key in path:
    obj = obj[key] if isinstance(key, int) else getattr(obj, key)
  return obj


def stack_layers(model: Transformer) -> Transformer:
  """The same weights as a ``scan_layers`` model (per-layer parameters stacked on axis 0).

  A new model is returned (the per-layer arrays are copied into the stacked ones, keeping
  the sharding the rule table gives a stacked parameter when the inputs were sharded).
  """
  return _relayout(model, scan=True, where="stack_layers")


def unstack_layers(model: Transformer) -> Transformer:
  """The same weights as a per-layer model (the inverse of :func:`stack_layers`)."""
  return _relayout(model, scan=False, where="unstack_layers")


def _relayout(model, *, scan: bool, where: str):
  import dataclasses  # pylint: disable=import-outside-toplevel
  cfg = getattr(model, "config", None)
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"{where}: `model` must be an alignjax Transformer, got {type(model).__name__}.")
  if cfg.scan_layers == scan:
    return model
  new_cfg = dataclasses.replace(cfg, scan_layers=scan)
  out = nnx.eval_shape(lambda: type(model)(new_cfg, rngs=nnx.Rngs(0)))
  L = cfg.num_layers
  for path, var in _walk_params(out):
    if path[0] != "layers":
      value = _get_var(model, path).get_value()
    elif scan:  # ("layers", *rest) <- stack of ("layers", i, *rest)
      parts = [_get_var(model, ("layers", i) + path[1:]).get_value() for i in range(L)]
      value = jnp.stack(parts)
      src = parts[0].sharding if isinstance(parts[0], jax.Array) else None
      if isinstance(src, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(None, *src.spec)
        value = jax.device_put(value, jax.sharding.NamedSharding(src.mesh, spec))
    else:  # ("layers", i, *rest) <- row i of ("layers", *rest)
      stacked = _get_var(model, ("layers",) + path[2:]).get_value()
      value = stacked[path[1]]
      src = stacked.sharding if isinstance(stacked, jax.Array) else None
      if isinstance(src, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(*tuple(src.spec)[1:])
        value = jax.device_put(value, jax.sharding.NamedSharding(src.mesh, spec))
    var.set_value(value)
  return out
