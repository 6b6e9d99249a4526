r"""Batch reads of a training run: ``preference_batches`` over a TFDS source, as it reads and shuffles them.

  python bench/data_reads.py                      # 2048 sorting pairs, batch 32
  python bench/data_reads.py --examples=256 --batch_size=16   # the test study's sizes

``preference_batches`` keeps the decoded records of a source of at most
``synthetic.DECODED_CACHE_BYTES`` (the data sets of the study, the tests and most
research runs), and shuffles a source of at most ``pipeline.PERMUTATION_MAX_RECORDS``
with a NumPy permutation per epoch. The peer is what it did before, and what it still
does for larger sources: TFDS decodes each record at every read, every epoch
(``DECODED_CACHE_BYTES`` set to 0), and grain's index shuffle places each record
(``PERMUTATION_MAX_RECORDS`` set to 0). The middle row changes only the decoding. All
read the same TFDS ArrayRecord data set in one process, interleaved, after one epoch
that fills the kept records; the peer's and the middle row's batches (the same order)
are checked to be equal. It prints milliseconds per batch, examples per second and the
ratio to the peer. The loop
reads the next batch while the device runs the step, so this is host time a step can
hide on an accelerator; on a 2-core CPU the two share the cores. Figures depend on the
machine and its load; compare rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from alignjax.data import pipeline, synthetic, tfds_sorting  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--examples", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=200, help="timed batches per round")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
    train, _ = tfds_sorting.sorting_preferences(tfds_sorting.SortingTask(), train_examples=args.examples,
                                                eval_examples=16, seed=0, data_dir=tmp)
    budget, most = synthetic.DECODED_CACHE_BYTES, pipeline.PERMUTATION_MAX_RECORDS
    pipelines = {}
    for label, limit, permuted in (("decoded at every read, grain's index shuffle (peer)", 0, 0),
                                   ("decoded once, grain's index shuffle", budget, 0),
                                   ("decoded once, NumPy permutation per epoch", budget, most)):
      synthetic.DECODED_CACHE_BYTES, pipeline.PERMUTATION_MAX_RECORDS = limit, permuted
      pipelines[label] = synthetic.preference_batches(train, args.batch_size, seed=0)
    synthetic.DECODED_CACHE_BYTES, pipeline.PERMUTATION_MAX_RECORDS = budget, most
    epoch = args.examples // args.batch_size
    for ds in pipelines.values():   # one epoch: fills the kept records
      for step in range(epoch):
        ds[step]
    times = {label: [] for label in pipelines}
    for r in range(args.rounds):
      first = epoch + r * args.batches
      for label, ds in pipelines.items():
        t = time.perf_counter()
        for step in range(first, first + args.batches):
          ds[step]
        times[label].append((time.perf_counter() - t) / args.batches)
    peer, decoded_once = list(pipelines.values())[:2]
    same = all(np.array_equal(peer[step][k], decoded_once[step][k]) for step in (0, epoch + 3, 5 * epoch + 1)
               for k in peer[step])
  print(f"TFDS ArrayRecord sorting pairs: {args.examples} examples, batch {args.batch_size}, "
        f"median of {args.rounds} rounds x {args.batches} batches; the first two rows' batches equal: {same}")
  print("| reads | ms / batch | examples / s | vs peer |")
  print("|---|---|---|---|")
  base = statistics.median(next(iter(times.values())))
  for label, ts in times.items():
    t = statistics.median(ts)
    print(f"| {label} | {1e3 * t:.2f} | {args.batch_size / t:,.0f} | {t / base:.2f}x |")


if __name__ == "__main__":
  main()
