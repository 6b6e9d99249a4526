"""SimPO (and CPO-SimPO): reference-free, length-normalised, with a target margin, as TRL's CPO computes it.

Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward", arXiv:2405.14734, Eq. 6, as TRL's ``CPOTrainer`` (``loss_type="simpo"``)
computes it: with the token-averaged policy log-probs of the responses,
``Delta = chosen_avg - rejected_avg`` and ``z = beta * Delta - gamma``, the loss
``-(1 - eps) log sigma(z) - eps log sigma(-z)`` (:func:`alignjax.losses.simpo_loss`).

CPO-SimPO (``cpo_alpha > 0``): TRL adds ``cpo_alpha * NLL`` where NLL is ONE
token-mean cross-entropy over the batch's chosen *response* tokens (CPO's labels
mask the prompt) -- computed here over the whole global batch
(:func:`alignjax.training.algorithms.base.batch_token_mean`), so it is exact with
gradient accumulation and on any mesh.

Defaults are TRL ``CPOConfig``'s (``beta=0.1``, ``simpo_gamma=0.5``) except
``cpo_alpha``: 0 here (plain SimPO), 1.0 in TRL. The SimPO paper tunes
``beta`` in 2.0-10.0 and ``gamma`` in 0.3-1.6 (its ``gamma_beta_ratio`` is
``gamma / beta``). No reference model is run.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimPOHParams:
  """SimPO hyper-parameters (TRL ``CPOConfig`` names)."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0; SimPO paper: 2.0-10.0 "
                          "on average log-probs)")
  gamma: float = base.field(0.5, "SimPO target reward margin gamma (TRL simpo_gamma; absolute, not gamma/beta)")
  label_smoothing: float = base.field(0.0, "cDPO / robust-DPO / SimPO label-flip probability eps")
  cpo_alpha: float = base.field(0.0, "CPO-SimPO: weight of the chosen responses' token-mean NLL (>= 0; 0 = SimPO; "
                                "TRL's CPOConfig default is 1.0)", static=True)

  def __post_init__(self):
    base.check(math.isfinite(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")
    base.check(math.isfinite(self.gamma), f"loss: `gamma` must be a finite number, got {self.gamma}.")
    base.check(0.0 <= self.label_smoothing <= 0.5,
               f"loss: `label_smoothing` must satisfy 0 <= eps <= 0.5, got {self.label_smoothing}.")
    base.check(math.isfinite(self.cpo_alpha) and self.cpo_alpha >= 0,
               f"loss: `cpo_alpha` must be a finite number >= 0, got {self.cpo_alpha}.")


def statistics(hp, ctx, batch) -> dict:
  """``{"chosen_tokens": [B]}``: chosen response tokens per row (the NLL's token mean over the batch)."""
  del hp, ctx
  return {"chosen_tokens": base.token_counts(batch, "chosen")}


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  """SimPO per pair, plus ``cpo_alpha`` times the batch's chosen token-mean NLL spread over the rows."""
  lp, mask, _ = base.sequence_logps(ctx.policy, batch, batch_lib.SIDES, average=True, chunk_size=ctx.chunk_size)
  pc, pr = batch_lib.split_pair(base.reduce(lp, mask, True))
  losses, out = L.simpo_loss(pc, pr, beta=hp.beta, gamma=hp.gamma, label_smoothing=hp.label_smoothing)
  metrics = base.preference_metrics(out, base.reduce(lp, mask, False))
  chosen_sum = batch_lib.split_pair(base.reduce(lp, mask, False))[0]
  if hp.cpo_alpha > 0:
    stats = ctx.statistics if ctx.statistics is not None else statistics(hp, ctx, batch)
    nll = -base.batch_token_mean(chosen_sum, stats["chosen_tokens"])
    losses = losses + hp.cpo_alpha * nll
    metrics["nll/chosen"] = jax.lax.stop_gradient(nll)
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), metrics)


base.register(base.Algorithm(
    "simpo", SimPOHParams, objective, needs="none", batch_statistics=statistics,
    description="SimPO (Meng et al. 2024) as TRL CPO loss_type=simpo; CPO-SimPO with cpo_alpha; no reference "
                "(TRL defaults beta=0.1, gamma=0.5; the paper's beta is 2-10)"))
