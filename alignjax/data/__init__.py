"""Data sets and input pipelines."""

from alignjax.data.synthetic import SortingTask, preference_batches

__all__ = ["SortingTask", "preference_batches"]
