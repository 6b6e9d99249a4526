"""A generated preference data set: "sort the digits".

Each prompt is a random string of digit tokens. The chosen response is the
prompt sorted ascending; the rejected response is the chosen one with a single,
realistic mistake (two neighbours swapped, one digit replaced, or one dropped).
Pairs are hard to tell apart by length or token counts alone, so a policy only
learns the preference by learning the task.

Sequences are laid out as ``[BOS] prompt [SEP] response [EOS] [PAD]...`` and
stored in fixed-shape NumPy arrays:

* ``{chosen,rejected}_tokens``: ``[N, T]`` int32 ids.
* ``{chosen,rejected}_attention``: ``[N, T]`` bool, True on real tokens.
* ``{chosen,rejected}_response``: ``[N, T]`` bool, True on response tokens and
  EOS: the positions whose log-probabilities a preference loss scores.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from alignjax.data import pipeline

PAD, BOS, SEP, EOS = 0, 1, 2, 3
NUM_SPECIAL = 4


@dataclasses.dataclass(frozen=True)
class SortingTask:
  num_symbols: int = 10
  min_len: int = 3
  max_len: int = 8

  def __post_init__(self):
    if self.num_symbols < 2:
      raise ValueError(f"SortingTask: `num_symbols` must be >= 2, got {self.num_symbols}.")
    if not 2 <= self.min_len <= self.max_len:
      raise ValueError(
          f"SortingTask: need 2 <= min_len <= max_len, got min_len={self.min_len}, "
          f"max_len={self.max_len}."
      )

  @property
  def vocab_size(self) -> int:
    return NUM_SPECIAL + self.num_symbols

  @property
  def seq_len(self) -> int:
    # BOS + prompt + SEP + response (at most prompt length) + EOS.
    return 2 * self.max_len + 3

  def corrupt(self, chosen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One mistake that changes the sequence (sortedness or content)."""
    n = len(chosen)
    while True:
      kind = rng.integers(3)
      out = chosen.copy()
      if kind == 0:  # swap two unequal neighbours
        idx = [i for i in range(n - 1) if out[i] != out[i + 1]]
        if not idx:
          continue
        i = idx[rng.integers(len(idx))]
        out[i], out[i + 1] = out[i + 1], out[i]
      elif kind == 1:  # replace one digit
        i = rng.integers(n)
        out[i] = (out[i] - NUM_SPECIAL + rng.integers(1, self.num_symbols)) % self.num_symbols + NUM_SPECIAL
      else:  # drop one digit
        out = np.delete(out, rng.integers(n))
      if not np.array_equal(out, chosen):
        return out

  def _layout(self, prompt: np.ndarray, response: np.ndarray):
    T = self.seq_len
    seq = np.concatenate([[BOS], prompt, [SEP], response, [EOS]]).astype(np.int32)
    tokens = np.full(T, PAD, np.int32)
    tokens[: len(seq)] = seq
    attention = np.zeros(T, bool)
    attention[: len(seq)] = True
    response_mask = np.zeros(T, bool)
    response_mask[len(prompt) + 2: len(seq)] = True
    return tokens, attention, response_mask

  def generate(self, num_examples: int, seed: int) -> dict[str, np.ndarray]:
    if num_examples <= 0:
      raise ValueError(f"SortingTask.generate: `num_examples` must be positive, got {num_examples}.")
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {
        f"{side}_{field}": []
        for side in ("chosen", "rejected")
        for field in ("tokens", "attention", "response")
    }
    for _ in range(num_examples):
      n = rng.integers(self.min_len, self.max_len + 1)
      prompt = rng.integers(0, self.num_symbols, size=n) + NUM_SPECIAL
      chosen = np.sort(prompt)
      rejected = self.corrupt(chosen, rng)
      for side, resp in (("chosen", chosen), ("rejected", rejected)):
        t, a, r = self._layout(prompt, resp)
        cols[f"{side}_tokens"].append(t)
        cols[f"{side}_attention"].append(a)
        cols[f"{side}_response"].append(r)
    return {k: np.stack(v) for k, v in cols.items()}


def _as_source(data) -> Sequence[dict]:
  """Random-access records from a dict of arrays or any ``len``/``[i]`` source."""
  if isinstance(data, dict):
    n = len(next(iter(data.values())))
    return [{k: v[i] for k, v in data.items()} for i in range(n)]
  return data


# A source up to this size (records x the first record's bytes) keeps its decoded records.
DECODED_CACHE_BYTES = 256 << 20


class _DecodedOnce:
  """A random-access source whose records are read (decoded) once, then served from memory.

  A training run reads every record once per epoch; TFDS decodes each read anew
  (about 0.1-0.3 ms per example on CPU), which for small data sets made the batch
  reads a fifth of a study's run time. Records are returned as fresh dicts of the
  same arrays.
  """

  def __init__(self, source, first: dict):
    self._source, self._records = source, [first] + [None] * (len(source) - 1)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    record = self._records[i]
    if record is None:
      record = self._records[i] = self._source[i]
    return dict(record)


def _decoded_once(records):
  """``records`` behind :class:`_DecodedOnce` when it is a source (not a list) of at most ``DECODED_CACHE_BYTES``."""
  if isinstance(records, (list, tuple)) or not len(records):
    return records
  first = records[0]
  size = len(records) * sum(np.asarray(v).nbytes for v in first.values()) if isinstance(first, dict) else None
  return _DecodedOnce(records, first) if size is not None and size <= DECODED_CACHE_BYTES else records


def to_arrays(source) -> dict[str, np.ndarray]:
  """Stacks every record of a random-access source into a dict of arrays."""
  if isinstance(source, dict):
    return source
  records = [source[i] for i in range(len(source))]
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


def preference_batches(data, batch_size: int, seed: int, *, shuffle: bool = True) -> grain.MapDataset:
  """An endless, index-addressable grain pipeline of preference batches.

  Args:
    data: a dict of ``[N, ...]`` arrays, or a random-access source of records
      (e.g. the TFDS array_record data source of :mod:`tfds_sorting`).
    batch_size: examples per batch (remainders are dropped).
    seed: shuffle seed, in [0, 2**32).
    shuffle: shuffle the records, a fresh permutation every epoch
      (:func:`alignjax.data.pipeline.shuffled`); else the source order.

  ``ds[step]`` is the batch for ``step``, so a resumed run sees exactly the
  batches it would have seen without interruption. A source of at most
  :data:`DECODED_CACHE_BYTES` (estimated from its first record) is read once per
  record and kept in memory; larger ones are read at every access.
  """
  records = _decoded_once(_as_source(data))
  n = len(records)
  if not 0 < batch_size <= n:
    raise ValueError(
        f"preference_batches: `batch_size` must be in [1, {n}] (the data set size), got {batch_size}."
    )
  ds = grain.MapDataset.source(records)
  if shuffle:
    ds = pipeline.shuffled(ds, seed, where="preference_batches")
  return ds.repeat(None).batch(batch_size, drop_remainder=True)
