"""Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm, free head_dim): HF config and tensor adapters."""

from __future__ import annotations

from alignjax.models.config import ModelConfig
from alignjax.models.families import _common as c

MODEL_TYPES = ("qwen2", "qwen3")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _layer_types(d: dict, num_layers: int):
  """(sliding_window, layer_types) as transformers' Qwen2/3 configs derive them."""
  window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
  if window is None:
    return None, None
  layer_types = d.get("layer_types")
  if layer_types is None:
    max_window_layers = d.get("max_window_layers", 28)
    layer_types = ["sliding_attention" if i >= max_window_layers else "full_attention"
                   for i in range(num_layers)]
  return window, tuple(layer_types)


def config_from_hf(d: dict, **overrides) -> ModelConfig:
  """ModelConfig of a Qwen2 or Qwen3 `config.json` dict (4.x or 5.x spelling)."""
  where = "config_from_hf"
  mt = c.check_model_type(d, MODEL_TYPES, where)
  common = c.common_from_hf(d, where)
  window, layer_types = _layer_types(d, common["num_layers"])
  if mt == "qwen2":
    bias = dict(qkv_bias=True, out_bias=False)
  else:
    b = bool(d.get("attention_bias", False))
    bias = dict(qkv_bias=b, out_bias=b)
  kw = dict(family=mt, **common, **bias,
            activation=c.activation_from_hf(d.get("hidden_act", "silu"), where),
            qk_norm=mt == "qwen3", sliding_window=window, layer_types=layer_types,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)))
  kw.update(overrides)
  return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
  d = dict(model_type=cfg.family, architectures=[ARCHITECTURES[cfg.family]],
           hidden_act=c.activation_to_hf(cfg.activation), **c.common_to_hf(cfg))
  if cfg.mlp_bias:
    raise ValueError(f"to_hf: {cfg.family} has no MLP biases.")
  if cfg.family == "qwen2":
    if not cfg.qkv_bias or cfg.out_bias:
      raise ValueError("to_hf: Qwen2 has q/k/v biases and no output bias.")
  else:
    if cfg.qkv_bias != cfg.out_bias:
      raise ValueError("to_hf: Qwen3 `attention_bias` covers q/k/v and o together.")
    d["attention_bias"] = cfg.qkv_bias
  if cfg.sliding_window is None:
    d.update(use_sliding_window=False, sliding_window=None,
             layer_types=["full_attention"] * cfg.num_layers)
  else:
    d.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=0,
             layer_types=list(cfg.layer_types or ["sliding_attention"] * cfg.num_layers))
  return d


def tensor_specs(cfg: ModelConfig) -> list[c.TensorSpec]:
  return c.decoder_specs(cfg)
