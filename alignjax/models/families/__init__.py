"""Per-family adapters: HF `config.json` <-> ModelConfig, HF tensor names <-> parameter paths.

Each adapter module has `config_from_hf(d)`, `config_to_hf(cfg)` and `tensor_specs(cfg)`.
"""

from __future__ import annotations

from alignjax.models.config import ModelConfig
from alignjax.models.families import gemma, gpt2, llama, qwen
from alignjax.models.families._common import TensorSpec

ADAPTERS = {"llama": llama, "mistral": llama, "qwen2": qwen, "qwen3": qwen,
            "gemma": gemma, "gemma2": gemma, "gpt2": gpt2}


def adapter(model_type):
  """The adapter module of an HF `model_type` / ModelConfig family; ValueError if unsupported."""
  if model_type not in ADAPTERS:
    raise ValueError(f"config_from_hf: unsupported `model_type` {model_type!r}; supported: "
                     f"{sorted(ADAPTERS)}.")
  return ADAPTERS[model_type]


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
  """ModelConfig of an HF `config.json` dict (transformers 4.x or 5.x spelling)."""
  if not isinstance(hf_config, dict):
    raise TypeError(f"config_from_hf: `hf_config` must be a dict, got {type(hf_config).__name__}.")
  return adapter(hf_config.get("model_type")).config_from_hf(hf_config, **overrides)


# Options only some HF families can express: field -> families that may set it.
_FAMILY_OPTIONS = {
    "attn_logit_softcap": ("gemma2",),
    "final_logit_softcap": ("gemma2",),
    "query_pre_attn_scalar": ("gemma2", "gpt2"),
    "sliding_window": ("mistral", "qwen2", "qwen3", "gemma2"),
    "layer_types": ("qwen2", "qwen3", "gemma2"),
}


def _check_exportable(config: ModelConfig):
  """ValueError if `config` uses an option its HF family cannot express (no silent change)."""
  for field, fams in _FAMILY_OPTIONS.items():
    if getattr(config, field) is not None and config.family not in fams:
      raise ValueError(f"to_hf: family {config.family!r} cannot express `{field}`="
                       f"{getattr(config, field)!r} (only {fams}).")
  if config.qk_norm != (config.family == "qwen3"):
    raise ValueError(f"to_hf: `qk_norm`={config.qk_norm} does not match family {config.family!r} "
                     "(only qwen3 has q/k norms, always).")
  if config.family == "gpt2" and config.rope_type != "default":
    raise ValueError("to_hf: GPT-2 has learned positions; `rope_type` must be 'default'.")


def config_to_hf(config: ModelConfig) -> dict:
  """The HF `config.json` dict of a ModelConfig (both 4.x and 5.x rope/dtype spellings)."""
  _check_exportable(config)
  return adapter(config.family).config_to_hf(config)


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
  """HF tensor name <-> parameter path specs of a ModelConfig."""
  return adapter(config.family).tensor_specs(config)


__all__ = ["ADAPTERS", "TensorSpec", "adapter", "config_from_hf", "config_to_hf", "tensor_specs"]
