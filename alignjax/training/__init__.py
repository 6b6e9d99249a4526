"""Training for preference optimisation.

* :mod:`alignjax.training.objectives`: the loss table and ``LossConfig``.
* :mod:`alignjax.training.steps`: jitted train/eval steps over a pytree state.
* :mod:`alignjax.training.reference`: reference modes (online, precomputed, free).
* :mod:`alignjax.training.loop`: the train/eval loop (``loop.run``) with run reliability.
* :mod:`alignjax.training.config`: the typed, validated run config.
"""

from alignjax.training import objectives, reference, steps

__all__ = ["objectives", "reference", "steps"]
