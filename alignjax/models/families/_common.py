"""Shared pieces of the per-family adapters: tensor specs, weight layouts, config parsing."""

from __future__ import annotations

import dataclasses
from typing import Callable

from alignjax.models.config import ModelConfig

Path = tuple  # a parameter path in the model, e.g. ("layers", 0, "attn", "q")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor <-> one or more alignjax parameters.

  `to_params(hf_array) -> tuple of param arrays` (one per path, in the param layout);
  `from_params(*param_arrays) -> hf_array`; `hf_shape` is what the checkpoint must hold.
  """
  name: str
  paths: tuple[Path, ...]
  hf_shape: tuple[int, ...]
  to_params: Callable
  from_params: Callable


def copy_spec(name, path, shape):
  return TensorSpec(name, (path,), tuple(shape), lambda a: (a,), lambda p: p)


def linear_spec(name, path, d_in, d_out):
  """torch nn.Linear weight [out, in] <-> kernel [in, out]."""
  return TensorSpec(name, (path,), (d_out, d_in), lambda a: (a.T,), lambda p: p.T)


def heads_in_spec(name, path, d_in, heads, head_dim):
  """nn.Linear [H*Dh, D] <-> kernel [D, H, Dh] (q/k/v projections)."""
  return TensorSpec(name, (path,), (heads * head_dim, d_in),
                    lambda a: (a.T.reshape(d_in, heads, head_dim),),
                    lambda p: p.reshape(d_in, heads * head_dim).T)


def heads_out_spec(name, path, heads, head_dim, d_out):
  """nn.Linear [D, H*Dh] <-> kernel [H, Dh, D] (output projection)."""
  return TensorSpec(name, (path,), (d_out, heads * head_dim),
                    lambda a: (a.T.reshape(heads, head_dim, d_out),),
                    lambda p: p.reshape(heads * head_dim, d_out).T)


def heads_bias_spec(name, path, heads, head_dim):
  """bias [H*Dh] <-> [H, Dh]."""
  return TensorSpec(name, (path,), (heads * head_dim,),
                    lambda a: (a.reshape(heads, head_dim),), lambda p: p.reshape(-1))


def _get(d: dict, *names, default=None):
  for n in names:
    if n in d and d[n] is not None:
      return d[n]
  return default


def check_model_type(d: dict, expected: tuple[str, ...], where: str) -> str:
  mt = d.get("model_type")
  if mt not in expected:
    raise ValueError(f"{where}: unsupported `model_type` {mt!r}; expected one of {expected}.")
  return mt


_HF_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu_new": "gelu_tanh", "gelu_fast": None, "relu": "relu"}


def activation_from_hf(name: str, where: str) -> str:
  act = _HF_ACT.get(name)
  if act is None:
    raise ValueError(f"{where}: unsupported activation `hidden_act`={name!r}; expected one of "
                     f"{sorted(k for k, v in _HF_ACT.items() if v)}.")
  return act


_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def activation_to_hf(act: str) -> str:
  return _ACT_TO_HF[act]


def rope_from_hf(d: dict, where: str) -> dict:
  """ModelConfig rope fields from a 5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
  params = dict(d.get("rope_parameters") or {})
  scaling = d.get("rope_scaling")
  if scaling:
    params = {**params, **scaling}
  theta = _get(params, "rope_theta", default=_get(d, "rope_theta", default=10000.0))
  rope_type = params.get("rope_type", params.get("type", "default")) or "default"
  partial = _get(params, "partial_rotary_factor", default=_get(d, "partial_rotary_factor", default=1.0))
  if partial != 1.0:
    raise ValueError(f"{where}: unsupported `partial_rotary_factor` {partial}; only 1.0 is supported.")
  out = dict(rope_theta=float(theta), rope_type=rope_type)
  if rope_type == "default":
    return out
  if rope_type == "linear":
    out["rope_factor"] = float(params["factor"])
    return out
  if rope_type == "llama3":
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      if key not in params:
        raise ValueError(f"{where}: llama3 `rope_scaling` lacks {key!r}.")
    out.update(rope_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    return out
  raise ValueError(f"{where}: unsupported rope type {rope_type!r} (`rope_scaling`/`rope_parameters`); "
                   f"supported: default, linear, llama3.")


def rope_to_hf(cfg: ModelConfig) -> dict:
  """Both spellings: 4.x `rope_theta` + `rope_scaling` and 5.x `rope_parameters`."""
  params = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "linear":
    params["factor"] = cfg.rope_factor
  elif cfg.rope_type == "llama3":
    params.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                  high_freq_factor=cfg.rope_high_freq_factor,
                  original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
  scaling = None if cfg.rope_type == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
  return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def tokens_from_hf(d: dict) -> dict:
  eos = d.get("eos_token_id")
  if isinstance(eos, list):
    eos = tuple(eos)
  return dict(bos_token_id=d.get("bos_token_id"), eos_token_id=eos, pad_token_id=d.get("pad_token_id"))


def tokens_to_hf(cfg: ModelConfig) -> dict:
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}


