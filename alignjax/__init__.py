"""alignjax: preference-alignment research in JAX/Flax NNX."""

__version__ = "0.1.0"
