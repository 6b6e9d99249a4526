"""Reward-model training: the Bradley–Terry pairwise loss on a scalar reward model.

Ouyang et al. 2022, "Training language models to follow instructions with human
feedback" (InstructGPT), arXiv:2203.02155, Sec. 3.5 and Eq. 1:
``loss = -E[log sigma(r(x, y_w) - r(x, y_l))]``, with Llama 2's margin
(Touvron et al. 2023, arXiv:2307.09288, Eq. 2) and the centering term of
Eisenstein et al. 2023 (arXiv:2312.09244), as TRL's ``RewardTrainer.compute_loss``
computes them (:func:`alignjax.losses.bradley_terry_loss`).

The trained model is an :class:`alignjax.models.RewardModel`: the run's policy
decoder (``config.model`` at random init, or ``init.checkpoint``, e.g. an SFT run)
with its unembedding replaced by a fresh scalar head (InstructGPT Sec. 3.5; the
``make_model`` hook), scoring each row at its last real token. The run's final
model (``<workdir>/final_policy``) is that reward model; ``launch/convert.py
--direction=to_hf`` writes it as a one-label ``*ForSequenceClassification``.
The loop's held-out evaluation reports its pairwise accuracy ``rewards/accuracy``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base

MARGIN_KEY = "margin"   # an optional per-pair [B] batch key (TRL's ``margin`` column)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardHParams:
  """Bradley–Terry reward-model hyper-parameters."""
  margin: float = base.field(
      0.0, "required score gap m of every pair, -log sigma(r_w - r_l - m) (Llama 2 Eq. 2); a per-pair 'margin' "
           "batch key is added to it", static=True)
  center_rewards_coefficient: float = base.field(
      0.0, "eta of TRL's centering term eta (r_w + r_l)^2 (Eisenstein et al. 2023; >= 0, 0: off)", static=True)

  def __post_init__(self):
    base.check(isinstance(self.margin, (int, float)) and math.isfinite(self.margin),
               f"loss: `margin` must be a finite number, got {self.margin}.")
    base.check(isinstance(self.center_rewards_coefficient, (int, float))
               and math.isfinite(self.center_rewards_coefficient) and self.center_rewards_coefficient >= 0,
               f"loss: `center_rewards_coefficient` must be a finite number >= 0, got "
               f"{self.center_rewards_coefficient}.")


def pair_scores(model, batch):
  """``(chosen [B], rejected [B])`` scores of a reward model on ``[chosen; rejected]`` in one forward.

  ``model(tokens, attention_mask=mask) -> [N]`` (:class:`alignjax.models.RewardModel`:
  the score at each row's last real token; InstructGPT, arXiv:2203.02155, Sec. 3.5).
  """
  tokens, attention, _ = base.pair_inputs(batch)
  scores = model(tokens, attention_mask=attention)
  if scores.ndim != 1:
    raise ValueError(f"reward objective: the model must return scores [N] (an alignjax.models.RewardModel), "
                     f"got shape {scores.shape}.")
  return batch_lib.split_pair(scores)


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  """Bradley–Terry loss per pair (InstructGPT, arXiv:2203.02155, Eq. 1; TRL's ``RewardTrainer``).

  ``-log sigma(r_w - r_l - m) + eta (r_w + r_l)^2`` with ``m = hp.margin`` plus the
  batch's ``margin`` key when present and ``eta = hp.center_rewards_coefficient``.
  Metrics: ``rewards/{chosen,rejected,margins,accuracy}`` (TRL's ``accuracy`` is
  ``r_w > r_l``).
  """
  chosen, rejected = pair_scores(ctx.policy, batch)
  margin = None
  if hp.margin or MARGIN_KEY in batch:
    margin = jnp.float32(hp.margin)
    if MARGIN_KEY in batch:
      margin = margin + jnp.asarray(batch[MARGIN_KEY], jnp.float32)
  center = hp.center_rewards_coefficient or None
  losses, out = L.bradley_terry_loss(chosen, rejected, margin=margin, center_rewards_coefficient=center)
  metrics = {"rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
             "rewards/margins": out.margins, "rewards/accuracy": out.accuracies}
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), metrics)


def make_model(policy, rngs, hparams=None):  # pylint: disable=unused-argument
  """The reward model trained: ``policy``'s decoder with a fresh scalar head (a RewardModel is kept).

  InstructGPT (arXiv:2203.02155, Sec. 3.5): the (SFT) language model with its
  final unembedding layer replaced by a projection to a scalar.
  """
  from alignjax.models import RewardModel  # pylint: disable=import-outside-toplevel
  if isinstance(policy, RewardModel):   # init.checkpoint is a reward model: go on training it
    return policy
  return RewardModel.from_backbone(policy, rngs=rngs)


def validate_run(cfg) -> None:
  """Run-level checks: no SFT phase (it trains the LM head a reward model drops), unscanned layers."""
  base.check(cfg.sft.steps == 0,
             f"config.sft.steps must be 0 for loss.name='reward' (it trains a reward model, not the LM), "
             f"got {cfg.sft.steps}; warm up with an SFT run and pass it as config.init.checkpoint.")
  base.check(not cfg.model.scan_layers,
             "config.model.scan_layers must be False for loss.name='reward' (reward models are saved per layer).")


base.register(base.Algorithm(
    "reward", RewardHParams, objective, needs="none", make_model=make_model, validate_run=validate_run,
    description="Bradley-Terry reward model (InstructGPT / TRL RewardTrainer): margin, centering; "
                "held-out pairwise accuracy",
    study={"methods": {}}))   # a reward model is not a policy: no point of the frontier study
