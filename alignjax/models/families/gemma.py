"""Gemma (GeGLU, (1+w) RMSNorm, sqrt(hidden) embedding scale) and Gemma 2 (soft-capping,
alternating local/global attention, pre+post norms, query_pre_attn_scalar)."""

from __future__ import annotations

from alignjax.models.config import ModelConfig
from alignjax.models.families import _common as c

MODEL_TYPES = ("gemma", "gemma2")
ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def config_from_hf(d: dict, **overrides) -> ModelConfig:
  """ModelConfig of a Gemma or Gemma 2 `config.json` dict (4.x or 5.x spelling)."""
  where = "config_from_hf"
  mt = c.check_model_type(d, MODEL_TYPES, where)
  common = c.common_from_hf(d, where)
  bias = bool(d.get("attention_bias", False))
  kw = dict(family=mt, **common, qkv_bias=bias, out_bias=bias,
            tie_embeddings=bool(d.get("tie_word_embeddings", True)))
  if d.get("use_bidirectional_attention"):
    raise ValueError(f"{where}: unsupported option `use_bidirectional_attention`=True.")
  if mt == "gemma":
    # transformers reads the legacy `hidden_act: "gelu"` as the tanh approximation.
    act = c._get(d, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    kw["activation"] = "gelu_tanh" if act == "gelu" else c.activation_from_hf(act, where)
  else:
    act = c._get(d, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    kw["activation"] = c.activation_from_hf(act, where)
    n = common["num_layers"]
    window = d.get("sliding_window", 4096)
    layer_types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    kw.update(query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
              attn_logit_softcap=d.get("attn_logit_softcapping", 50.0),
              final_logit_softcap=d.get("final_logit_softcapping", 30.0))
    if window is not None:
      kw.update(sliding_window=window, layer_types=tuple(layer_types))
  kw.update(overrides)
  return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
  if cfg.qkv_bias != cfg.out_bias or cfg.mlp_bias:
    raise ValueError(f"to_hf: {cfg.family} `attention_bias` covers q/k/v and o; no MLP bias.")
  d = dict(model_type=cfg.family, architectures=[ARCHITECTURES[cfg.family]],
           attention_bias=cfg.qkv_bias, **c.common_to_hf(cfg))
  act = c.activation_to_hf(cfg.activation)
  if cfg.family == "gemma":
    if cfg.activation == "gelu":
      raise ValueError("to_hf: Gemma reads `gelu` as the tanh approximation; exact gelu cannot be saved.")
    d.update(hidden_act=act)
  else:
    qpas = cfg.query_pre_attn_scalar
    if qpas is not None and float(qpas).is_integer():
      qpas = int(qpas)  # transformers' strict config wants an int
    d.update(hidden_activation=act, query_pre_attn_scalar=qpas,
             attn_logit_softcapping=cfg.attn_logit_softcap,
             final_logit_softcapping=cfg.final_logit_softcap,
             sliding_window=cfg.sliding_window,
             layer_types=list(cfg.layer_types) if cfg.layer_types else
             ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers)
  return d


def tensor_specs(cfg: ModelConfig) -> list[c.TensorSpec]:
  return c.decoder_specs(cfg, post_norms=cfg.family == "gemma2")
