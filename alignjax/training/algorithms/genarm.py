"""GenARM's autoregressive reward model: a reference-free pairwise loss on summed log-probs.

Xu et al. 2025, "GenARM: Reward Guided Generation with Autoregressive Reward
Model for Test-time Alignment", arXiv:2410.08193, Sec. 4, as the authors'
``arm_loss`` computes it: ``-log sigma(beta (log pi_r(y_w|x) - log pi_r(y_l|x)))``
with summed response log-probs and no reference
(:func:`alignjax.losses.genarm_loss`). The trained policy is the ARM
``pi_r``; at decoding time it guides a base model through the sampler's model
combination, ``softmax((log pi_base + alpha log pi_r) / T)``
(:mod:`alignjax.decoding`); the frontier study trains it on its pairs and
plots that combination with its SFT model over ``genarm_alphas``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenARMHParams:
  """GenARM hyper-parameters."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0; GenARM authors: 0.05-0.5)")

  def __post_init__(self):
    base.check(math.isfinite(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  lp, mask, (pc, pr) = base.sequence_logps(ctx.policy, batch, batch_lib.SIDES, average=False,
                                           chunk_size=ctx.chunk_size)
  losses, out = L.genarm_loss(pc, pr, beta=hp.beta)
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), base.preference_metrics(out, base.reduce(lp, mask, False)))


base.register(base.Algorithm(
    "genarm", GenARMHParams, objective, needs="none",
    description="GenARM autoregressive reward model (Xu et al. 2025): reference-free pairwise loss on summed "
                "log-probs",
    # The study samples base + alpha * ARM (decoding.genarm), not the ARM alone.
    study={"plotted": False}))
