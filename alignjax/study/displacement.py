"""The CHES data filter: drop the preference pairs most prone to likelihood displacement.

Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in
Direct Preference Optimization", arXiv:2410.08847, Sec. 6: score every pair by
(length-normalised) CHES from the policy's final hidden states and keep the
pairs with the LOWEST scores (the authors filter out the highest-scoring ones).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from alignjax.data import batch as batch_lib

__all__ = ["ches_filter", "ches_scores"]


def ches_scores(model, data: Mapping[str, Any], *, length_normalize: bool = True,
                batch_size: int = 64) -> np.ndarray:
  """``[N]`` CHES scores of every pair of a paired data dict (Razin et al. 2024, Definition 2)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax.training import diagnostics  # pylint: disable=import-outside-toplevel
  batch_lib.check_batch(data, batch_lib.PAIRED)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"ches_scores: `batch_size` must be a positive int, got {batch_size!r}.")
  fn = diagnostics.make_ches_fn(model, length_normalize=length_normalize)
  params = nnx.split(model, nnx.Param, ...)[1]
  n = batch_lib.num_examples(data)
  out = []
  for start in range(0, n, batch_size):
    rows = {k: np.asarray(data[k][start:start + batch_size]) for k in batch_lib.PAIRED.keys()}
    out.append(np.asarray(fn(params, rows)))
  return np.concatenate(out)


def ches_filter(model, data: Mapping[str, Any], *, keep_fraction: float, length_normalize: bool = True,
                batch_size: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """``(kept_data, scores)``: the ``keep_fraction`` of pairs with the lowest CHES, in their original order.

  ``kept_data`` holds every key of ``data`` (extra columns too) for the kept
  rows; ``scores`` are the ``[N]`` scores of all rows. At least one pair is kept.
  """
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"ches_filter: `keep_fraction` must be in (0, 1], got {keep_fraction}.")
  scores = ches_scores(model, data, length_normalize=length_normalize, batch_size=batch_size)
  keep = max(1, int(round(keep_fraction * len(scores))))
  rows = np.sort(np.argsort(scores, kind="stable")[:keep])
  return {k: np.asarray(v)[rows] for k, v in data.items()}, scores
