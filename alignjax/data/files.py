"""Preference data from local files, tokenised once into a TFDS array_record data set.

Inputs a researcher already has:

* JSONL (``.jsonl``/``.json``, one object per line) or Parquet (``.parquet``)
  with ``prompt``/``chosen``/``rejected`` strings, or chat ``messages`` lists
  (see :mod:`alignjax.data.tokenize` for the formats and the chat template);
* a directory written by ``datasets.Dataset.save_to_disk`` (or a
  ``DatasetDict``, with ``split``), read with pyarrow — ``datasets`` itself is
  not needed.

:func:`load_preference_file` tokenises with the checkpoint's tokenizer and
writes the arrays as a TFDS data set in array_record files (no TensorFlow)
under ``data_dir``, named by a hash of (file content, tokenizer files, lengths,
policies), so a later run with the same inputs opens it without tokenising.
It returns a random-access source (``len``, ``source[i] -> dict``) for the
grain loaders of :mod:`alignjax.data.pipeline`, and the :class:`DataReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from alignjax.data import batch as batch_lib
from alignjax.data import tokenize as tok_lib

FORMATS = ("auto", "jsonl", "parquet", "save_to_disk")
_REPORT_FILE = "alignjax_report.json"
_CACHE_VERSION = "3"  # 2: chat responses end with one end-of-turn token; chat prompts lose whole turns
# 3: a `label` column: -1 for pairs, 1 / 0 for TRL's unpaired rows (desirable or not)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceFileConfig:
  """Where preference pairs live and how they are tokenised.

  Attributes:
    path: JSONL/Parquet file or ``save_to_disk`` directory.
    tokenizer_dir: the HF checkpoint (or tokenizer) directory.
    max_len: row length T (prompt + response), right-padded.
    max_prompt_len: prompts keep their last ``max_prompt_len`` tokens (None: no limit).
    format: one of :data:`FORMATS` ("auto": by extension, directories are save_to_disk).
    split: split of a saved ``DatasetDict`` directory (None for a single Dataset).
    prompt_truncation: "keep_end" or "drop"; response_truncation: "keep_start" or "drop".
    append_eos: end responses with the tokenizer's EOS.
  """

  path: str
  tokenizer_dir: str
  max_len: int
  max_prompt_len: int | None = None
  format: str = "auto"
  split: str | None = None
  prompt_truncation: str = "keep_end"
  response_truncation: str = "keep_start"
  append_eos: bool = True

  def __post_init__(self):
    if not isinstance(self.path, str) or not self.path:
      raise ValueError(f"PreferenceFileConfig: `path` must be a non-empty string, got {self.path!r}.")
    if not isinstance(self.tokenizer_dir, str) or not self.tokenizer_dir:
      raise ValueError(f"PreferenceFileConfig: `tokenizer_dir` must be a non-empty string, got {self.tokenizer_dir!r}.")
    if self.format not in FORMATS:
      raise ValueError(f"PreferenceFileConfig: `format` must be one of {FORMATS}, got {self.format!r}.")
    self.options  # validates lengths and policies  # pylint: disable=pointless-statement

  @property
  def options(self) -> tok_lib.TokenizeOptions:
    return tok_lib.TokenizeOptions(
        max_len=self.max_len, max_prompt_len=self.max_prompt_len, prompt_truncation=self.prompt_truncation,
        response_truncation=self.response_truncation, append_eos=self.append_eos)


# ------------------------------------------------------------------------------------------
# Readers: (row_number, record) pairs.


def resolve_format(path: str, format: str = "auto") -> str:  # pylint: disable=redefined-builtin
  """The concrete format of ``path`` (one of "jsonl", "parquet", "save_to_disk")."""
  if format not in FORMATS:
    raise ValueError(f"resolve_format: `format` must be one of {FORMATS}, got {format!r}.")
  if not os.path.exists(path):
    raise ValueError(f"resolve_format: `path` {path!r} does not exist.")
  if format != "auto":
    return format
  if os.path.isdir(path):
    return "save_to_disk"
  lower = path.lower()
  if lower.endswith((".jsonl", ".json", ".ndjson")):
    return "jsonl"
  if lower.endswith((".parquet", ".pq")):
    return "parquet"
  raise ValueError(f"resolve_format: cannot tell the format of {path!r} from its name; "
                   "pass format='jsonl', 'parquet' or 'save_to_disk'.")


def _read_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        yield i, json.loads(line)
      except json.JSONDecodeError as e:
        yield i, tok_lib.BadRecord(tok_lib.INVALID_JSON, str(e))


def _read_parquet(path: str) -> Iterator[tuple[int, Any]]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  i = 0
  for record_batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
    for rec in record_batch.to_pylist():
      yield i, rec
      i += 1


def _arrow_files(path: str, split: str | None) -> list[str]:
  dict_file = os.path.join(path, "dataset_dict.json")
  if os.path.isfile(dict_file):
    with open(dict_file) as f:
      splits = json.load(f).get("splits", [])
    if split is None or split not in splits:
      raise ValueError(f"load_preference_file: {path} is a saved DatasetDict with splits {splits}; "
                       f"`split` must name one, got {split!r}.")
    path = os.path.join(path, split)
  elif split is not None:
    raise ValueError(f"load_preference_file: {path} is a single saved Dataset; `split` must be None, got {split!r}.")
  state_file = os.path.join(path, "state.json")
  if not os.path.isfile(state_file):
    raise ValueError(f"load_preference_file: {path} is not a `datasets.save_to_disk` directory (no state.json).")
  with open(state_file) as f:
    state = json.load(f)
  return [os.path.join(path, d["filename"]) for d in state["_data_files"]]


def _read_save_to_disk(path: str, split: str | None) -> Iterator[tuple[int, Any]]:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  i = 0
  for name in _arrow_files(path, split):
    with pa.memory_map(name) as source:
      reader = pa.ipc.open_stream(source)
      for record_batch in reader:
        for rec in record_batch.to_pylist():
          yield i, rec
          i += 1


def read_records(path: str, *, format: str = "auto", split: str | None = None  # pylint: disable=redefined-builtin
                 ) -> Iterator[tuple[int, Any]]:
  """``(row_number, record)`` for every record of a JSONL/Parquet file or save_to_disk directory.

  Row numbers are 0-based record indices (for JSONL: 0-based line numbers,
  blank lines skipped); an unparsable JSON line yields a
  :class:`~alignjax.data.tokenize.BadRecord`.
  """
  fmt = resolve_format(path, format)
  if fmt == "jsonl":
    return _read_jsonl(path)
  if fmt == "parquet":
    return _read_parquet(path)
  return _read_save_to_disk(path, split)


def content_hash(path: str, *, split: str | None = None) -> str:
  """sha256 over a file's bytes, or over a directory's files (names and bytes)."""
  h = hashlib.sha256()
  if os.path.isdir(path):
    files = []
    for root, _, names in os.walk(path):
      files += [os.path.join(root, n) for n in names]
    for name in sorted(files):
      rel = os.path.relpath(name, path)
      h.update(rel.encode() + b"\0" + tok_lib._sha256_file(name).encode() + b"\0")  # pylint: disable=protected-access
  else:
    h.update(tok_lib._sha256_file(path).encode())  # pylint: disable=protected-access
  h.update(f"split={split}".encode())
  return h.hexdigest()


# ------------------------------------------------------------------------------------------
# The TFDS data set.


def preference_features(seq_len: int, extra: dict[str, Any] | None = None) -> tfds.features.FeaturesDict:
  """TFDS features of the preference schema: ``[T]`` int32 tokens, bool masks (plus ``extra``)."""
  features = {}
  for key in batch_lib.PREFERENCE_KEYS:
    dtype = np.int32 if key.endswith("_tokens") else np.bool_
    features[key] = tfds.features.Tensor(shape=(seq_len,), dtype=dtype)
  features.update(extra or {})
  return tfds.features.FeaturesDict(features)


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """The ``DatasetInfo`` of a :class:`LocalBuilder`: there is no pre-computed info to fetch.

  TFDS's ``initialize_from_bucket`` (called when a builder is made before its
  data set is written) creates a ``tmp*tfds`` directory in the system temp dir
  before it looks at the TFDS bucket, and never removes it.
  """

  def initialize_from_bucket(self) -> None:
    pass


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder of data made here: nothing is downloaded, so TFDS's download messages are not printed.

  ``_info`` returns a :class:`LocalDatasetInfo` (no temp directory per builder);
  :meth:`is_prepared` checks quietly.
  """

  def is_prepared(self) -> bool:
    """Whether the data set is written (TFDS's check warns "Variant folder ... has no dataset_info.json" if not)."""
    return (self.data_path / "dataset_info.json").exists()

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


