import numpy as np
import pytest

from alignjax.data import SortingTask, preference_batches
from alignjax.data.synthetic import BOS, EOS, NUM_SPECIAL, PAD, SEP


def test_sorting_task_layout():
  task = SortingTask(num_symbols=6, min_len=2, max_len=5)
  data = task.generate(200, seed=0)
  assert data["chosen_tokens"].shape == (200, task.seq_len)
  for i in range(200):
    for side in ("chosen", "rejected"):
      t, a, r = (data[f"{side}_{f}"][i] for f in ("tokens", "attention", "response"))
      seq = t[a]
      assert seq[0] == BOS and seq[-1] == EOS and np.all(t[~a] == PAD)
      sep = int(np.where(seq == SEP)[0][0])
      assert np.array_equal(np.where(r)[0], np.arange(sep + 1, len(seq)))
    c = data["chosen_tokens"][i][data["chosen_response"][i]][:-1]
    rj = data["rejected_tokens"][i][data["rejected_response"][i]][:-1]
    prompt = data["chosen_tokens"][i][1:1 + len(c)]
    assert np.array_equal(c, np.sort(prompt)) and np.all(c >= NUM_SPECIAL)
    assert not np.array_equal(c, rj)
  np.testing.assert_array_equal(task.generate(5, seed=3)["rejected_tokens"],
                                task.generate(5, seed=3)["rejected_tokens"])


def test_preference_batches_deterministic_and_resumable():
  data = SortingTask().generate(50, seed=0)
  a = preference_batches(data, 8, seed=1)
  b = preference_batches(data, 8, seed=1)
  for step in (0, 3, 17):  # index-addressable: step 17 without visiting 0..16
    for k in data:
      np.testing.assert_array_equal(a[step][k], b[step][k])
  assert a[0]["chosen_tokens"].shape == (8, SortingTask().seq_len)
  with pytest.raises(ValueError, match="batch_size"):
    preference_batches(data, 51, seed=0)


class _Counting:
  """A random-access source (like TFDS's) that counts its reads; each read returns new arrays."""

  def __init__(self, data):
    self.data, self.reads = data, 0

  def __len__(self):
    return len(next(iter(self.data.values())))

  def __getitem__(self, i):
    self.reads += 1
    return {k: v[i].copy() for k, v in self.data.items()}


def test_small_source_is_read_once_per_record_and_batches_are_unchanged(monkeypatch):
  from alignjax.data import synthetic
  data = SortingTask().generate(40, seed=2)
  source = _Counting(data)
  cached, plain = preference_batches(source, 8, seed=4), preference_batches(data, 8, seed=4)
  for step in range(25):   # five epochs
    got, want = cached[step], plain[step]
    got["chosen_tokens"][:] = -1   # a consumer writing into a batch does not reach the kept records
    for k in data:
      if k != "chosen_tokens":
        np.testing.assert_array_equal(got[k], want[k])
  assert source.reads == 40   # every record once
  np.testing.assert_array_equal(cached[0]["chosen_tokens"], plain[0]["chosen_tokens"])
  # Over the memory budget: read at every access, as before.
  monkeypatch.setattr(synthetic, "DECODED_CACHE_BYTES", 1000)
  source = _Counting(data)
  big = synthetic.preference_batches(source, 8, seed=4)
  for step in range(10):
    np.testing.assert_array_equal(big[step]["rejected_tokens"], plain[step]["rejected_tokens"])
  assert source.reads == 1 + 10 * 8


def test_sorting_task_errors():
  with pytest.raises(ValueError, match="num_symbols"):
    SortingTask(num_symbols=1)
  with pytest.raises(ValueError, match="min_len"):
    SortingTask(min_len=5, max_len=3)


def test_tfds_array_record_dataset(tmp_path):
  from alignjax.data import sorting_preferences, to_arrays

  task = SortingTask(num_symbols=5, min_len=2, max_len=4)
  train, eval_ = sorting_preferences(task, train_examples=40, eval_examples=12, seed=7, data_dir=str(tmp_path))
  assert len(train) == 40 and len(eval_) == 12
  files = sorted(p.name for p in tmp_path.rglob("*.array_record*"))
  assert files and all("array_record" in f for f in files)
  assert not list(tmp_path.rglob("incomplete*"))  # written, then renamed into place
  got, want = to_arrays(train), task.generate(40, seed=7)
  assert set(got) == set(want)
  key = lambda d: sorted(map(tuple, np.concatenate([d["chosen_tokens"], d["rejected_tokens"]], 1)))
  assert key(got) == key(want)  # same pairs (TFDS stores them in its own order)
  assert got["chosen_response"].dtype == bool and got["chosen_tokens"].dtype == np.int32
  # Reopening reuses the files instead of regenerating them.
  mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.array_record*")}
  sorting_preferences(task, train_examples=40, eval_examples=12, seed=7, data_dir=str(tmp_path))
  assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.array_record*")}
  # grain batches straight from the array_record source.
  batch = preference_batches(train, 8, seed=0)[3]
  assert batch["rejected_tokens"].shape == (8, task.seq_len)
