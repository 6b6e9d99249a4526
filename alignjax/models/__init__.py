"""Flax NNX language models."""

from alignjax.models.tiny import TinyLM, TinyLMConfig

__all__ = ["TinyLM", "TinyLMConfig"]
