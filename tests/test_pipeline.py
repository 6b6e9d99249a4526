"""grain loaders (alignjax.data.pipeline): sharding by process, shuffling, resumable state.

References: the global order written out in NumPy from the documented rule
(epoch e is a permutation of the records; global batch s is records
[s*B, (s+1)*B) of the concatenated epochs), and uninterrupted iteration.
"""

import grain
import numpy as np
import pytest

from alignjax.data import pipeline

N = 10


def source():
  rng = np.random.default_rng(0)
  return {"row": np.arange(N, dtype=np.int32), "chosen_tokens": rng.integers(0, 50, (N, 6)).astype(np.int32)}


def rows(batches, steps):
  return [np.asarray(batches[s]["row"]) for s in range(steps)]


def test_global_order_is_per_epoch_permutations():
  B, steps = 4, 10  # 40 records = 4 epochs
  ds = pipeline.sharded_batches(source(), global_batch_size=B, seed=3, process_index=0, process_count=1)
  order = np.concatenate(rows(ds, steps))
  epochs = order.reshape(4, N)
  for e in epochs:  # each epoch is a permutation of the records
    np.testing.assert_array_equal(np.sort(e), np.arange(N))
  assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
  # Records carry their own fields.
  src = source()
  b = ds[2]
  np.testing.assert_array_equal(b["chosen_tokens"], src["chosen_tokens"][b["row"]])
  # Same seed: same order; another seed: another order; no shuffle: source order.
  again = pipeline.sharded_batches(source(), global_batch_size=B, seed=3, process_index=0, process_count=1)
  np.testing.assert_array_equal(np.concatenate(rows(again, steps)), order)
  other = pipeline.sharded_batches(source(), global_batch_size=B, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(np.concatenate(rows(other, steps)), order)
  plain = pipeline.sharded_batches(source(), global_batch_size=B, seed=3, shuffle=False, process_index=0,
                                   process_count=1)
  np.testing.assert_array_equal(np.concatenate(rows(plain, 5)), np.tile(np.arange(N), 2))


def test_processes_get_disjoint_halves_of_each_global_batch():
  B, steps = 4, 7
  full = pipeline.sharded_batches(source(), global_batch_size=B, seed=1, process_index=0, process_count=1)
  parts = [pipeline.sharded_batches(source(), global_batch_size=B, seed=1, process_index=p, process_count=2)
           for p in range(2)]
  for s in range(steps):
    g = np.asarray(full[s]["row"])
    a, b = (np.asarray(p[s]["row"]) for p in parts)
    assert len(a) == len(b) == B // 2
    np.testing.assert_array_equal(a, g[:2])
    np.testing.assert_array_equal(b, g[2:])
    assert not set(a) & set(b)
  # Iterators read the same slices.
  it0, it1 = (pipeline.make_iterator(p) for p in parts)
  for s in range(steps):
    g = np.asarray(full[s]["row"])
    np.testing.assert_array_equal(np.concatenate([next(it0)["row"], next(it1)["row"]]), g)
  with pytest.raises(ValueError, match="global_batch_size"):
    pipeline.sharded_batches(source(), global_batch_size=5, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.sharded_batches(source(), global_batch_size=4, seed=0, process_index=2, process_count=2)


def test_the_shuffle_is_uniform_and_large_sources_keep_grains_index_shuffle(monkeypatch):
  # Every record is equally likely at every position: chi-square of record-by-position counts over
  # 400 seeds x 2 epochs (81 degrees of freedom; p < 1e-4 above 140).
  counts = np.zeros((N, N))
  for seed in range(400):
    ds = pipeline.sharded_batches(source(), global_batch_size=N, seed=seed, process_index=0, process_count=1)
    for step in range(2):
      counts[np.asarray(ds[step]["row"]), np.arange(N)] += 1
  expected = counts.sum() / N**2
  assert ((counts - expected) ** 2 / expected).sum() < 140
  # Epoch 1 of seed 5 is not epoch 0 of seed 6 (the pair (seed, epoch) seeds an epoch, not their sum).
  a, b = (pipeline.sharded_batches(source(), global_batch_size=N, seed=s, process_index=0, process_count=1)
          for s in (5, 6))
  assert not np.array_equal(a[1]["row"], b[0]["row"])
  # Over PERMUTATION_MAX_RECORDS the order is grain's own shuffle (index shuffle, reseeded every epoch).
  monkeypatch.setattr(pipeline, "PERMUTATION_MAX_RECORDS", N - 1)
  big = pipeline.sharded_batches(source(), global_batch_size=N, seed=3, process_index=0, process_count=1)
  grains = grain.MapDataset.range(N).shuffle(seed=3).repeat(None)
  np.testing.assert_array_equal(np.concatenate([big[s]["row"] for s in range(3)]), [grains[i] for i in range(3 * N)])
  for bad in (-1, 2**32, 1.5, True):
    with pytest.raises(ValueError, match=r"sharded_batches: `seed` must be an int in \[0, 2\*\*32\)") as e:
      pipeline.sharded_batches(source(), global_batch_size=4, seed=bad, process_index=0, process_count=1)
    assert "\n" not in str(e.value)


def test_finite_epochs_end():
  ds = pipeline.sharded_batches(source(), global_batch_size=4, seed=0, num_epochs=2, process_index=0,
                                process_count=1)
  assert len(list(pipeline.make_iterator(ds))) == (2 * N) // 4


def test_resume_from_iterator_state_and_start_step():
  ds = pipeline.sharded_batches(source(), global_batch_size=4, seed=7, process_index=1, process_count=2)
  it = pipeline.make_iterator(ds)
  uninterrupted = [next(it)["row"] for _ in range(9)]
  it = pipeline.make_iterator(ds)
  for _ in range(4):
    next(it)
  state = pipeline.iterator_state(it)
  resumed = pipeline.restore_iterator(pipeline.make_iterator(ds), state)
  for want in uninterrupted[4:]:
    np.testing.assert_array_equal(next(resumed)["row"], want)
  from_step = pipeline.make_iterator(ds, start_step=4)
  for want in uninterrupted[4:]:
    np.testing.assert_array_equal(next(from_step)["row"], want)


def test_resume_through_an_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = pipeline.sharded_batches(source(), global_batch_size=2, seed=5, process_index=0, process_count=1)
  want = [np.asarray(ds[s]["row"]) for s in range(12)]
  it = pipeline.make_iterator(ds, read_threads=2, prefetch=2)
  seen = [next(it)["row"] for _ in range(5)]
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                             item_handlers={"data": pipeline.checkpoint_handler()}) as mngr:
    mngr.save(5, args=ocp.args.Composite(data=pipeline.checkpoint_save(it)))
    mngr.wait_until_finished()
  seen += [next(it)["row"] for _ in range(2)]  # the run goes on, then dies
  fresh = pipeline.make_iterator(ds, read_threads=2, prefetch=2)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                             item_handlers={"data": pipeline.checkpoint_handler()}) as mngr:
    mngr.restore(5, args=ocp.args.Composite(data=pipeline.checkpoint_restore(fresh)))
  resumed = seen[:5] + [next(fresh)["row"] for _ in range(7)]
  for got, w in zip(resumed, want):
    np.testing.assert_array_equal(got, w)


def test_tfds_source(tmp_path):
  from alignjax.data import SortingTask, sorting_preferences
  train, _ = sorting_preferences(SortingTask(), train_examples=12, eval_examples=4, seed=0, data_dir=str(tmp_path))
  ds = pipeline.sharded_batches(train, global_batch_size=4, seed=0, process_index=0, process_count=2)
  b = next(pipeline.make_iterator(ds))
  assert b["chosen_tokens"].shape == (2, SortingTask().seq_len)
  assert isinstance(ds, grain.MapDataset)
