"""Training for preference optimisation.

* :mod:`alignjax.training.algorithms`: the registry, one module per method.
* :mod:`alignjax.training.steps`: jitted train/eval steps over a pytree state.
* :mod:`alignjax.training.reference`: reference modes (online, precomputed, free).
* :mod:`alignjax.training.loop`: the train/eval loop over phases (``loop.run``) with run reliability;
  ``loop.evaluate_run`` evaluates any checkpointed step of a run.
* :mod:`alignjax.training.config`: the typed, validated run config.
* :mod:`alignjax.training.rollout`: on-policy data (the policy's samples).
* :mod:`alignjax.training.runtime`: what a run needs around the loop: the workdir lock,
  metrics writers, progress lines and MFU, preemption signals, run records.
"""

from alignjax.training import algorithms, reference, steps

__all__ = ["algorithms", "reference", "steps"]
