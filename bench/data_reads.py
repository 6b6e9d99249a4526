r"""Batch reads of a training run: ``preference_batches`` over a TFDS source, records decoded once vs every read.

  python bench/data_reads.py                      # 2048 sorting pairs, batch 32
  python bench/data_reads.py --examples=512 --batch_size=64

``preference_batches`` keeps the decoded records of a source of at most
``synthetic.DECODED_CACHE_BYTES`` (the data sets of the study, the tests and most
research runs). The peer is what it did before, and what it still does for larger
sources: TFDS decodes each record at every read, every epoch (``DECODED_CACHE_BYTES``
set to 0). Both read the same TFDS ArrayRecord data set in one process, interleaved,
after one epoch that fills the kept records; the batches are checked to be equal. It
prints milliseconds per batch, examples per second and the ratio to the peer. The loop
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

from alignjax.data import synthetic, tfds_sorting  # noqa: E402


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
    budget = synthetic.DECODED_CACHE_BYTES
    pipelines = {}
    for label, limit in (("decoded at every read (peer)", 0), ("decoded once", budget)):
      synthetic.DECODED_CACHE_BYTES = limit
      pipelines[label] = synthetic.preference_batches(train, args.batch_size, seed=0)
    synthetic.DECODED_CACHE_BYTES = budget
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
    same = all(np.array_equal(a[k], b[k]) for step in (0, epoch + 3, 5 * epoch + 1)
               for a, b in [tuple(ds[step] for ds in pipelines.values())] for k in a)
  print(f"TFDS ArrayRecord sorting pairs: {args.examples} examples, batch {args.batch_size}, "
        f"median of {args.rounds} rounds x {args.batches} batches; batches equal: {same}")
  print("| reads | ms / batch | examples / s | vs peer |")
  print("|---|---|---|---|")
  peer = statistics.median(next(iter(times.values())))
  for label, ts in times.items():
    t = statistics.median(ts)
    print(f"| {label} | {1e3 * t:.2f} | {args.batch_size / t:,.0f} | {t / peer:.2f}x |")


if __name__ == "__main__":
  main()
