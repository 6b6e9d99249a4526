"""Embedded default: SFT then DPO of a tiny transformer on generated sorting preferences.

Runs in well under a minute on 2 CPU cores. The short warm-up leaves a
reference that still misranks some held-out pairs, which DPO then fixes.
The defaults live in :class:`alignjax.training.config.RunConfig`; override any
field from the command line, e.g. ``--config.loss.name=tdpo2 --config.dpo.steps=400``
(``--config_help`` lists them all).
"""

from alignjax.training import config as config_lib


def get_config():
  return config_lib.to_config_dict()