def dtype_to_hf(cfg: ModelConfig) -> dict:
  return {"dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype}


def reject(d: dict, where: str, **unsupported):
  """ValueError if any config field holds a value other than the supported one."""
  for key, ok in unsupported.items():
    if key in d and d[key] is not None and d[key] != ok:
      raise ValueError(f"{where}: unsupported option `{key}`={d[key]!r}; only {ok!r} is supported.")


def decoder_specs(cfg: ModelConfig, *, prefix: str = "model.", post_norms: bool = False) -> list[TensorSpec]:
  """Tensor specs of the Llama-style decoders (llama, mistral, qwen2/3, gemma/2)."""
  D, F, V, H, K, Dh = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads,
                       cfg.num_kv_heads, cfg.head_dim)
  specs = [copy_spec(f"{prefix}embed_tokens.weight", ("embed",), (V, D))]
  for i in range(cfg.num_layers):
    p = f"{prefix}layers.{i}."
    L = ("layers", i)
    specs += [
        heads_in_spec(p + "self_attn.q_proj.weight", L + ("attn", "q"), D, H, Dh),
        heads_in_spec(p + "self_attn.k_proj.weight", L + ("attn", "k"), D, K, Dh),
        heads_in_spec(p + "self_attn.v_proj.weight", L + ("attn", "v"), D, K, Dh),
        heads_out_spec(p + "self_attn.o_proj.weight", L + ("attn", "o"), H, Dh, D),
        linear_spec(p + "mlp.gate_proj.weight", L + ("mlp", "gate"), D, F),
        linear_spec(p + "mlp.up_proj.weight", L + ("mlp", "up"), D, F),
        linear_spec(p + "mlp.down_proj.weight", L + ("mlp", "down"), F, D),
        copy_spec(p + "input_layernorm.weight", L + ("attn_norm", "scale"), (D,)),
    ]
    if post_norms:
      specs += [copy_spec(p + "post_attention_layernorm.weight", L + ("post_attn_norm", "scale"), (D,)),
                copy_spec(p + "pre_feedforward_layernorm.weight", L + ("mlp_norm", "scale"), (D,)),
                copy_spec(p + "post_feedforward_layernorm.weight", L + ("post_mlp_norm", "scale"), (D,))]
    else:
      specs.append(copy_spec(p + "post_attention_layernorm.weight", L + ("mlp_norm", "scale"), (D,)))
    if cfg.qkv_bias:
      specs += [heads_bias_spec(p + "self_attn.q_proj.bias", L + ("attn", "q_bias"), H, Dh),
                heads_bias_spec(p + "self_attn.k_proj.bias", L + ("attn", "k_bias"), K, Dh),
                heads_bias_spec(p + "self_attn.v_proj.bias", L + ("attn", "v_bias"), K, Dh)]
    if cfg.out_bias:
      specs.append(copy_spec(p + "self_attn.o_proj.bias", L + ("attn", "o_bias"), (D,)))
    if cfg.mlp_bias:
      specs += [copy_spec(p + "mlp.gate_proj.bias", L + ("mlp", "gate_bias"), (F,)),
                copy_spec(p + "mlp.up_proj.bias", L + ("mlp", "up_bias"), (F,)),
                copy_spec(p + "mlp.down_proj.bias", L + ("mlp", "down_bias"), (D,))]
    if cfg.qk_norm:
      specs += [copy_spec(p + "self_attn.q_norm.weight", L + ("attn", "q_norm", "scale"), (Dh,)),
                copy_spec(p + "self_attn.k_norm.weight", L + ("attn", "k_norm", "scale"), (Dh,))]
  specs.append(copy_spec(f"{prefix}norm.weight", ("final_norm", "scale"), (D,)))
  if not cfg.tie_embeddings:
    specs.append(linear_spec("lm_head.weight", ("lm_head",), D, V))
  return specs


def common_from_hf(d: dict, where: str) -> dict:
  """Fields every Llama-style config spells the same way."""
  H = d["num_attention_heads"]
  D = d["hidden_size"]
  return dict(
      vocab_size=d["vocab_size"], hidden_size=D, intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"], num_heads=H,
      num_kv_heads=_get(d, "num_key_value_heads", default=H),
      head_dim=_get(d, "head_dim", default=D // H),
      max_position_embeddings=_get(d, "max_position_embeddings", default=2048),
      norm_eps=float(_get(d, "rms_norm_eps", default=1e-6)),
      **rope_from_hf(d, where), **tokens_from_hf(d))


def common_to_hf(cfg: ModelConfig) -> dict:
  return dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      **rope_to_hf(cfg), **tokens_to_hf(cfg), **dtype_to_hf(cfg))

