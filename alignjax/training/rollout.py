"""On-policy data: a batch of the policy's own samples for the prompts of a data batch.

Used by algorithms that train on the policy's samples (``Algorithm.rollout``),
e.g. on-policy AlignDistil (Zhang et al. 2025, arXiv:2503.02832, Sec. 4.3: one
sample per prompt at temperature 1, top-p 1, every step).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from alignjax.data import batch as batch_lib

__all__ = ["make_rollout"]


def make_rollout(policy, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int, seed: int,
                 temperature: float = 1.0, top_p: float = 1.0) -> Callable[[Any, Mapping[str, Any], int], dict]:
  """``rollout(params, batch, step) -> batch`` of one policy sample per prompt.

  The prompts are the batch's first-side rows' prompt tokens (left in place; the
  sampler left-aligns them). Each prompt gets one response sampled from the
  policy (``params`` merged into ``policy``'s graph) with
  :func:`alignjax.decoding.generate` at ``temperature``/``top_p``, from the key
  ``fold_in(key(seed), step)`` (a resumed run draws the same samples). The
  result is a paired-schema batch ``[B, T + max_new_tokens]`` whose chosen and
  rejected rows are both prompt + sample.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax import decoding  # pylint: disable=import-outside-toplevel

  if max_new_tokens < 1:
    raise ValueError(f"make_rollout: `max_new_tokens` must be >= 1, got {max_new_tokens}.")
  graphdef, _, rest = nnx.split(policy, nnx.Param, ...)
  key = jax.random.key(seed)

  def rollout(params, batch, step: int) -> dict:
    model = nnx.merge(graphdef, params, rest)
    tokens = np.asarray(batch[batch_lib.detect(batch).first_key])
    mask = batch_lib.prompt_mask(batch)
    out = decoding.generate(model, tokens, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, eos_token_ids=(eos_token_id,), pad_token_id=pad_token_id,
                            rng=jax.random.fold_in(key, step))
    return batch_lib.response_batch(tokens, mask, np.asarray(out.tokens), np.asarray(out.mask),
                                    pad_token_id=pad_token_id)

  return rollout
