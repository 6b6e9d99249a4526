"""AlignDistil: token-level alignment as adaptive policy distillation.

Zhang et al., 2025. "AlignDistil: Token-Level Language Model Alignment as
Adaptive Policy Distillation", ACL 2025, arXiv:2503.02832.

Implemented as the authors' trainers compute it (repository
``songmzhang/AlignDistil``, ``OpenRLHF/openrlhf/trainer/
aligndistil_offpolicy_trainer.py`` and ``aligndistil_trainer.py``, the
``reward_boost_type`` branches). With the DPO model's logits ``z_d``, the
contrast model's logits ``z_c`` (a reverse DPO model, i.e. DPO trained with
chosen/rejected swapped; or the SFT reference for the paper's Theorem 1),
``p_d = softmax(z_d)`` and ``p_c = softmax(z_c)``, at every distilled position t:

  ``aligndistil``        w_t = beta2 * sum_v |p_d - p_c| + 1e-3   (no cap)
                         z*_t = z_d + w_t (z_d - z_c),  scale_t = beta / w_t
  ``theorem1``           w = beta / beta2
                         z* = w z_d + (1 - w) z_c,      scale = beta2
  ``theorem1_contrast``  w = beta / beta2
                         z* = z_d + w (z_d - z_c),      scale = beta2
  ``theorem1_adaptive``  w_t as in ``aligndistil``
                         z*_t = w_t z_d + (1 - w_t) z_c, scale_t = beta / w_t

and the loss is ``l_t = scale_t * KL(pi_theta,t || softmax(z*_t / temperature))``
(reverse KL; the gradient reaches the student through both the probabilities
and the log-probabilities). ``theorem1`` with ``z_c`` the SFT reference is the
paper's Theorem 1 teacher ``pi_ref^(1 - beta/beta2) pi_dpo^(beta/beta2)``
distilled with weight ``beta2`` (the RLHF objective with the DPO reward
``beta * log(pi_dpo / pi_ref)`` and KL coefficient ``beta2``); the contrastive
DPO reward swaps ``pi_ref`` for the reverse DPO model; the token-adaptive logit
extrapolation replaces the constant ``beta/beta2`` by ``w_t``.

The authors combine the raw logits; every mode's coefficients sum to one
(``1 + w - w`` or ``w + 1 - w``), so raw logits and log-probabilities give the
same teacher and the frozen models may be replaced by precomputed log-probs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from alignjax.losses import _checks

Array = jax.Array

MODES = ("aligndistil", "theorem1", "theorem1_contrast", "theorem1_adaptive")
ADAPTIVE_MODES = ("aligndistil", "theorem1_adaptive")
DIVERGENCES = ("reverse_kl", "forward_kl")
WEIGHT_FLOOR = 1e-3  # the authors' ``tvd * beta2 + 1e-3``


class AlignDistilTeacher(NamedTuple):
  """The frozen AlignDistil teacher at every position (no gradient).

  Attributes:
    log_probs: ``[..., V]`` ``log_softmax(z* / temperature)``.
    weights: ``[...]`` the weight ``w_t`` (the constant ``beta / beta2`` in the
      ``theorem1`` and ``theorem1_contrast`` modes).
    scale: ``[...]`` the per-token factor in front of the KL (``beta / w_t``
      in the adaptive modes, ``beta2`` otherwise).
    l1_distance: ``[...]`` ``sum_v |p_d - p_c|`` (computed in every mode).
  """

  log_probs: Array
  weights: Array
  scale: Array
  l1_distance: Array


class AlignDistilOutput(NamedTuple):
  """Diagnostics of :func:`aligndistil_loss`, as the authors log them.

  Per example ``[B]`` unless noted; sums and means run over the masked
  positions; rows with no masked position give 0. The student's
  distribution is ``softmax(student_logits)`` as passed; the DPO and contrast
  models' are ``softmax`` of their logits at temperature 1 (as in the
  authors' trainers).

  Attributes:
    token_losses: ``[B, T]`` ``scale_t * divergence_t``, 0 where masked out.
    weights: ``[B, T]`` per-token weights ``w_t`` (at every position, masked
      or not).
    mean_weight: masked mean of ``w_t`` (authors: ``mean_weight``).
    expected_reward: ``sum_t sum_v p_s * beta (log p_d - log p_c)``, the
      student's expected token reward summed over the sequence (authors:
      ``expected_reward``; they log its batch mean).
    dpo_expected_reward: the same with ``p_d`` in place of ``p_s`` (authors:
      ``dpo_model_expected_reward``).
    seq_kl_dpo: ``sum_t KL(p_s || p_d)`` (authors: ``seq_tea_kl``).
    token_kl_dpo: masked mean of ``KL(p_s || p_d)`` (``token_tea_kl``).
    seq_kl_contrast: ``sum_t KL(p_s || p_c)`` (``seq_init_kl``).
    token_kl_contrast: masked mean of ``KL(p_s || p_c)`` (``token_init_kl``).
    num_tokens: number of masked positions.
  """

  token_losses: Array
  weights: Array
  mean_weight: Array
  expected_reward: Array
  dpo_expected_reward: Array
  seq_kl_dpo: Array
  token_kl_dpo: Array
  seq_kl_contrast: Array
  token_kl_contrast: Array
  num_tokens: Array


def _float(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_hparams(fn: str, beta, beta2, mode: str, temperature) -> None:
  _checks.check_choice(fn, "mode", mode, MODES)
  _checks.check_positive(fn, "beta", beta)
  _checks.check_positive(fn, "beta2", beta2)
  _checks.check_positive(fn, "temperature", temperature)


def _check_frozen(fn: str, dpo_logits, contrast_logits) -> None:
  if dpo_logits is None:
    raise ValueError(f"{fn}: `dpo_logits` is None; the DPO (teacher) model's logits are required.")
  if contrast_logits is None:
    raise ValueError(
        f"{fn}: `contrast_logits` is None (missing contrast model); pass the reverse-DPO "
        "model's logits (or the SFT reference's for mode='theorem1')."
    )
  sd, sc = _checks.shape_of(dpo_logits), _checks.shape_of(contrast_logits)
  if len(sd) < 1:
    raise ValueError(f"{fn}: `dpo_logits` needs a trailing vocabulary axis [..., V], got shape {sd}.")
  if sd[-1:] != sc[-1:]:
    raise ValueError(
        f"{fn}: vocabulary mismatch, `dpo_logits` has V={sd[-1]} and `contrast_logits` "
        f"has V={sc[-1] if sc else None}."
    )
  if sd != sc:
    raise ValueError(f"{fn}: `dpo_logits` {sd} and `contrast_logits` {sc} must have the same shape.")


def _teacher(dpo_logits, contrast_logits, beta, beta2, mode, temperature) -> AlignDistilTeacher:
  z_d = jax.lax.stop_gradient(_float(dpo_logits))
  z_c = jax.lax.stop_gradient(_float(contrast_logits))
  p_d = jax.nn.softmax(z_d, axis=-1)
  p_c = jax.nn.softmax(z_c, axis=-1)
  l1 = jnp.sum(jnp.abs(p_d - p_c), axis=-1)
  if mode in ADAPTIVE_MODES:
    w = beta2 * l1 + WEIGHT_FLOOR
    scale = beta / w
  else:
    w = jnp.broadcast_to(jnp.asarray(beta / beta2, l1.dtype), l1.shape)
    scale = jnp.broadcast_to(jnp.asarray(beta2, l1.dtype), l1.shape)
  wv = w[..., None]
  if mode in ("aligndistil", "theorem1_contrast"):
    z_star = z_d + wv * (z_d - z_c)
  else:  # theorem1, theorem1_adaptive
    z_star = wv * z_d + (1.0 - wv) * z_c
  log_q = jax.nn.log_softmax(z_star / temperature, axis=-1)
  sg = jax.lax.stop_gradient
  return AlignDistilTeacher(log_probs=sg(log_q), weights=sg(w), scale=sg(scale), l1_distance=sg(l1))


def aligndistil_teacher(
    dpo_logits,
    contrast_logits,
    *,
    beta: float,
    beta2: float,
    mode: str = "aligndistil",
    temperature: float = 1.0,
) -> AlignDistilTeacher:
  """Builds the AlignDistil teacher from two frozen models; no gradient flows into it.

  Zhang et al. 2025, arXiv:2503.02832: Theorem 1 (teacher
  ``pi_ref^(1-beta/beta2) pi_dpo^(beta/beta2)``), the contrastive DPO reward
  (reverse DPO model as contrast) and the token-adaptive logit extrapolation
  (``w_t = beta2 * ||p_d - p_c||_1 + 1e-3``), as in the authors' trainers. See
  the module docstring for the four modes.

  Args:
    dpo_logits: ``[..., V]`` logits (or log-probs) of the DPO model.
    contrast_logits: ``[..., V]`` logits (or log-probs) of the reverse DPO model
      (or the SFT reference for ``theorem1``).
    beta: the DPO models' beta, > 0.
    beta2: the distillation KL coefficient (authors: 10 off-policy, 15 on-policy), > 0.
    mode: one of ``MODES``.
    temperature: the teacher is ``softmax(z* / temperature)``, > 0.

  Returns:
    :class:`AlignDistilTeacher`.
  """
  fn = "aligndistil_teacher"
  _check_hparams(fn, beta, beta2, mode, temperature)
  _check_frozen(fn, dpo_logits, contrast_logits)
  return _teacher(dpo_logits, contrast_logits, beta, beta2, mode, temperature)


def aligndistil_loss(
    student_logits,
    dpo_logits,
    contrast_logits: Optional[Array],
    mask,
    *,
    beta: float,
    beta2: float,
    mode: str = "aligndistil",
    temperature: float = 1.0,
    length_normalize: bool = True,
    divergence: str = "reverse_kl",
) -> tuple[Array, AlignDistilOutput]:
  """Token-level AlignDistil distillation loss, per example.

  Zhang et al. 2025, "AlignDistil", arXiv:2503.02832, as the authors' trainers
  compute it: ``l_t = scale_t * KL(pi_theta,t || softmax(z*_t / temperature))``
  (see :func:`aligndistil_teacher` for ``z*`` and ``scale``), per example
  ``sum_t m_t l_t``, divided by ``sum_t m_t`` when ``length_normalize`` (0 for
  rows without masked positions). Reduce over the batch with a mean.

  The student's logits are used as given: the authors' on-policy trainer
  divides them by the temperature first (their off-policy trainer does not);
  that is the caller's choice.

  Args:
    student_logits: ``[B, T, V]`` logits of the model being trained.
    dpo_logits: ``[B, T, V]`` DPO-model logits (frozen).
    contrast_logits: ``[B, T, V]`` reverse-DPO (or reference) logits (frozen).
    mask: ``[B, T]`` bool or 0/1, the positions whose distributions are distilled.
    beta, beta2, mode, temperature: see :func:`aligndistil_teacher`.
    length_normalize: divide each example's sum by its number of masked
      positions (the authors' ``--reward_len_norm``, used in all their scripts).
    divergence: ``"reverse_kl"`` (the method). ``"forward_kl"``
      (``scale_t * KL(pi* || pi_theta)``) is an extra, not in the paper.

  Returns:
    ``(losses [B] float32, AlignDistilOutput)``.
  """
  fn = "aligndistil_loss"
  _check_hparams(fn, beta, beta2, mode, temperature)
  _checks.check_choice(fn, "divergence", divergence, DIVERGENCES)
  _checks.check_rank(fn, "student_logits", student_logits, 3, "[B, T, V]")
  _check_frozen(fn, dpo_logits, contrast_logits)
  s_shape = _checks.shape_of(student_logits)
  for name, x in (("dpo_logits", dpo_logits), ("contrast_logits", contrast_logits)):
    shape = _checks.shape_of(x)
    if shape[-1:] != s_shape[-1:]:
      raise ValueError(
          f"{fn}: vocabulary mismatch, `student_logits` has V={s_shape[-1]} and `{name}` "
          f"has V={shape[-1] if shape else None}; slice the logits to a common vocabulary first."
      )
    if shape != s_shape:
      raise ValueError(f"{fn}: `{name}` has shape {shape}, expected {s_shape} like `student_logits`.")
  _checks.check_mask(fn, "mask", mask, "student_logits[..., 0]", s_shape[:2])

  teacher = _teacher(dpo_logits, contrast_logits, beta, beta2, mode, temperature)
  log_p = jax.nn.log_softmax(_float(student_logits), axis=-1)
  p = jnp.exp(log_p)
  if divergence == "reverse_kl":
    div = jnp.sum(p * (log_p - teacher.log_probs), axis=-1)
  else:
    div = jnp.sum(jnp.exp(teacher.log_probs) * (teacher.log_probs - log_p), axis=-1)
  m = jnp.asarray(mask).astype(div.dtype)
  count = jnp.sum(m, axis=-1)
  denom = jnp.maximum(count, 1.0)
  token_losses = teacher.scale * div * m
  losses = jnp.sum(token_losses, axis=-1)
  if length_normalize:
    losses = losses / denom

  # Diagnostics, without gradient (the authors' logged metrics).
  sg = jax.lax.stop_gradient
  log_p_s = sg(log_p)
  log_d = jax.nn.log_softmax(sg(_float(dpo_logits)), axis=-1)
  log_c = jax.nn.log_softmax(sg(_float(contrast_logits)), axis=-1)
  p_s = jnp.exp(log_p_s)
  reward = beta * (log_d - log_c)
  kl_d = jnp.sum(p_s * (log_p_s - log_d), axis=-1)
  kl_c = jnp.sum(p_s * (log_p_s - log_c), axis=-1)
  msum = lambda x: jnp.sum(x * m, axis=-1)
  return losses, AlignDistilOutput(
      token_losses=sg(token_losses),
      weights=teacher.weights,
      mean_weight=msum(teacher.weights) / denom,
      expected_reward=msum(jnp.sum(p_s * reward, axis=-1)),
      dpo_expected_reward=msum(jnp.sum(jnp.exp(log_d) * reward, axis=-1)),
      seq_kl_dpo=msum(kl_d),
      token_kl_dpo=msum(kl_d) / denom,
      seq_kl_contrast=msum(kl_c),
      token_kl_contrast=msum(kl_c) / denom,
      num_tokens=count,
  )
