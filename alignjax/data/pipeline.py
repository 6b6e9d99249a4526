"""grain input pipelines: process sharding, deterministic shuffling, resumable iterators.

The global order of records is a function of ``(seed, epoch)`` only: every
epoch is a fresh permutation of the source, seeded by ``seed`` and the epoch
(a NumPy permutation made once per epoch for sources of at most
:data:`PERMUTATION_MAX_RECORDS` records, grain's index shuffle for larger
ones), epochs follow each other, and global batch ``s`` is
records ``[s * B, (s + 1) * B)`` of that order (a batch may straddle two epochs).
Process ``p`` of ``P`` reads only its slice ``[p * B/P, (p + 1) * B/P)`` of every
global batch, so the processes' batches are disjoint and together are the
global batch, and no process reads records it does not use.

``batches[step]`` (a :class:`grain.MapDataset`) is this process's batch of
``step``. :func:`make_iterator` turns it into a :class:`grain.DatasetIterator`
whose state (``get_state``/``set_state``, or ``grain.checkpoint.CheckpointSave``
/ ``CheckpointRestore`` / ``CheckpointHandler`` inside an Orbax checkpoint)
restores the exact remaining batch sequence::

  batches = pipeline.sharded_batches(source, global_batch_size=64, seed=0)
  it = pipeline.make_iterator(batches)
  mngr.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))
  ...
  mngr.restore(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(it)))
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

__all__ = ["process_slice", "sharded_batches", "shuffled", "make_iterator", "iterator_state", "restore_iterator",
           "checkpoint_handler", "checkpoint_save", "checkpoint_restore"]


class _IndexMap(grain.MapDataset):
  """Element ``i`` = parent element ``self._parent_index(i)`` (batched reads stay batched)."""

  _MUTATES_ELEMENT_SPEC = False

  def _parent_index(self, index: int) -> int:
    raise NotImplementedError

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems([self._parent_index(i) for i in indices])  # pylint: disable=protected-access


class _GlobalBatchSlice(_IndexMap):
  """Element ``i`` = record ``(i // b) * B + p * b + i % b`` of the parent (``b = B / P``)."""

  def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._global = global_batch_size
    self._local = global_batch_size // process_count
    self._offset = process_index * self._local
    self._length = (len(parent) // global_batch_size) * self._local

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    step, k = divmod(index, self._local)
    return step * self._global + self._offset + k

  def __str__(self) -> str:
    return f"GlobalBatchSlice(B={self._global}, offset={self._offset}, local={self._local})"


# Sources of at most this many records are shuffled with a NumPy permutation per epoch (int64: 8 B a
# record, two epochs kept); larger ones with grain's index shuffle (no memory, ~6 us a record at 10^5
# records). On small sources grain's index shuffle is the slow part of reading a record: 0.37 ms per
# record at 100 records, 0.08 at 512, 0.013 at 4096 (it walks cycles of a permutation of a much larger
# domain until it lands in range); the test-sized frontier study spent 3 s of its 77 s of training in it.
PERMUTATION_MAX_RECORDS = 1 << 22


class _EpochPermutation(_IndexMap):
  """Element ``e * n + i`` = parent element ``e * n + perm_e[i]``, ``perm_e`` NumPy's permutation of
  ``range(n)`` seeded by ``(seed, e)``: made at the epoch's first read and kept (the last two epochs)."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = seed
    self._n = len(parent)
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self._n

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      for old in [e for e in list(self._perms) if e < epoch - 1 or e > epoch]:
        self._perms.pop(old, None)  # reader threads may race here: both compute the same permutation
      self._perms[epoch] = perm
    return perm

  def _parent_index(self, index: int) -> int:
    epoch, k = divmod(index, self._n)
    return epoch * self._n + int(self._permutation(epoch)[k])

  def __str__(self) -> str:
    return f"EpochPermutation(seed={self._seed})"


def shuffled(ds: grain.MapDataset, seed: int, *, where: str = "shuffled") -> grain.MapDataset:
  """``ds`` reshuffled every epoch: element ``e * n + i`` is record ``perm_e[i]``, ``perm_e`` a permutation
  seeded by ``(seed, e)`` (NumPy's up to :data:`PERMUTATION_MAX_RECORDS` records, else grain's index shuffle)."""
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
    raise ValueError(f"{where}: `seed` must be an int in [0, 2**32), got {seed!r}.")
  return _EpochPermutation(ds, int(seed)) if len(ds) <= PERMUTATION_MAX_RECORDS else ds.shuffle(seed=int(seed))


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"sharded_batches: `process_count` must be an int >= 1, got {process_count!r}.")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"sharded_batches: `process_index` must be an int in [0, {process_count}), got {process_index!r}.")
  return process_index, process_count


def _as_map_dataset(source) -> grain.MapDataset:
  if isinstance(source, grain.MapDataset):
    return source
  if isinstance(source, Mapping):  # dict of [N, ...] arrays
    arrays = dict(source)
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"sharded_batches: the arrays of `source` must share their leading length, got {sorted(lengths)}.")
    return grain.MapDataset.range(lengths.pop()).map(lambda i: {k: v[i] for k, v in arrays.items()})
  if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
    raise TypeError(f"sharded_batches: `source` must be a random-access source (len, [i]), a dict of arrays or a "
                    f"grain.MapDataset, got {type(source).__name__}.")
  return grain.MapDataset.source(source)


def process_slice(ds: grain.MapDataset, *, global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """This process's records of every global batch of a (globally ordered) record dataset."""
  p, n = _process(process_index, process_count)
  if not isinstance(global_batch_size, int) or global_batch_size < 1 or global_batch_size % n:
    raise ValueError(f"sharded_batches: `global_batch_size` must be a positive multiple of the process count {n}, "
                     f"got {global_batch_size!r}.")
  return _GlobalBatchSlice(ds, global_batch_size, p, n)


def sharded_batches(source: Any, *, global_batch_size: int, seed: int, shuffle: bool = True,
                    num_epochs: int | None = None, process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
  """This process's batches: ``ds[step]`` is a dict of ``[global_batch_size / P, ...]`` arrays.

  Args:
    source: a random-access source (``len``, ``source[i] -> dict``; e.g. from
      :func:`alignjax.data.files.load_preference_file` or the sorting set), a
      dict of ``[N, ...]`` arrays, or a ``grain.MapDataset`` of records.
    global_batch_size: records per step over all processes (a multiple of P).
    seed: shuffle seed, in [0, 2**32); each epoch is a different permutation derived from it.
    shuffle: shuffle records (else the source order every epoch).
    num_epochs: passes over the data (None: endless).
    process_index, process_count: default to ``jax.process_index()`` /
      ``jax.process_count()``; pass them to simulate processes.
  """
  ds = _as_map_dataset(source)
  n = len(ds)
  if not isinstance(global_batch_size, int) or not 0 < global_batch_size <= n * (num_epochs or 1):
    raise ValueError(f"sharded_batches: `global_batch_size` must be in [1, {n * (num_epochs or 1)}] "
                     f"(records x epochs), got {global_batch_size!r}.")
  if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
    raise ValueError(f"sharded_batches: `num_epochs` must be None or an int >= 1, got {num_epochs!r}.")
  if shuffle:
    ds = shuffled(ds, seed, where="sharded_batches")
  ds = ds.repeat(num_epochs)
  ds = process_slice(ds, global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count)
  local = global_batch_size // _process(process_index, process_count)[1]
  return ds.batch(local, drop_remainder=True)


def make_iterator(batches: grain.MapDataset, *, read_threads: int = 0, prefetch: int = 0,
                  start_step: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator over ``batches`` (from :func:`sharded_batches`).

  Args:
    batches: the batch dataset.
    read_threads, prefetch: grain ``ReadOptions`` (0, 0: read in the calling thread).
    start_step: first batch (``batches[start_step]``), for runs that restore a
      step count rather than an iterator state.
  """
  if not isinstance(start_step, int) or start_step < 0:
    raise ValueError(f"make_iterator: `start_step` must be an int >= 0, got {start_step!r}.")
  ds = batches[start_step:] if start_step else batches
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's position (JSON-serialisable)."""
  return it.get_state()


def restore_iterator(it: grain.DatasetIterator, state: Mapping[str, Any]) -> grain.DatasetIterator:
  """Moves a fresh iterator of the same pipeline to a saved position; returns it."""
  it.set_state(dict(state))
  return it


def checkpoint_handler():
  """grain's Orbax ``CheckpointHandler`` (one JSON state file per process)."""
  return grain.checkpoint.CheckpointHandler()


def checkpoint_save(it: grain.DatasetIterator):
  """Orbax ``args`` saving the iterator (``ocp.args.Composite(data=checkpoint_save(it))``)."""
  return grain.checkpoint.CheckpointSave(it)


def checkpoint_restore(it: grain.DatasetIterator):
  """Orbax ``args`` restoring into ``it`` in place."""
  return grain.checkpoint.CheckpointRestore(it)
