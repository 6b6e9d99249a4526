"""Data sets and input pipelines."""

from alignjax.data.synthetic import SortingTask, preference_batches, to_arrays
from alignjax.data.tfds_sorting import SortingPreferences, sorting_preferences

__all__ = ["SortingPreferences", "SortingTask", "preference_batches", "sorting_preferences", "to_arrays"]
