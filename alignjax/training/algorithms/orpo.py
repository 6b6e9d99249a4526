"""ORPO: the chosen responses' NLL plus a log-odds-ratio term, as TRL's ``ORPOTrainer`` computes it.

Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
Model", arXiv:2403.07691, Eqs. 4, 6-7, as TRL's ``odds_ratio_loss``: with the
token-averaged response log-probs ``a_w``, ``a_l``,
``log_odds = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))`` and the batch loss
``NLL - beta * mean(log sigma(log_odds))`` (:func:`alignjax.losses.orpo_loss`).

TRL's NLL is ONE token-mean cross-entropy over the batch's chosen rows, and on a
decoder-only model its labels are ``input_ids`` wherever attended: the PROMPT
tokens count too (``nll_tokens="prompt_and_response"``, the default here; every
attended label whose predecessor is attended, i.e. TRL's positions on its
right-padded rows). ``nll_tokens="response"`` restricts it to the response
tokens (the paper's ``L_SFT`` on the response). The token mean is over the
whole global batch (:func:`alignjax.training.algorithms.base.batch_token_mean`),
so the loss is exact with gradient accumulation and on any mesh. No reference
model is run.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base

NLL_TOKENS = ("prompt_and_response", "response")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ORPOHParams:
  """ORPO hyper-parameters (TRL ``ORPOConfig`` defaults)."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0; ORPO lambda, TRL 0.1)")
  nll_tokens: str = base.field("prompt_and_response", "ORPO NLL tokens: 'prompt_and_response' (TRL's labels on a "
                               "decoder-only model) or 'response'")

  def __post_init__(self):
    base.check(math.isfinite(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")
    base.check(self.nll_tokens in NLL_TOKENS, f"loss: `nll_tokens` must be one of {list(NLL_TOKENS)}, "
               f"got {self.nll_tokens!r}.")


def _prompt(hp) -> bool:
  return hp.nll_tokens == "prompt_and_response"


def statistics(hp, ctx, batch) -> dict:
  """``{"nll_tokens": [B]}``: the chosen rows' NLL label counts (the NLL's token mean over the batch)."""
  del ctx
  return {"nll_tokens": base.token_counts(batch, "chosen", prompt=_prompt(hp))}


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  """ORPO per pair: the batch token-mean NLL spread over the rows minus beta log sigma(log odds)."""
  lp, mask, _ = base.sequence_logps(ctx.policy, batch, batch_lib.SIDES, average=False, chunk_size=ctx.chunk_size,
                                    response_only=not _prompt(hp))   # the NLL may count prompt labels
  pc, pr = batch_lib.split_pair(base.reduce(lp, mask, True))
  lp_chosen = batch_lib.split_pair(lp)[0]
  stats = ctx.statistics if ctx.statistics is not None else statistics(hp, ctx, batch)
  chosen_sum = L.masked_sum(lp_chosen, base.label_mask(batch, "chosen", prompt=_prompt(hp)))
  nll = -base.batch_token_mean(chosen_sum, stats["nll_tokens"])
  losses, out = L.orpo_loss(pc, pr, nll, beta=hp.beta)
  metrics = base.preference_metrics(out, base.reduce(lp, mask, False))
  metrics.update({"orpo/log_odds_ratio": out.log_odds_ratio, "orpo/log_odds_chosen": out.log_odds_chosen,
                  "nll/chosen": jax.lax.stop_gradient(nll)})
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), metrics)


base.register(base.Algorithm(
    "orpo", ORPOHParams, objective, needs="none", batch_statistics=statistics,
    description="ORPO (Hong et al. 2024) as TRL odds_ratio_loss: chosen NLL (prompt+response, nll_tokens) + odds "
                "ratio; no reference"))
