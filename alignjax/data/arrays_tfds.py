"""In-memory arrays written as a TFDS array_record data set (no TensorFlow), read back with grain.

Generated data -- the reviews task's SFT set, preference pairs labelled from
samples of a model -- starts as a dict of ``[N, ...]`` NumPy arrays.
:func:`write_arrays` stores such dicts (one per split) as a TFDS data set in
array_record files under a directory; :func:`open_arrays` opens a split as a
random-access source (``len(source)``, ``source[i] -> dict``) that
:func:`alignjax.data.pipeline.sharded_batches` and
:func:`alignjax.data.synthetic.preference_batches` index directly, like
:mod:`alignjax.data.tfds_sorting` and :mod:`alignjax.data.files`.

The preference keys of :mod:`alignjax.data.batch` get the features of
:func:`alignjax.data.files.preference_features` (int32 tokens, bool masks);
every other key is stored with its own per-example shape and dtype. A small
JSON ``metadata`` dict (e.g. the vocabulary size) is kept next to the data.

Writing is atomic (TFDS writes into an ``incomplete.*`` directory and renames
it when done), and a directory that already holds a prepared data set is
opened, not rewritten, unless ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from alignjax.data import batch as batch_lib
from alignjax.data.files import LocalBuilder, LocalDatasetInfo, make_builder, preference_features

__all__ = ["ArraysDataset", "is_prepared", "open_arrays", "read_metadata", "write_arrays"]

_META = "alignjax_arrays.json"
_NAME = "arrays_dataset"


@dataclasses.dataclass
class ArraysConfig(tfds.core.BuilderConfig):
  """The per-example shapes and dtypes of the stored keys (a JSON-able spec)."""
  spec: dict = dataclasses.field(default_factory=dict)  # key -> [shape list, dtype name]
  splits: tuple = ("train",)


class ArraysDataset(LocalBuilder):
  """A data set of arrays handed in by the caller (nothing is downloaded)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ArraysConfig(name="default")]

  arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    spec = self.builder_config.spec
    pref = [k for k in batch_lib.PREFERENCE_KEYS if k in spec]
    extra = {k: tfds.features.Tensor(shape=tuple(s), dtype=np.dtype(d))
             for k, (s, d) in spec.items() if k not in pref}
    if len(pref) == len(batch_lib.PREFERENCE_KEYS):
      features = preference_features(spec[pref[0]][0][0], extra)
    else:
      extra.update({k: tfds.features.Tensor(shape=tuple(spec[k][0]), dtype=np.dtype(spec[k][1])) for k in pref})
      features = tfds.features.FeaturesDict(extra)
    return LocalDatasetInfo(builder=self, description=__doc__, features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name) for name in self.builder_config.splits}

  def _generate_examples(self, split: str):
    arrays = self.arrays[split]
    n = len(next(iter(arrays.values())))
    for i in range(n):
      yield i, {k: v[i] for k, v in arrays.items()}


def _spec(fn: str, splits: Mapping[str, Mapping[str, Any]]) -> tuple[dict, dict]:
  """Validated NumPy splits and their common ``key -> [shape, dtype]`` spec."""
  if not isinstance(splits, Mapping) or not splits:
    raise ValueError(f"{fn}: `splits` must be a non-empty mapping split name -> dict of arrays, got {splits!r}.")
  out, spec = {}, None
  for name, arrays in splits.items():
    if not isinstance(name, str) or not name.isidentifier():
      raise ValueError(f"{fn}: split names must be identifiers (e.g. 'train'), got {name!r}.")
    if not isinstance(arrays, Mapping) or not arrays:
      raise ValueError(f"{fn}: split {name!r} must be a non-empty dict of [N, ...] arrays.")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1 or 0 in lengths.values():
      raise ValueError(f"{fn}: the arrays of split {name!r} must share a leading length N >= 1, got {lengths}.")
    for k, v in arrays.items():
      if k in batch_lib.PREFERENCE_KEYS:
        arrays[k] = v.astype(np.int32 if k.endswith("_tokens") else np.bool_)
      elif v.dtype.kind not in "biuf":
        raise TypeError(f"{fn}: array {k!r} of split {name!r} must be numeric or bool, got dtype {v.dtype}.")
    s = {k: [list(v.shape[1:]), v.dtype.name] for k, v in arrays.items()}
    if spec is not None and s != spec:
      raise ValueError(f"{fn}: split {name!r} has keys/shapes {s}, other splits have {spec}.")
    spec = s
    out[name] = arrays
  return out, spec


