"""Training steps for preference optimisation."""

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
