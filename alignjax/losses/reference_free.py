"""Reference-free pairwise losses: SimPO, ORPO and GenARM's autoregressive reward model.

None of these needs a reference model: the implicit reward is a scaled policy
log-probability. Inputs are per-example ``[B]`` log-probabilities of the chosen
(``y_w``) and rejected (``y_l``) responses, token-averaged where the argument
name says ``avg`` (``sequence_logprobs(..., average=True)``) and summed
otherwise. Every function returns ``(losses [B], diagnostics)``; arithmetic is
float32 or wider.

References:
  * Meng et al., 2024. SimPO: Simple Preference Optimization with a
    Reference-Free Reward. arXiv:2405.14734.
  * Hong et al., 2024. ORPO: Monolithic Preference Optimization without
    Reference Model. arXiv:2403.07691.
  * Xu et al., 2025. GenARM: Reward Guided Generation with Autoregressive
    Reward Model for Test-time Alignment. arXiv:2410.08193.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from alignjax.losses import _checks
from alignjax.losses.preference import PreferenceOutput

Array = jax.Array

_LOG_HALF = -0.6931471805599453  # log(1/2): where log1mexp switches formulas


def _f32(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _pair(fn: str, names: tuple[str, ...], *arrays) -> list[Array]:
  for name, x in zip(names, arrays):
    _checks.check_rank(fn, name, x, 1, "[B]")
  _checks.check_same_shape(fn, names, *arrays)
  return [_f32(x) for x in arrays]


def _reward_diagnostics(beta, chosen, rejected) -> PreferenceOutput:
  chosen_rewards = jax.lax.stop_gradient(beta * chosen)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected)
  return PreferenceOutput(
      chosen_rewards=chosen_rewards,
      rejected_rewards=rejected_rewards,
      margins=chosen_rewards - rejected_rewards,
      accuracies=(chosen_rewards > rejected_rewards).astype(jnp.float32),
      logits=jax.lax.stop_gradient(chosen - rejected),
  )


def simpo_loss(
    chosen_avg_logps,
    rejected_avg_logps,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[Array, PreferenceOutput]:
  """SimPO: a margin-shifted Bradley-Terry loss on length-normalised log-probs.

  Meng et al., 2024. SimPO. arXiv:2405.14734, Eq. (6). With
  ``delta = chosen_avg - rejected_avg`` and ``z = beta * delta - gamma``:
  ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (``eps`` = label
  smoothing, as in TRL and the authors' trainer).

  Margin conventions: ``gamma`` here is the absolute target reward margin of the
  paper's Eq. (6). TRL's ``CPOConfig(loss_type="simpo", simpo_gamma=g)`` computes
  ``beta * (delta - g / beta)``, so its ``simpo_gamma`` *is* this ``gamma``; the
  SimPO authors' trainer takes ``gamma_beta_ratio = gamma / beta`` and computes
  ``beta * (delta - gamma_beta_ratio)``. TRL's CPO-SimPO adds
  ``cpo_alpha * NLL(chosen)`` (the mean token NLL of the chosen prompt+response)
  to the batch mean of these losses; that term belongs to the training
  objective, not to this function (``cpo_alpha=0`` is plain SimPO).

  Args:
    chosen_avg_logps: ``[B]`` token-averaged policy log-probs of ``y_w``.
    rejected_avg_logps: ``[B]`` the same for ``y_l``.
    beta: reward scale, > 0 (the paper uses 2.0-10.0).
    gamma: target reward margin (the paper uses about 0.5-1.6).
    label_smoothing: ``eps`` in [0, 0.5].

  Returns:
    ``(losses [B], PreferenceOutput)`` with rewards ``beta * avg_logps`` and
    ``logits = delta``.
  """
  fn = "simpo_loss"
  _checks.check_positive(fn, "beta", beta)
  _checks.check_in_range(fn, "label_smoothing", label_smoothing, 0.0, 0.5)
  c, r = _pair(fn, ("chosen_avg_logps", "rejected_avg_logps"), chosen_avg_logps, rejected_avg_logps)
  z = beta * (c - r) - gamma
  losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return losses, _reward_diagnostics(beta, c, r)


class ORPOOutput(NamedTuple):
  """Per-example ORPO diagnostics, each ``[B]`` (names as TRL's ORPO metrics).

  Attributes:
    chosen_rewards: ``beta * chosen_avg_logps``.
    rejected_rewards: ``beta * rejected_avg_logps``.
    margins: ``chosen_rewards - rejected_rewards``.
    accuracies: 1.0 where ``chosen_rewards > rejected_rewards``.
    log_odds_ratio: ``log sigmoid(log_odds)`` (TRL logs its batch mean as
      ``log_odds_ratio``).
    log_odds_chosen: ``log_odds = log odds(y_w) - log odds(y_l)`` (TRL logs its
      batch mean as ``log_odds_chosen``).
    nll_loss: the ``chosen_nll`` passed in.
  """

  chosen_rewards: Array
  rejected_rewards: Array
  margins: Array
  accuracies: Array
  log_odds_ratio: Array
  log_odds_chosen: Array
  nll_loss: Array


def log1mexp(x) -> Array:
  """``log(1 - exp(x))`` for ``x < 0``, accurate everywhere (Maechler, 2012).

  Uses ``log1p(-exp(x))`` below ``-log 2`` and ``log(-expm1(x))`` above, as TRL's
  ORPO does, with both branches fed safe inputs so gradients stay finite.
  """
  x = _f32(x)
  below = x < _LOG_HALF
  x_lo = jnp.where(below, x, _LOG_HALF)
  x_hi = jnp.where(below, _LOG_HALF, x)
  return jnp.where(below, jnp.log1p(-jnp.exp(x_lo)), jnp.log(-jnp.expm1(x_hi)))


def orpo_loss(
    chosen_avg_logps,
    rejected_avg_logps,
    chosen_nll,
    *,
    beta: float,
) -> tuple[Array, ORPOOutput]:
  """ORPO: SFT loss plus a log-odds-ratio preference term.

  Hong et al., 2024. ORPO. arXiv:2403.07691, Eqs. (4), (6)-(7), as TRL's
  ``ORPOTrainer.odds_ratio_loss`` computes them. With ``a_w``, ``a_l`` the
  token-averaged log-probs and ``log odds(y) = a - log(1 - exp(a))``:

  ``log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))`` and
  ``loss = chosen_nll - beta * log sigmoid(log_odds)``.

  TRL's batch loss is ``nll - mean(beta * log sigmoid(log_odds))`` where ``nll``
  is one token-mean cross-entropy over the batch's chosen prompt+response
  tokens; here ``chosen_nll`` is per example (e.g. ``-chosen_avg_logps`` for the
  response-only NLL, or the per-row prompt+response token mean), and
  ``losses.mean()`` equals TRL's loss when every entry of ``chosen_nll`` is TRL's
  batch ``nll``. Requires ``avg_logps < 0`` (a response of probability 1 has
  infinite odds).

  Args:
    chosen_avg_logps: ``[B]`` token-averaged policy log-probs of ``y_w`` (< 0).
    rejected_avg_logps: ``[B]`` the same for ``y_l``.
    chosen_nll: ``[B]`` supervised NLL of the chosen response (gradient flows).
    beta: weight ``lambda`` of the odds-ratio term, > 0 (TRL default 0.1).

  Returns:
    ``(losses [B], ORPOOutput)``.
  """
  fn = "orpo_loss"
  _checks.check_positive(fn, "beta", beta)
  c, r, nll = _pair(
      fn, ("chosen_avg_logps", "rejected_avg_logps", "chosen_nll"),
      chosen_avg_logps, rejected_avg_logps, chosen_nll,
  )
  log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
  ratio = jax.nn.log_sigmoid(log_odds)
  losses = nll - beta * ratio
  diag = _reward_diagnostics(beta, c, r)
  return losses, ORPOOutput(
      chosen_rewards=diag.chosen_rewards,
      rejected_rewards=diag.rejected_rewards,
      margins=diag.margins,
      accuracies=diag.accuracies,
      log_odds_ratio=jax.lax.stop_gradient(ratio),
      log_odds_chosen=jax.lax.stop_gradient(log_odds),
      nll_loss=jax.lax.stop_gradient(nll),
  )


def genarm_loss(
    chosen_logps,
    rejected_logps,
    *,
    beta: float,
) -> tuple[Array, PreferenceOutput]:
  """GenARM: train an autoregressive reward model ``r(x, y) = beta * log pi_r(y|x)``.

  Xu et al., 2025. GenARM. arXiv:2410.08193, Sec. 4 (the ARM training loss):
  ``-log sigmoid(beta * (log pi_r(y_w|x) - log pi_r(y_l|x)))`` with *summed*
  log-probs and no reference model, as the authors' ``arm_loss``
  (``training_openInstruct/open_instruct/arm_utils.py``) computes it. Their TRL
  ``ARMTrainer`` adds a target margin ``gamma`` (default 0) and label smoothing
  (default 0); with those, use :func:`simpo_loss` on the summed log-probs
  (``simpo_loss(chosen_logps, rejected_logps, beta=beta, gamma=gamma,
  label_smoothing=eps)`` is exactly that trainer's loss). Their length
  normalisation is off by default ("only for testing").

  Args:
    chosen_logps: ``[B]`` summed log-probs of ``y_w`` under the reward LM.
    rejected_logps: ``[B]`` the same for ``y_l``.
    beta: reward scale, > 0 (the authors use 0.05-0.5).

  Returns:
    ``(losses [B], PreferenceOutput)`` with rewards ``beta * logps``.
  """
  fn = "genarm_loss"
  _checks.check_positive(fn, "beta", beta)
  c, r = _pair(fn, ("chosen_logps", "rejected_logps"), chosen_logps, rejected_logps)
  losses = -jax.nn.log_sigmoid(beta * (c - r))
  return losses, _reward_diagnostics(beta, c, r)
