"""Data sets and input pipelines.

* :mod:`alignjax.data.batch`: the preference batch schema.
* :mod:`alignjax.data.files`: local JSONL/Parquet/save_to_disk preference files,
  tokenised once into a TFDS array_record data set (:func:`load_preference_file`).
* :mod:`alignjax.data.tokenize`: the checkpoint's tokenizer, truncation, reports.
* :mod:`alignjax.data.pipeline`: grain loaders sharded by process, resumable.
* :mod:`alignjax.data.synthetic`, :mod:`alignjax.data.tfds_sorting`,
  :mod:`alignjax.data.reviews`: generated tasks.
"""

import importlib

# Imported on first use: ``alignjax.data.batch`` (imported by every training step) must not
# pull in TFDS and grain (seconds of start-up; absent on accelerator images).
_EXPORTS = {
    "files": ("PreferenceFileConfig", "load_preference_file", "read_records"),
    "pipeline": ("make_iterator", "sharded_batches"),
    "synthetic": ("SortingTask", "preference_batches", "to_arrays"),
    "tfds_sorting": ("SortingPreferences", "sorting_preferences"),
    "tokenize": ("DataError", "DataReport", "HFTokenizer", "TokenizeOptions", "load_tokenizer", "tokenize_pairs"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


_SUBMODULES = ("arrays_tfds", "batch", "files", "pipeline", "real_assets", "reviews", "synthetic", "tfds_sorting",
               "tokenize")


def __getattr__(name):
  if name in _WHERE:
    return getattr(importlib.import_module(f"alignjax.data.{_WHERE[name]}"), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"alignjax.data.{name}")
  raise AttributeError(f"module 'alignjax.data' has no attribute {name!r}")
