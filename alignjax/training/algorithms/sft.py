"""Supervised fine-tuning: the token-averaged NLL of the rows to imitate (the loop's warm-up phase).

Paired batches: the chosen responses; unpaired: the desirable completions. The
weights are the token counts, so the step's ``sum(w l) / sum(w)`` is the token
mean over the whole (accumulated) batch.
"""

from __future__ import annotations

import dataclasses

import jax

from alignjax import losses as L
from alignjax.training.algorithms import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTHParams:
  """SFT has no hyper-parameters beyond the optimizer's."""


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  """Token-averaged NLL of the positive rows over the whole batch (weights = token counts)."""
  del hp
  tokens, attention, mask, row_weight = base.positive_rows(batch)
  lp = base.label_logprobs(ctx.policy, tokens, attention, chunk_size=ctx.chunk_size, needed=mask)
  count = mask.sum(axis=-1)
  nll = -L.masked_sum(lp, mask) / jax.numpy.maximum(count, 1.0)
  return base.ObjectiveOutput(nll, count * row_weight, {"nll/chosen": jax.lax.stop_gradient(nll)})


base.register(base.Algorithm("sft", SFTHParams, objective, schema="any", needs="none", preference=False,
                             description="supervised fine-tuning (the warm-up phase)"))
