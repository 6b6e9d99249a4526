"""Architecture presets of common checkpoints, as their Hugging Face ``config.json`` dicts.

The dicts hold the published values of the checkpoints' ``config.json`` files (architecture
fields only; no weights are needed to plan a run) and go through
:func:`alignjax.models.config_from_hf`, so a preset is exactly what loading the real
checkpoint would configure. Used by the AOT planner (``alignjax.aot``, ``launch/plan.py``).

Sources (Hugging Face model cards / ``config.json``): meta-llama/Meta-Llama-3-8B,
meta-llama/Meta-Llama-3-70B, google/gemma-2-9b, google/gemma-2-27b, Qwen/Qwen2.5-7B,
Qwen/Qwen2.5-72B.
"""

from __future__ import annotations

import copy
from typing import Callable

from alignjax.models.config import ModelConfig

_LLAMA3_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 8192,
    "mlp_bias": False, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

_GEMMA2_COMMON = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2,
    "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "initializer_range": 0.02, "max_position_embeddings": 8192, "pad_token_id": 0,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "torch_dtype": "float32", "vocab_size": 256000,
}

_QWEN25_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 131072, "rope_theta": 1000000.0,
    "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 152064,
}

HF_CONFIGS: dict[str, dict] = {
    # meta-llama/Meta-Llama-3-8B
    "llama3_8b": dict(_LLAMA3_COMMON, hidden_size=4096, intermediate_size=14336,
                      num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8),
    # meta-llama/Meta-Llama-3-70B
    "llama3_70b": dict(_LLAMA3_COMMON, hidden_size=8192, intermediate_size=28672,
                       num_attention_heads=64, num_hidden_layers=80, num_key_value_heads=8),
    # google/gemma-2-9b
    "gemma2_9b": dict(_GEMMA2_COMMON, head_dim=256, hidden_size=3584, intermediate_size=14336,
                      num_attention_heads=16, num_hidden_layers=42, num_key_value_heads=8,
                      query_pre_attn_scalar=256),
    # google/gemma-2-27b
    "gemma2_27b": dict(_GEMMA2_COMMON, head_dim=128, hidden_size=4608, intermediate_size=36864,
                       num_attention_heads=32, num_hidden_layers=46, num_key_value_heads=16,
                       query_pre_attn_scalar=144),
    # Qwen/Qwen2.5-7B
    "qwen2_5_7b": dict(_QWEN25_COMMON, hidden_size=3584, intermediate_size=18944,
                       num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
                       max_window_layers=28, rms_norm_eps=1e-06),
    # Qwen/Qwen2.5-72B
    "qwen2_5_72b": dict(_QWEN25_COMMON, hidden_size=8192, intermediate_size=29568,
                        num_attention_heads=64, num_hidden_layers=80, num_key_value_heads=8,
                        max_window_layers=80, rms_norm_eps=1e-05),
}

# Presets defined directly as ModelConfigs (no HF checkpoint behind them).
_NATIVE: dict[str, Callable[..., ModelConfig]] = {
    "llama_tiny": ModelConfig.llama_tiny,
    "llama_100m": ModelConfig.llama_100m,
}

PRESET_NAMES: tuple[str, ...] = tuple(sorted(HF_CONFIGS)) + tuple(sorted(_NATIVE))


def hf_config(name: str) -> dict:
  """A copy of the ``config.json`` dict of preset ``name`` (one of :data:`HF_CONFIGS`)."""
  if name not in HF_CONFIGS:
    raise ValueError(f"presets.hf_config: unknown `name` {name!r}; expected one of {sorted(HF_CONFIGS)}.")
  return copy.deepcopy(HF_CONFIGS[name])


def get(name: str, **overrides) -> ModelConfig:
  """The :class:`ModelConfig` of preset ``name`` (see :data:`PRESET_NAMES`), with overrides.

  HF presets go through ``config_from_hf``; ``overrides`` (e.g. ``dtype="bfloat16"``,
  ``remat="full"``) are applied with ``dataclasses.replace``.
  """
  import dataclasses  # noqa: PLC0415

  if name in _NATIVE:
    return _NATIVE[name](**overrides)
  if name not in HF_CONFIGS:
    raise ValueError(f"presets.get: unknown model preset `name` {name!r}; expected one of {list(PRESET_NAMES)}.")
  from alignjax.models import config_from_hf  # noqa: PLC0415 (hf adapters import this package)

  cfg = config_from_hf(hf_config(name))
  return dataclasses.replace(cfg, **overrides) if overrides else cfg


__all__ = ["HF_CONFIGS", "PRESET_NAMES", "get", "hf_config"]
