"""Token-level Direct Preference Optimization (TDPO1 / TDPO2).

Zeng et al., 2024. Token-level Direct Preference Optimization. arXiv:2404.11999.

TDPO augments the DPO log-ratio difference with the *sequential KL*
``D_SeqKL(x, y; pi_ref || pi) = sum_t KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t))``
of each response:

* TDPO1: ``u - (D_l - D_w)``
* TDPO2: ``u - alpha * (D_l - sg(D_w))``

with ``u = log-ratio(y_w) - log-ratio(y_l)`` and ``loss = -log sigmoid(beta * .)``.
As in the paper's TDPO2 objective and the authors' code, TDPO2 stops the gradient of
the preferred (chosen) response's sequential KL, so only the dispreferred
response's KL is pushed, scaled by ``alpha``. Rewards follow the official
implementation: ``beta * (log-ratio + D_SeqKL)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from alignjax.losses import _checks
from alignjax.losses.logprobs import masked_mean, masked_sum, token_kl, token_logprobs

Array = jax.Array

TDPO_VARIANTS = ("tdpo1", "tdpo2")


class TDPOStats(NamedTuple):
  """Per-sequence statistics TDPO needs, each ``[B]``.

  Attributes:
    logratio: ``sum_t [log pi(y_t) - log pi_ref(y_t)]`` over masked tokens.
    seq_kl: ``sum_t KL(pi_ref || pi)`` over masked positions.
    policy_logps: ``sum_t log pi(y_t)`` over masked tokens.
  """

  logratio: Array
  seq_kl: Array
  policy_logps: Array


class TDPOOutput(NamedTuple):
  """Per-example TDPO diagnostics, each ``[B]``."""

  chosen_rewards: Array
  rejected_rewards: Array
  margins: Array
  accuracies: Array
  chosen_seq_kl: Array
  rejected_seq_kl: Array
  logits: Array


def tdpo_sequence_stats(
    policy_logits, reference_logits, labels, mask, *, average_log_prob: bool = False
) -> TDPOStats:
  """Log-ratio and sequential ``KL(pi_ref || pi)`` of each sequence.

  Args:
    policy_logits: ``[B, T, V]`` policy logits aligned with ``labels``.
    reference_logits: ``[B, T, V]`` reference logits (no gradient flows in).
    labels: ``[B, T]`` token ids.
    mask: ``[B, T]`` response positions to count.
    average_log_prob: average over masked tokens instead of summing.

  Returns:
    :class:`TDPOStats`.
  """
  fn = "tdpo_sequence_stats"
  _checks.check_logits_labels(fn, "policy_logits", policy_logits, "labels", labels)
  _checks.check_same_shape(
      fn, ("policy_logits", "reference_logits"), policy_logits, reference_logits
  )
  _checks.check_mask(fn, "mask", mask, "labels", _checks.shape_of(labels))
  reference_logits = jax.lax.stop_gradient(reference_logits)
  policy_lp = token_logprobs(policy_logits, labels)
  reference_lp = token_logprobs(reference_logits, labels)
  kl = token_kl(reference_logits, policy_logits)
  reduce = masked_mean if average_log_prob else masked_sum
  return TDPOStats(
      logratio=reduce(policy_lp - reference_lp, mask),
      seq_kl=reduce(kl, mask),
      policy_logps=reduce(policy_lp, mask),
  )


def tdpo_loss_from_stats(
    chosen: TDPOStats,
    rejected: TDPOStats,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
) -> tuple[Array, TDPOOutput]:
  """TDPO loss from precomputed :class:`TDPOStats` of chosen and rejected responses."""
  fn = "tdpo_loss"
  _checks.check_choice(fn, "variant", variant, TDPO_VARIANTS)
  _checks.check_positive(fn, "beta", beta)
  _checks.check_in_range(fn, "alpha", alpha, 0.0, float("inf"))
  for name, stats in (("chosen", chosen), ("rejected", rejected)):
    for field in TDPOStats._fields:
      _checks.check_rank(fn, f"{name}.{field}", getattr(stats, field), 1, "[B]")
  _checks.check_same_shape(
      fn, ("chosen.logratio", "rejected.logratio"), chosen.logratio, rejected.logratio
  )
  u = chosen.logratio - rejected.logratio
  if variant == "tdpo1":
    logits = u - (rejected.seq_kl - chosen.seq_kl)
  else:
    logits = u - alpha * (rejected.seq_kl - jax.lax.stop_gradient(chosen.seq_kl))
  losses = -jax.nn.log_sigmoid(beta * logits)
  chosen_rewards = jax.lax.stop_gradient(beta * (chosen.logratio + chosen.seq_kl))
  rejected_rewards = jax.lax.stop_gradient(beta * (rejected.logratio + rejected.seq_kl))
  margins = chosen_rewards - rejected_rewards
  return losses, TDPOOutput(
      chosen_rewards=chosen_rewards,
      rejected_rewards=rejected_rewards,
      margins=margins,
      accuracies=(chosen_rewards > rejected_rewards).astype(jnp.float32),
      chosen_seq_kl=jax.lax.stop_gradient(chosen.seq_kl),
      rejected_seq_kl=jax.lax.stop_gradient(rejected.seq_kl),
      logits=jax.lax.stop_gradient(logits),
  )


def tdpo_loss(
    policy_chosen_logits,
    policy_rejected_logits,
    reference_chosen_logits,
    reference_rejected_logits,
    chosen_labels,
    rejected_labels,
    chosen_mask,
    rejected_mask,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
    average_log_prob: bool = False,
) -> tuple[Array, TDPOOutput]:
  """TDPO1/TDPO2 loss from logits.

  Args:
    policy_chosen_logits: ``[B, T, V]`` policy logits on the chosen responses,
      aligned so ``logits[:, t]`` scores ``chosen_labels[:, t]``.
    policy_rejected_logits: ``[B, T', V]`` the same for the rejected responses.
    reference_chosen_logits: ``[B, T, V]`` reference logits (no gradient).
    reference_rejected_logits: ``[B, T', V]`` reference logits (no gradient).
    chosen_labels, rejected_labels: ``[B, T]`` / ``[B, T']`` token ids.
    chosen_mask, rejected_mask: ``[B, T]`` / ``[B, T']`` response masks.
    beta: DPO inverse temperature, > 0.
    alpha: TDPO2 weight of the sequential-KL term, >= 0 (unused by TDPO1).
    variant: ``"tdpo1"`` or ``"tdpo2"``.
    average_log_prob: average, rather than sum, per-token terms.

  Returns:
    ``(losses [B], TDPOOutput)``.
  """
  _checks.check_choice("tdpo_loss", "variant", variant, TDPO_VARIANTS)
  chosen = tdpo_sequence_stats(
      policy_chosen_logits, reference_chosen_logits, chosen_labels, chosen_mask,
      average_log_prob=average_log_prob,
  )
  rejected = tdpo_sequence_stats(
      policy_rejected_logits, reference_rejected_logits, rejected_labels,
      rejected_mask, average_log_prob=average_log_prob,
  )
  return tdpo_loss_from_stats(chosen, rejected, beta=beta, alpha=alpha, variant=variant)
