"""Llama 1-3.x and Mistral: HF config <-> ModelConfig, HF tensor names <-> parameter paths."""

from __future__ import annotations

from alignjax.models.config import ModelConfig
from alignjax.models.families import _common as c

MODEL_TYPES = ("llama", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def config_from_hf(d: dict, **overrides) -> ModelConfig:
  """ModelConfig of a Llama or Mistral `config.json` dict (4.x or 5.x spelling)."""
  where = "config_from_hf"
  mt = c.check_model_type(d, MODEL_TYPES, where)
  bias = bool(d.get("attention_bias", False))
  kw = dict(
      family=mt, **c.common_from_hf(d, where),
      activation=c.activation_from_hf(d.get("hidden_act", "silu"), where),
      qkv_bias=bias, out_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)))
  if mt == "mistral":
    kw["sliding_window"] = d.get("sliding_window")
  kw.update(overrides)
  return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
  d = dict(model_type=cfg.family, architectures=[ARCHITECTURES[cfg.family]],
           hidden_act=c.activation_to_hf(cfg.activation), **c.common_to_hf(cfg))
  if cfg.family == "llama":
    if cfg.qkv_bias != cfg.out_bias:
      raise ValueError("to_hf: Llama `attention_bias` covers q/k/v and o together; "
                       f"got qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}.")
    if cfg.sliding_window is not None:
      raise ValueError("to_hf: Llama has no sliding window; use family='mistral'.")
    d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  else:
    if cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
      raise ValueError("to_hf: Mistral has no biases.")
    d["sliding_window"] = cfg.sliding_window
  return d


def tensor_specs(cfg: ModelConfig) -> list[c.TensorSpec]:
  return c.decoder_specs(cfg)
