"""SparsePO with fixed activation-based token masks (MaPO), as the authors' ``MAPOTrainer`` computes it.

Christopoulou et al. 2024, "SparsePO: Controlling Preference Alignment of LLMs
via Sparse Token Masks", arXiv:2410.05102, Sec. 3.2 (model activation-based
masks), following ``huawei-noah/HEBO/SparsePO/src/trainers/mapo_trainer.py``:
per side, over the response labels, ``U = sum_t m_t (log pi - log pi_ref)(y_t)``
and ``K = sum_t m_t KL_t(pi_ref || pi)`` with ONE mask for both terms, and
``loss = -log sigma(beta ((U_w - U_l) - (K_l - K_w)))`` (their ``mapo_loss``:
``position_kl = sum p_ref (log pi - log pi_ref) = -KL``; no stop-gradient on
either KL, as TDPO1); logged rewards ``beta (U - K)``.

The mask of a token is computed from the FROZEN reference model's activations
at the position that predicts it (no gradient), with the authors'
``zn_rescale`` mapping: the feature-mean of the activation, z-normalised and
min-max rescaled over the row's response tokens, i.e.
``(a_t - min a) / (max a - min a)`` in [0, 1] (the z-normalisation cancels),
averaged over activation sources. ``mask``:

* ``"activations"`` (default): the sources this library's model exposes of the
  authors' default ``activation_hook="all"`` -- the final normed hidden states
  (their ``resid.post_ln_f`` hook) and the logits; their MLP, attention and
  per-layer residual hooks are not available here (a documented difference);
* ``"hidden"`` / ``"logits"``: one source;
* ``"uniform"``: every mask 1 (their ``activation_hook="uniform"``): TDPO1.

Where the authors' code divides by zero (a row with one response token, or
constant activations) the mask here is 1. Online reference only (full
distributions). The learned mask network of the authors' ``SparseTrainer``
needs trainable parameters beside the policy and is not provided yet; the loss
is :func:`alignjax.losses.sparsepo_loss`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base

MASKS = ("activations", "hidden", "logits", "uniform")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsePOHParams:
  """SparsePO (MaPO) hyper-parameters (the authors' defaults)."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0)")
  mask: str = base.field("activations", "SparsePO token masks from the reference's activations: 'activations' "
                         "(final hidden states and logits), 'hidden', 'logits', or 'uniform' (all 1: TDPO1)")

  def __post_init__(self):
    base.check(math.isfinite(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")
    base.check(self.mask in MASKS, f"loss: `mask` must be one of {list(MASKS)}, got {self.mask!r}.")


def zn_rescale(activation, mask):
  """The authors' ``zn_rescale`` of a ``[N, T]`` feature-mean activation over the ``mask`` positions, in [0, 1]."""
  on = mask > 0
  lo = jnp.min(jnp.where(on, activation, jnp.inf), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(on, activation, -jnp.inf), axis=-1, keepdims=True)
  spread = hi - lo
  ok = jnp.isfinite(spread) & (spread > 0)
  scaled = jnp.where(ok, (activation - jnp.where(ok, lo, 0.0)) / jnp.where(ok, spread, 1.0), 1.0)
  return scaled * mask


def activation_masks(mask: str, reference_hidden, reference_unembed, response, *, chunk_size: int):
  """``[N, T]`` fixed token masks (no gradient) from the reference's label-aligned hidden states."""
  if mask == "uniform":
    return response
  sources = []
  if mask in ("activations", "hidden"):
    sources.append(jnp.mean(reference_hidden.astype(jnp.float32), axis=-1))
  if mask in ("activations", "logits"):
    sources.append(L.chunked_map(lambda h: jnp.mean(reference_unembed(h).astype(jnp.float32), axis=-1),
                                 (reference_hidden,), chunk_size=chunk_size))
  masks = [zn_rescale(a, response) for a in sources]
  return jax.lax.stop_gradient(sum(masks) / len(masks))


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  tokens, attention, response = base.pair_inputs(batch)
  h, unembed = base.features(ctx.policy, tokens, attention)
  h_ref, unembed_ref = base.features(ctx.frozen["reference"], tokens, attention)
  h_ref = jax.lax.stop_gradient(h_ref[:, :-1])
  st = L.chunked_token_stats(h[:, :-1], tokens[:, 1:], unembed, chunk_size=ctx.chunk_size,
                             reference_hidden=h_ref, reference_unembed=unembed_ref)
  masks = activation_masks(hp.mask, h_ref, unembed_ref, response, chunk_size=ctx.chunk_size)
  u = jnp.sum(masks * (st.logprobs - st.reference_logprobs), axis=-1)
  k = jnp.sum(masks * st.kl, axis=-1)
  (u_c, u_r), (k_c, k_r) = batch_lib.split_pair(u), batch_lib.split_pair(k)
  logits = (u_c - u_r) - (k_r - k_c)
  losses = -jax.nn.log_sigmoid(hp.beta * logits)
  sg = jax.lax.stop_gradient
  chosen_rewards, rejected_rewards = sg(hp.beta * (u_c - k_c)), sg(hp.beta * (u_r - k_r))
  out = L.PreferenceOutput(chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                           (chosen_rewards > rejected_rewards).astype(jnp.float32), sg(logits))
  metrics = base.preference_metrics(out, base.reduce(st.logprobs, response, False))
  count = jnp.maximum(response.sum(axis=-1), 1.0)
  mask_mean = masks.sum(axis=-1) / count
  zero = ((masks <= 0) & (response > 0)).sum(axis=-1) / count
  (mm_c, mm_r), (z_c, z_r) = batch_lib.split_pair(mask_mean), batch_lib.split_pair(zero)
  metrics.update({"sparsepo/mask_mean_chosen": mm_c, "sparsepo/mask_mean_rejected": mm_r,
                  "sparsepo/sparsity_chosen": z_c, "sparsepo/sparsity_rejected": z_r,
                  "kl/chosen_masked": sg(k_c), "kl/rejected_masked": sg(k_r)})
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), metrics)


base.register(base.Algorithm(
    "sparsepo", SparsePOHParams, objective, needs="reference_logits",
    description="SparsePO with fixed activation masks (MaPO, Christopoulou et al. 2024), online reference"))
