"""KTO: Kahneman-Tversky Optimization on unpaired rows, as TRL's ``KTOTrainer`` computes it.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv:2402.01306, Eqs. 7-8 (TRL >= 1.0, ``loss_type="kto"``):
each row is one (prompt, completion) with a ``desirable`` flag; with the summed
completion log-ratio ``r = log pi - log pi_ref``, desirable rows lose
``w_d (1 - sigma(beta (r - z0)))`` and the others ``w_u (1 - sigma(beta (z0 - r)))``,
and the batch loss is the mean over all rows.

The reference point ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` is
estimated from the batch's mismatched ``kl_*`` rows (each prompt with the
previous row's completion, :func:`alignjax.data.batch.mismatched_rows`, TRL's
rotation), without gradient. Unlike TRL, whose estimate covers one micro-batch
(gathered over processes), the mean here is over the WHOLE global batch: the
step evaluates :func:`statistics` on every micro-batch before any gradient and
hands the rows of the whole batch to every micro-batch's objective
(``Algorithm.batch_statistics``), so the loss is the same with gradient
accumulation and on any mesh. Paired data is unpaired by the loop (chosen rows
desirable, rejected ones not, TRL's ``unpair_preference_dataset``).

Reference log-probs of the completion and KL rows come from an online or
precomputed reference (``reference_{completion,kl}_logps`` keys).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base

COMPLETION = batch_lib.UNPAIRED_SIDES
KL = (batch_lib.KL_SIDE,)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOHParams:
  """KTO hyper-parameters (TRL ``KTOConfig`` defaults)."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio (> 0)")
  desirable_weight: float = base.field(1.0, "KTO weight w_d of desirable rows (>= 0; TRL default 1)")
  undesirable_weight: float = base.field(1.0, "KTO weight w_u of undesirable rows (>= 0; TRL default 1)")

  def __post_init__(self):
    base.check(math.isfinite(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")
    for name in ("desirable_weight", "undesirable_weight"):
      v = getattr(self, name)
      base.check(math.isfinite(v) and v >= 0, f"loss: `{name}` must be a finite number >= 0, got {v}.")


def _check_kl_rows(batch) -> None:
  if f"{batch_lib.KL_SIDE}_tokens" not in batch:
    raise ValueError("kto: the batch has no mismatched `kl_*` rows; add them with "
                     "alignjax.data.batch.mismatched_rows (the training loop does).")


def statistics(hp, ctx: base.Context, batch) -> dict:
  """``{"kl_logratio": [B]}``: policy minus reference summed log-probs of the KL rows (no gradient)."""
  del hp
  _check_kl_rows(batch)
  _, _, (policy_kl,) = base.sequence_logps(ctx.policy, batch, KL, average=False, chunk_size=ctx.chunk_size)
  (reference_kl,) = base.reference_sequence_logps(ctx, batch, KL, average=False)
  return {"kl_logratio": jax.lax.stop_gradient(policy_kl - reference_kl)}


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  """Per-row KTO losses with the reference point of the whole batch (``ctx.statistics``)."""
  stats = ctx.statistics if ctx.statistics is not None else statistics(hp, ctx, batch)
  diff = stats["kl_logratio"]
  kl = L.kto_kl_estimate(diff, jnp.zeros_like(diff))
  lp, mask, (policy,) = base.sequence_logps(ctx.policy, batch, COMPLETION, average=False, chunk_size=ctx.chunk_size)
  (ref,) = base.reference_sequence_logps(ctx, batch, COMPLETION, average=False)
  desirable = jnp.asarray(batch[batch_lib.DESIRABLE])
  losses, out = L.kto_loss(policy, ref, desirable, kl, beta=hp.beta, desirable_weight=hp.desirable_weight,
                           undesirable_weight=hp.undesirable_weight)
  ones = jnp.ones_like(losses)
  return base.ObjectiveOutput(losses, ones, {
      "kto/kl": out.kl * ones,
      "kto/rewards": out.rewards,
      "kto/desirable": out.desirable,
      # Batch means of these are (fraction of such rows) x (their mean reward).
      "kto/desirable_rewards": out.chosen_rewards,
      "kto/undesirable_rewards": out.rejected_rewards,
      "logps/completion": jax.lax.stop_gradient(policy),
  })


base.register(base.Algorithm(
    "kto", KTOHParams, objective, schema="unpaired", kl_rows=True, batch_statistics=statistics,
    description="KTO (Ethayarajh et al. 2024, TRL KTOTrainer): unpaired rows, KL point over the whole batch"))
