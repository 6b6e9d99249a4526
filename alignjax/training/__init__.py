"""Training for preference optimisation.

New code uses the functional API: :mod:`alignjax.training.objectives` (the loss
table and ``LossConfig``), :mod:`alignjax.training.steps` (jitted train/eval steps
over a pytree state) and :mod:`alignjax.training.reference` (reference modes).
The names re-exported below from :mod:`alignjax.training.preference` are the
earlier NNX-object API, kept working while callers move over.
"""

from alignjax.training import objectives, reference, steps

from alignjax.training.preference import (
    LOSS_NAMES,
    LossConfig,
    check_batch,
    make_optimizer,
    make_preference_eval,
    make_preference_step,
    preference_loss,
    sft_loss,
    sft_step,
)

__all__ = [
    "objectives",
    "reference",
    "steps",
    "LOSS_NAMES",
    "LossConfig",
    "check_batch",
    "make_optimizer",
    "make_preference_eval",
    "make_preference_step",
    "preference_loss",
    "sft_loss",
    "sft_step",
]
