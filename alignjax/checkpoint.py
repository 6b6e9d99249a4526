"""Deprecated location: see :mod:`alignjax.training.checkpoint`."""

from alignjax.training.checkpoint import Checkpointer, CheckpointMismatchError

__all__ = ["Checkpointer", "CheckpointMismatchError"]