class _DropCustomConfigWarning(logging.Filter):
  """Drops TFDS's "Using custom data configuration" warning: every local data set has its own config."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


def make_builder(cls: type, **kwargs: Any) -> tfds.core.GeneratorBasedBuilder:
  """``cls(**kwargs)`` without TFDS's per-config warning (a :class:`LocalBuilder` subclass)."""
  logger, quiet = logging.getLogger("absl"), _DropCustomConfigWarning()
  logger.addFilter(quiet)
  try:
    return cls(**kwargs)
  finally:
    logger.removeFilter(quiet)


@dataclasses.dataclass
class PreferenceFileBuilderConfig(tfds.core.BuilderConfig):
  seq_len: int = 0


class PreferenceFile(LocalBuilder):
  """A tokenised local preference file (arrays are handed in, not downloaded)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [PreferenceFileBuilderConfig(name="default", seq_len=2)]

  arrays: dict[str, np.ndarray] | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return LocalDatasetInfo(
        builder=self, description=__doc__,
        features=preference_features(self.builder_config.seq_len,
                                     {"row": tfds.features.Tensor(shape=(), dtype=np.int32),
                                      "label": tfds.features.Tensor(shape=(), dtype=np.int8)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    arrays = self.arrays
    for i in range(len(arrays["row"])):
      yield i, {k: v[i] for k, v in arrays.items()}


def cache_key(config: PreferenceFileConfig, tokenizer: tok_lib.HFTokenizer) -> str:
  """Hash of (file content, tokenizer files, lengths, policies) naming the tokenised set."""
  fields = dataclasses.asdict(config)
  fields.pop("path")
  fields.pop("tokenizer_dir")
  fields["format"] = resolve_format(config.path, config.format)
  payload = json.dumps({"content": content_hash(config.path, split=config.split), "tokenizer": tokenizer.fingerprint,
                        "fields": fields, "version": _CACHE_VERSION}, sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()


def _config_name(path: str, key: str) -> str:
  stem = os.path.basename(os.path.normpath(path)).split(".")[0]
  stem = re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_")[:40] or "data"
  return f"{stem}_{key[:16]}"


def load_preference_file(config: PreferenceFileConfig, *, data_dir: str, build: bool = True):
  """Tokenises (once) and opens a local preference file; returns ``(source, report)``.

  Args:
    config: the file, tokenizer, lengths and policies.
    data_dir: where TFDS data sets are written (e.g. ``<workdir>/data``).
    build: tokenise and write the set when it is not on disk yet. Multi-host
      runs sharing ``data_dir`` call it with ``build=True`` on process 0, sync,
      then with ``build=False`` on the others (which then only open it).

  Returns:
    ``source``: a random-access array_record source, ``len(source)`` pairs,
    ``source[i]`` a dict of the :mod:`alignjax.data.batch` keys (``[max_len]``
    arrays) plus ``row`` (the pair's row number in the file).
    ``report``: a :class:`~alignjax.data.tokenize.DataReport` (``cached=True``
    when the set was already on disk).

  Raises:
    DataError: (a ValueError) a file without a usable row (one line: the file, the
      row count, the reasons).
    ValueError: ``build=False`` and the set is not on disk.
  """
  if not isinstance(config, PreferenceFileConfig):
    raise TypeError(f"load_preference_file: `config` must be a PreferenceFileConfig, got {type(config).__name__}.")
  tokenizer = tok_lib.load_tokenizer(config.tokenizer_dir)
  key = cache_key(config, tokenizer)
  builder = make_builder(
      PreferenceFile, config=PreferenceFileBuilderConfig(name=_config_name(config.path, key), seq_len=config.max_len),
      data_dir=data_dir, file_format="array_record")
  report_path = os.path.join(builder.data_dir, _REPORT_FILE)
  if builder.is_prepared() and os.path.isfile(report_path):
    with open(report_path) as f:
      report = tok_lib.DataReport.from_dict(json.load(f))
    report.cached = True
  elif not build:
    raise ValueError(f"load_preference_file: the tokenised set of {config.path} is not in {builder.data_dir} "
                     "and build=False; build it first (process 0).")
  else:
    records = read_records(config.path, format=config.format, split=config.split)
    arrays, report = tok_lib.tokenize_pairs(records, tokenizer, config.options, source=config.path)
    if report.kept == 0:
      raise tok_lib.DataError(f"load_preference_file: no usable row in {config.path} ({report.rows} rows; dropped "
                       f"{dict(sorted(report.dropped.items()))}, first rows {report.row_numbers}).")
    builder.arrays = arrays
    tfds.disable_progress_bar()
    builder.download_and_prepare()
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(report.to_dict(), f, indent=2)
    os.replace(tmp, report_path)
  return builder.as_data_source(split="train"), report
