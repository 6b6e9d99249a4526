"""Critical tokens: contrastive-estimation token scores and the token-weighted DPO of Lin et al.

Lin et al., 2024. Critical Tokens Matter: Token-Level Contrastive Estimation
Enhances LLM's Reasoning Capability. arXiv:2411.19943 (ICML 2025).

Two models are fine-tuned from the policy, one on correct ("positive") and one
on incorrect ("negative") reasoning trajectories. A token of a trajectory is
scored by the contrastive distribution ``softmax(2 z_pos - z_neg)`` at the
token (:func:`critical_token_scores`); on incorrect trajectories, tokens with a
*low* score are the critical ones the negative model prefers. The authors'
training (``src/train/train_cdpo.py``, ``CDPOTrainer``) then runs a DPO whose
per-token log-ratios are weighted, ``1 - p_cd`` on rejected tokens and (when
``only_neg=False``) ``p_cd`` on chosen ones; by default (``only_neg=True``) the
chosen tokens keep weight 1. :func:`cdpo_loss` is that loss.

Not to be confused with "cDPO" = conservative DPO (label smoothing) in
:func:`alignjax.losses.dpo_loss`; here the name of the loss keeps the authors'
spelling and its diagnostics are :class:`CriticalTokenOutput`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from alignjax.losses import _checks
from alignjax.losses.logprobs import token_logprobs

Array = jax.Array

PAIRINGS = ("position", "sequence")


def _f32(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def critical_token_scores(positive_logits, negative_logits, labels) -> Array:
  """Contrastive-estimation score ``p_cd[b, t] = softmax(2 z_pos - z_neg)[labels[b, t]]``.

  Lin et al., 2024, arXiv:2411.19943, Sec. 3 (contrastive estimation: the score
  with contrast weight 1), as the authors' ``calculate_ce_score``
  computes it: ``cd_logits = (1 + 1) * pos_logits - 1 * neg_logits``, softmax
  over the vocabulary, gathered at the next token. Softmax is invariant to
  per-position shifts, so logits or log-probs give the same score. Both models
  are frozen: no gradient flows out.

  Args:
    positive_logits: ``[B, T, V]`` logits of the model tuned on correct
      trajectories, aligned so ``logits[:, t]`` scores ``labels[:, t]``
      (see :func:`alignjax.losses.shift_for_next_token`).
    negative_logits: ``[B, T, V]`` the same for the model tuned on incorrect ones.
    labels: ``[B, T]`` token ids (negative ids are scored as id 0; mask them).

  Returns:
    ``[B, T]`` float32 probabilities in [0, 1]. The authors weight rejected
    tokens by ``1 - p_cd`` (pass that as ``rejected_weights`` to :func:`cdpo_loss`).
  """
  fn = "critical_token_scores"
  _checks.check_logits_labels(fn, "positive_logits", positive_logits, "labels", labels)
  _checks.check_same_shape(fn, ("positive_logits", "negative_logits"), positive_logits, negative_logits)
  pos = jax.lax.stop_gradient(_f32(positive_logits))
  neg = jax.lax.stop_gradient(_f32(negative_logits))
  return jnp.exp(token_logprobs(2.0 * pos - neg, labels))


class CriticalTokenOutput(NamedTuple):
  """Per-example diagnostics of :func:`cdpo_loss`, each ``[B]``.

  Attributes:
    chosen_rewards: ``beta * sum_t c[b, t]`` (unweighted, as the authors log it).
    rejected_rewards: ``beta * sum_t r[b, t]``.
    margins: ``chosen_rewards - rejected_rewards``.
    accuracies: 1.0 where ``chosen_rewards > rejected_rewards``.
    weighted_margin: ``sum_t w^c c - sum_t w^r r`` before ``beta`` (the logit of
      ``pairing="sequence"``; the sum over positions of ``z`` for ``"position"``).
  """

  chosen_rewards: Array
  rejected_rewards: Array
  margins: Array
  accuracies: Array
  weighted_margin: Array


def _smoothed(z, beta, label_smoothing):
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z)
          - label_smoothing * jax.nn.log_sigmoid(-beta * z))


def cdpo_loss(
    policy_chosen_token_logps,
    policy_rejected_token_logps,
    reference_chosen_token_logps,
    reference_rejected_token_logps,
    chosen_mask,
    rejected_mask,
    *,
    rejected_weights,
    chosen_weights=None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    pairing: str = "position",
) -> tuple[Array, CriticalTokenOutput]:
  """Token-weighted DPO with critical-token weights (Lin et al.'s cDPO).

  Lin et al., 2024, arXiv:2411.19943, Sec. 3 (cDPO). With the masked per-token
  log-ratios ``c[b, t] = m^c (log pi - log pi_ref)(y^c_t)`` and
  ``r[b, t] = m^r (log pi - log pi_ref)(y^r_t)``, weights ``w^c`` (1 when
  ``chosen_weights`` is None) and ``w^r``, and
  ``l(z) = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)``:

  * ``pairing="position"`` (default: the authors' code, ``CDPOTrainer.dpo_loss``):
    ``z[b, t] = w^c c[b, t] - w^r r[b, t]``, one sigmoid loss per position and
    the per-example loss ``mean_t l(z[b, t])`` over *all* ``T`` positions. The
    authors feed per-token (not summed) log-probs into TRL's loss and take one
    mean over batch and positions, so chosen token ``t`` is paired with rejected
    token ``t``, ``beta`` and label smoothing act per position, and each
    position where both masks are 0 adds the constant ``log 2`` (no gradient):
    the value depends on the padded length ``T``, as theirs does, and a row
    with no response tokens gets exactly ``log 2``.
  * ``pairing="sequence"`` (the paper's token-weighted sequence margin):
    ``l(sum_t w^c c - sum_t w^r r)``; a row with no response tokens gets ``log 2``.

  The authors' default ``only_neg=True`` leaves chosen tokens unweighted
  (``chosen_weights=None``) and weights rejected tokens by
  ``1 - critical_token_scores(...)``. Weights are data: no gradient flows into
  them, nor into the reference log-probs.

  Args:
    policy_chosen_token_logps: ``[B, T]`` per-token policy log-probs of the
      chosen labels (e.g. :func:`alignjax.losses.token_logprobs`).
    policy_rejected_token_logps: ``[B, T']`` the same for the rejected labels
      (``T' == T`` for ``pairing="position"``).
    reference_chosen_token_logps: ``[B, T]`` reference log-probs (no gradient).
    reference_rejected_token_logps: ``[B, T']`` reference log-probs (no gradient).
    chosen_mask: ``[B, T]`` response positions of the chosen sequence.
    rejected_mask: ``[B, T']`` response positions of the rejected sequence.
    rejected_weights: ``[B, T']`` weights ``w^r`` of the rejected tokens.
    chosen_weights: optional ``[B, T]`` weights ``w^c``; None means 1.
    beta: inverse temperature, > 0.
    label_smoothing: ``eps`` in [0, 0.5].
    pairing: ``"position"`` or ``"sequence"``.

  Returns:
    ``(losses [B], CriticalTokenOutput)``.
  """
  fn = "cdpo_loss"
  _checks.check_choice(fn, "pairing", pairing, PAIRINGS)
  _checks.check_positive(fn, "beta", beta)
  _checks.check_in_range(fn, "label_smoothing", label_smoothing, 0.0, 0.5)
  chosen = (policy_chosen_token_logps, reference_chosen_token_logps, chosen_mask)
  chosen_names = ("policy_chosen_token_logps", "reference_chosen_token_logps", "chosen_mask")
  rejected = (policy_rejected_token_logps, reference_rejected_token_logps, rejected_mask,
              rejected_weights)
  rejected_names = ("policy_rejected_token_logps", "reference_rejected_token_logps",
                    "rejected_mask", "rejected_weights")
  if chosen_weights is not None:
    chosen = chosen + (chosen_weights,)
    chosen_names = chosen_names + ("chosen_weights",)
  for name, x in zip(chosen_names + rejected_names, chosen + rejected):
    _checks.check_rank(fn, name, x, 2, "[B, T]")
  _checks.check_same_shape(fn, chosen_names, *chosen)
  _checks.check_same_shape(fn, rejected_names, *rejected)
  b_c, t_c = _checks.shape_of(chosen_mask)
  b_r, t_r = _checks.shape_of(rejected_mask)
  if b_c != b_r:
    raise ValueError(f"cdpo_loss: chosen and rejected batch sizes differ ({b_c} vs {b_r}).")
  if pairing == "position" and t_c != t_r:
    raise ValueError(
        f"cdpo_loss: pairing='position' pairs chosen and rejected tokens by position and needs "
        f"one length T, got chosen T={t_c} and rejected T'={t_r}; pad both to one length."
    )
  m_c = _f32(chosen_mask).astype(jnp.float32)
  m_r = _f32(rejected_mask).astype(jnp.float32)
  c = m_c * (_f32(policy_chosen_token_logps)
             - jax.lax.stop_gradient(_f32(reference_chosen_token_logps)))
  r = m_r * (_f32(policy_rejected_token_logps)
             - jax.lax.stop_gradient(_f32(reference_rejected_token_logps)))
  w_r = jax.lax.stop_gradient(_f32(rejected_weights))
  w_c = 1.0 if chosen_weights is None else jax.lax.stop_gradient(_f32(chosen_weights))
  weighted_c, weighted_r = w_c * c, w_r * r
  if pairing == "position":
    losses = jnp.mean(_smoothed(weighted_c - weighted_r, beta, label_smoothing), axis=-1)
  weighted_margin = jnp.sum(weighted_c, axis=-1) - jnp.sum(weighted_r, axis=-1)
  if pairing == "sequence":
    losses = _smoothed(weighted_margin, beta, label_smoothing)
  chosen_rewards = jax.lax.stop_gradient(beta * jnp.sum(c, axis=-1))
  rejected_rewards = jax.lax.stop_gradient(beta * jnp.sum(r, axis=-1))
  return losses, CriticalTokenOutput(
      chosen_rewards=chosen_rewards,
      rejected_rewards=rejected_rewards,
      margins=chosen_rewards - rejected_rewards,
      accuracies=(chosen_rewards > rejected_rewards).astype(jnp.float32),
      weighted_margin=jax.lax.stop_gradient(weighted_margin),
  )