def _builder(path: str, spec: dict, splits: tuple) -> ArraysDataset:
  config = ArraysConfig(name="arrays", spec=spec, splits=tuple(splits))
  return make_builder(ArraysDataset, config=config, data_dir=path, file_format="array_record")


def _meta_path(path: str) -> str:
  return os.path.join(path, _META)


def is_prepared(path: str) -> bool:
  """True when ``path`` holds a data set written by :func:`write_arrays`."""
  return os.path.isfile(_meta_path(path))


def write_arrays(path: str, splits: Mapping[str, Mapping[str, Any]], *,
                 metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes ``splits`` (name -> dict of ``[N, ...]`` arrays) as a TFDS array_record data set.

  Args:
    path: the data set directory (created).
    splits: e.g. ``{"train": arrays, "eval": arrays}``; every split has the same
      keys, per-example shapes and dtypes. Preference keys of
      :mod:`alignjax.data.batch` are stored as int32 tokens / bool masks.
    metadata: JSON-serialisable facts about the data (e.g. ``vocab_size``),
      returned by :func:`read_metadata`.
    overwrite: replace a data set already at ``path`` (default: keep it and
      return at once -- the writer of a resumable pipeline calls this every run).

  Returns:
    ``path`` (absolute).
  """
  fn = "write_arrays"
  if not isinstance(path, str) or not path:
    raise ValueError(f"{fn}: `path` must be a non-empty string, got {path!r}.")
  path = os.path.abspath(path)
  if is_prepared(path) and not overwrite:
    return path
  arrays, spec = _spec(fn, splits)
  meta = dict(metadata or {})
  try:
    json.dumps(meta)
  except TypeError as e:
    raise TypeError(f"{fn}: `metadata` must be JSON-serialisable ({e}).") from None
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  builder = _builder(path, spec, tuple(arrays))
  builder.arrays = arrays
  tfds.disable_progress_bar()
  builder.download_and_prepare()
  record = {"spec": spec, "splits": {k: int(len(next(iter(v.values())))) for k, v in arrays.items()},
            "metadata": meta}
  tmp = _meta_path(path) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, _meta_path(path))  # last: marks the data set complete
  return path


def _record(fn: str, path: str) -> dict:
  if not isinstance(path, str) or not is_prepared(os.path.abspath(path)):
    raise ValueError(f"{fn}: `path` {path!r} holds no data set written by alignjax.data.arrays_tfds.write_arrays.")
  with open(_meta_path(os.path.abspath(path))) as f:
    return json.load(f)


def read_metadata(path: str) -> dict:
  """The ``metadata`` dict stored by :func:`write_arrays`, plus ``splits`` (name -> size)."""
  rec = _record("read_metadata", path)
  return dict(rec["metadata"], splits=dict(rec["splits"]))


def open_arrays(path: str, split: str = "train"):
  """A random-access source of one split: ``len(source)``, ``source[i] -> dict of arrays``.

  The source is TFDS's array_record data source, which grain reads directly
  (``grain.MapDataset.source(source)``, :func:`alignjax.data.pipeline.sharded_batches`).
  """
  rec = _record("open_arrays", path)
  if split not in rec["splits"]:
    raise ValueError(f"open_arrays: `split` must be one of {sorted(rec['splits'])}, got {split!r}.")
  builder = _builder(os.path.abspath(path), rec["spec"], tuple(rec["splits"]))
  return builder.as_data_source(split=split)
