"""The algorithm registry: one module per method in this package.

::

  algo = algorithms.get("dpo")        # an Algorithm: hparams, schema, needs, objective, hooks
  algorithms.names()                  # every registered name
  loss = algorithms.loss("tdpo2", beta=0.1, alpha=0.5)   # what the steps take

A new method is a loss in :mod:`alignjax.losses`, one module here that calls
:func:`register`, and its tests: every module of this package is imported
below, so the config, ``--config_help``, the planner and the study find it
through the registry. See :mod:`alignjax.training.algorithms.base`.
"""

import importlib
import pkgutil

from alignjax.training.algorithms.base import (
    NEEDS,
    SCHEMAS,
    Algorithm,
    Context,
    Loss,
    ObjectiveOutput,
    check,
    field,
    get,
    loss,
    names,
    register,
    registry,
    unregister,
)

__all__ = ["NEEDS", "SCHEMAS", "Algorithm", "Context", "Loss", "ObjectiveOutput", "check", "field", "get", "loss",
           "names", "register", "registry", "unregister"]

for _module in pkgutil.iter_modules(__path__):
  if _module.name != "base" and not _module.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_module.name}")
