"""TDPO1 / TDPO2: token-level DPO with the sequential KL to the reference.

Zeng et al. 2024, "Token-level Direct Preference Optimization", arXiv:2404.11999,
Eqs. 17-18 (TDPO1) and 24 (TDPO2: ``u - alpha (D_l - sg(D_w))``, as the paper and
the authors' code stop the gradient of the chosen response's sequential KL). The
per-token ``KL(pi_ref || pi)`` needs the reference's full next-token
distributions: online reference only.
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
class TDPOHParams:
  """TDPO hyper-parameters."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0)")
  alpha: float = base.field(0.5, "TDPO2 weight of the sequential-KL term (>= 0; Zeng et al. 2024 use 0.5)")
  average_log_prob: bool = base.field(False, "token-average instead of sum the sequence log-probs")

  def __post_init__(self):
    base.check(math.isfinite(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")
    # A negative alpha would reward divergence from the reference on the rejected response (Eq. 24).
    base.check(math.isfinite(self.alpha) and self.alpha >= 0,
               f"loss: `alpha` must be a finite number >= 0, got {self.alpha}.")


def _objective(variant: str):
  def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
    tokens, attention, mask = base.pair_inputs(batch)
    h, unembed = base.features(ctx.policy, tokens, attention)
    h_ref, unembed_ref = base.features(ctx.frozen["reference"], tokens, attention)
    st = L.chunked_token_stats(h[:, :-1], tokens[:, 1:], unembed, chunk_size=ctx.chunk_size,
                               reference_hidden=jax.lax.stop_gradient(h_ref[:, :-1]),
                               reference_unembed=unembed_ref, needed=mask > 0)   # response positions only
    red = lambda x: base.reduce(x, mask, hp.average_log_prob)
    stats = L.TDPOStats(logratio=red(st.logprobs - st.reference_logprobs), seq_kl=red(st.kl),
                        policy_logps=red(st.logprobs))
    chosen, rejected = batch_lib.split_pair(stats)
    losses, out = L.tdpo_loss_from_stats(chosen, rejected, beta=hp.beta, alpha=hp.alpha, variant=variant)
    metrics = base.preference_metrics(out, base.reduce(st.logprobs, mask, False))
    metrics["kl/chosen_seq"] = out.chosen_seq_kl
    metrics["kl/rejected_seq"] = out.rejected_seq_kl
    return base.ObjectiveOutput(losses, jnp.ones_like(losses), metrics)
  return objective


base.register(base.Algorithm("tdpo1", TDPOHParams, _objective("tdpo1"), needs="reference_logits",
                             description="TDPO1 (Zeng et al. 2024), online reference"))
base.register(base.Algorithm("tdpo2", TDPOHParams, _objective("tdpo2"), needs="reference_logits",
                             description="TDPO2 (Zeng et al. 2024), online reference",
                             study={"sweep": ("alpha", "tdpo2_alphas")}))
