"""alignjax: preference-alignment research in JAX/Flax NNX.

Submodules (imported on first use): ``alignjax.losses``, ``alignjax.models``,
``alignjax.decoding``, ``alignjax.training``, ``alignjax.data``,
``alignjax.sharding``.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("losses", "models", "decoding", "training", "data", "sharding")
__all__ = list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"alignjax.{name}")
  raise AttributeError(f"module 'alignjax' has no attribute {name!r}")
