"""Data sets and input pipelines.

* :mod:`alignjax.data.batch`: the preference batch schema.
* :mod:`alignjax.data.files`: local JSONL/Parquet/save_to_disk preference files,
  tokenised once into a TFDS array_record data set (:func:`load_preference_file`).
* :mod:`alignjax.data.tokenize`: the checkpoint's tokenizer, truncation, reports.
* :mod:`alignjax.data.pipeline`: grain loaders sharded by process, resumable.
* :mod:`alignjax.data.synthetic`, :mod:`alignjax.data.tfds_sorting`,
  :mod:`alignjax.data.reviews`: generated tasks.
"""

from alignjax.data.files import PreferenceFileConfig, load_preference_file, read_records
from alignjax.data.pipeline import make_iterator, sharded_batches
from alignjax.data.synthetic import SortingTask, preference_batches, to_arrays
from alignjax.data.tfds_sorting import SortingPreferences, sorting_preferences
from alignjax.data.tokenize import DataError, DataReport, HFTokenizer, TokenizeOptions, load_tokenizer, tokenize_pairs

__all__ = ["DataError", "DataReport", "HFTokenizer", "PreferenceFileConfig", "SortingPreferences", "SortingTask",
           "TokenizeOptions", "load_preference_file", "load_tokenizer", "make_iterator", "preference_batches",
           "read_records", "sharded_batches", "sorting_preferences", "to_arrays", "tokenize_pairs"]
