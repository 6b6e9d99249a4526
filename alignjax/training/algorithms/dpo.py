"""DPO (with cDPO and robust DPO) and the GPO family over sequence log-probabilities.

* DPO: Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290,
  Eq. 7; conservative DPO (cDPO, Mitchell 2023) through ``label_smoothing``;
  robust DPO: Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, Eq. 6.
* GPO: Tang et al. 2024, "Generalized Preference Optimization", arXiv:2402.05749,
  Eq. 4: ``f(beta * rho)`` for the convex functions of
  :data:`alignjax.losses.GPO_FUNCTIONS` and their aliases (IPO: Azar et al. 2023,
  arXiv:2310.12036; SLiC: Zhao et al. 2023, arXiv:2305.10425), one registry entry each.

Reference log-probs come from any reference mode (online, precomputed, free).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base


def _check_beta(beta: float) -> None:
  base.check(isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0,
             f"loss: `beta` must be a finite number > 0, got {beta}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOHParams:
  """DPO hyper-parameters."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0)")
  label_smoothing: float = base.field(
      0.0, "cDPO / robust-DPO label-flip probability eps (0 <= eps < 0.5; robust: needs eps > 0)")
  robust: bool = base.field(False, "robust-DPO estimator (Chowdhury et al. 2024; needs label_smoothing > 0)")
  average_log_prob: bool = base.field(False, "token-average instead of sum the sequence log-probs")

  def __post_init__(self):
    _check_beta(self.beta)
    # cDPO / robust DPO (arXiv:2403.00409, Eq. 9): eps < 1/2 (robust divides by 1 - 2 eps).
    base.check(0.0 <= self.label_smoothing < 0.5,
               f"loss: `label_smoothing` must satisfy 0 <= eps < 0.5, got {self.label_smoothing}.")
    base.check(not self.robust or self.label_smoothing > 0,
               "loss: `robust` needs `label_smoothing` > 0 (robust DPO with eps = 0 is plain DPO).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPOHParams:
  """GPO hyper-parameters."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0)")
  average_log_prob: bool = base.field(False, "token-average instead of sum the sequence log-probs")

  def __post_init__(self):
    _check_beta(self.beta)


def sequence_objective(loss_fn):
  """An objective over sequence log-probs: ``loss_fn(hp, pc, pr, rc, rr) -> (losses, PreferenceOutput)``."""

  def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
    lp, mask, (pc, pr) = base.sequence_logps(ctx.policy, batch, batch_lib.SIDES, average=hp.average_log_prob,
                                             chunk_size=ctx.chunk_size)
    rc, rr = base.reference_sequence_logps(ctx, batch, batch_lib.SIDES, average=hp.average_log_prob)
    losses, out = loss_fn(hp, pc, pr, rc, rr)
    return base.ObjectiveOutput(losses, jnp.ones_like(losses),
                                base.preference_metrics(out, base.reduce(lp, mask, False)))

  return objective


def _dpo(hp, pc, pr, rc, rr):
  return L.dpo_loss(pc, pr, rc, rr, beta=hp.beta, label_smoothing=hp.label_smoothing, robust=hp.robust)


def _gpo(loss_type: str):
  return lambda hp, pc, pr, rc, rr: L.gpo_loss(pc, pr, rc, rr, beta=hp.beta, loss_type=loss_type)


base.register(base.Algorithm(
    "dpo", DPOHParams, sequence_objective(_dpo), reference_free_ok=True,
    description="DPO (Rafailov et al. 2023), cDPO / robust DPO with label_smoothing",
    study={"methods": {"dpo": {}, "cdpo": {"label_smoothing": "@cdpo_epsilon"}}}))
# The frontier study runs each GPO function once: logistic is DPO, squared runs as IPO, hinge as SLiC.
_STUDY_METHODS = {"logistic": {}, "squared": {}, "slic": {}, "hinge": {"slic": {}}}
for _name in sorted(set(L.GPO_FUNCTIONS) | set(L.GPO_ALIASES)):
  if _name != "dpo":
    base.register(base.Algorithm(
        _name, GPOHParams, sequence_objective(_gpo(_name)), reference_free_ok=True,
        description=f"GPO with the {_name} function (Tang et al. 2024)",
        study={"methods": _STUDY_METHODS.get(_name, {_name: {}})}))
