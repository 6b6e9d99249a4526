"""Flax NNX language models: one decoder for the Hugging Face families.

`Transformer(ModelConfig)` runs Llama 1-3.x, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 and GPT-2
exactly as transformers does; `from_hf` / `to_hf` read and write their `save_pretrained`
directories; `config_from_hf` / `config_to_hf` translate the configs.
`RewardModel` is a decoder with a scalar score head: `from_hf` of a one-label
`*ForSequenceClassification` checkpoint returns one, `to_hf` writes it back.
"""

from alignjax.models.config import ModelConfig
from alignjax.models.hf import config_from_hf, config_to_hf, from_hf, read_hf_config, to_hf
from alignjax.models.reward import RewardModel
from alignjax.models.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "RewardModel", "Transformer", "config_from_hf",
           "config_to_hf", "from_hf", "read_hf_config", "to_hf"]
