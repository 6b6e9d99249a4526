"""Critical-token cDPO (Lin et al.): DPO with per-token weights from contrastive estimation.

Lin et al. 2024, "Critical Tokens Matter: Token-Level Contrastive Estimation
Enhances LLM's Reasoning Capability", arXiv:2411.19943 (ICML 2025), Sec. 3, as
the authors' ``CDPOTrainer`` computes it (:func:`alignjax.losses.cdpo_loss`):
per-token policy/reference log-ratios of the chosen and rejected responses,
rejected tokens weighted by ``w^r = 1 - p_cd`` and (``only_neg=False``) chosen
ones by ``w^c = p_cd``, with ``p_cd = softmax(2 z_pos - z_neg)[token]`` from a
positive and a negative model (SFT on the chosen / rejected responses);
``pairing="position"`` (default, the authors' code) pairs chosen token ``t``
with rejected token ``t`` in one sigmoid each, ``"sequence"`` is the paper's
token-weighted sequence margin.

The weights are data: ``[B, T]`` float32 columns ``rejected_weights`` (and
``chosen_weights``) of the data set, aligned with the tokens (the weight of
token ``t`` at column ``t``), written by
:func:`alignjax.study.critical_tokens.weight_pairs` from the two models. Not the
conservative DPO of Mitchell (``dpo`` with ``label_smoothing``, the study's
``cdpo``). Per-token reference log-probs: online reference only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base

WEIGHT_KEYS = ("rejected_weights", "chosen_weights")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticalTokensHParams:
  """Critical-token cDPO hyper-parameters (the authors' defaults)."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0)")
  label_smoothing: float = base.field(0.0, "cDPO / robust-DPO label-flip probability eps")
  pairing: str = base.field("position", "critical tokens: 'position' (the authors' per-position sigmoid, mean over "
                            "T) or 'sequence' (token-weighted sequence margin)")
  only_neg: bool = base.field(True, "critical tokens: weight the rejected tokens only (authors' default); False "
                              "also weights the chosen tokens by the batch's chosen_weights")

  def __post_init__(self):
    base.check(math.isfinite(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")
    base.check(0.0 <= self.label_smoothing <= 0.5,
               f"loss: `label_smoothing` must satisfy 0 <= eps <= 0.5, got {self.label_smoothing}.")
    base.check(self.pairing in ("position", "sequence"),
               f"loss: `pairing` must be one of ['position', 'sequence'], got {self.pairing!r}.")


def _weights(batch, key: str):
  if key not in batch:
    raise ValueError(f"critical_tokens: the batch has no `{key}` [B, T]; write them into the data set with "
                     "alignjax.study.critical_tokens.weight_pairs.")
  return jnp.asarray(batch[key], jnp.float32)[:, 1:]


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  w_r = _weights(batch, "rejected_weights")                       # missing weights fail before any forward
  w_c = None if hp.only_neg else _weights(batch, "chosen_weights")
  tokens, attention, mask = base.pair_inputs(batch)
  # Every use below is masked: the response labels' log-probs only (see base.label_logprobs).
  lp = base.label_logprobs(ctx.policy, tokens, attention, chunk_size=ctx.chunk_size, needed=mask)
  ref = jax.lax.stop_gradient(
      base.label_logprobs(ctx.frozen["reference"], tokens, attention, chunk_size=ctx.chunk_size, needed=mask))
  (pc, pr), (rc, rr), (mc, mr) = batch_lib.split_pair(lp), batch_lib.split_pair(ref), batch_lib.split_pair(mask)
  losses, out = L.cdpo_loss(pc, pr, rc, rr, mc, mr, rejected_weights=w_r, chosen_weights=w_c, beta=hp.beta,
                            label_smoothing=hp.label_smoothing, pairing=hp.pairing)
  metrics = base.preference_metrics(out, base.reduce(lp, mask, False))
  metrics["critical/weighted_margin"] = out.weighted_margin
  metrics["critical/mean_rejected_weight"] = L.masked_mean(w_r, mr)
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), metrics)


base.register(base.Algorithm(
    "critical_tokens", CriticalTokensHParams, objective, needs="reference_logits", token_keys=("rejected_weights",),
    description="critical-token cDPO (Lin et al. 2024): token-weighted DPO; weights in the data set "
                "(alignjax.study.critical_tokens), online reference",
    # The study trains the positive/negative models on its pairs and weighs them first.
    study={"data": "alignjax.study.critical_tokens:study_data"}))
