"""AlignDistil: token-level alignment as adaptive policy distillation.

Zhang et al., 2025. AlignDistil: Token-Level Language Model Alignment as
Adaptive Policy Distillation. ACL 2025.

With the token-level DPO reward ``r_t = beta_dpo * log(pi_dpo / pi_ref)`` the
KL-regularised RLHF objective is maximised by distilling, at every position,
the teacher

    pi*(.|x, y_<t) ∝ pi_ref * (pi_dpo / pi_ref) ** w,

i.e. the teacher *logits* linearly combine the reference and DPO logits. The
contrastive reward replaces ``pi_ref`` in the ratio by a reverse DPO model
``pi_rdpo`` (DPO trained with chosen/rejected swapped):

    z*_t = z_ref + w_t * (z_dpo - z_rdpo)            (log-softmax logits)

Token-adaptive logit extrapolation picks ``w_t`` per token from the total
variation distance ``d_t = TV(pi_dpo, pi_rdpo)`` at that position: where the
two models already disagree strongly the reward signal is large and ``w_t`` is
small (no over-optimisation); where they barely differ ``w_t`` grows, up to a
cap, so the token still moves (no under-optimisation):

    w_t = min(beta / d_t, beta_max)                  (adaptive)
    w_t = beta                                        (fixed)

The student is trained with a per-token divergence to the (frozen) teacher,
reverse KL ``KL(pi_theta || pi*)`` by default, which is exactly the per-token
form of the RLHF objective; forward KL ``KL(pi* || pi_theta)`` is available for
off-policy distillation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from alignjax.losses import _checks
from alignjax.losses.logprobs import masked_mean, masked_sum

Array = jax.Array

DIVERGENCES = ("reverse_kl", "forward_kl")


class AlignDistilTeacher(NamedTuple):
  """Teacher built from frozen models.

  Attributes:
    logits: ``[B, T, V]`` teacher log-probabilities (normalised logits).
    coefficients: ``[B, T]`` extrapolation weight ``w_t`` per position.
    tv_distance: ``[B, T]`` total variation between the DPO model and the
      contrast model (reverse DPO, or the reference when none is given).
  """

  logits: Array
  coefficients: Array
  tv_distance: Array


class AlignDistilOutput(NamedTuple):
  """Diagnostics of :func:`aligndistil_loss`.

  Attributes:
    token_losses: ``[B, T]`` per-token divergence, 0 at masked-out positions.
    coefficients: ``[B, T]`` extrapolation weights ``w_t``.
    tv_distance: ``[B, T]`` TV distance driving the adaptive weights.
    mean_coefficient: ``[B]`` masked mean of ``w_t``.
    num_tokens: ``[B]`` number of counted positions.
  """

  token_losses: Array
  coefficients: Array
  tv_distance: Array
  mean_coefficient: Array
  num_tokens: Array


def _log_softmax(x) -> Array:
  x = jnp.asarray(x)
  return jax.nn.log_softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=-1)


def aligndistil_teacher(
    reference_logits,
    dpo_logits,
    reverse_dpo_logits=None,
    *,
    beta: float,
    beta_max: Optional[float] = None,
    adaptive: bool = True,
    eps: float = 1e-8,
) -> AlignDistilTeacher:
  """Builds the AlignDistil teacher distribution; no gradient flows into it.

  Args:
    reference_logits: ``[..., V]`` logits of the reference (SFT) model.
    dpo_logits: ``[..., V]`` logits of the DPO model.
    reverse_dpo_logits: ``[..., V]`` logits of the reverse DPO model. If None,
      the plain DPO reward is used: the contrast model is the reference.
    beta: base extrapolation weight, > 0.
    beta_max: upper bound on the adaptive weight; required when ``adaptive``.
    adaptive: token-adaptive extrapolation (``w_t = min(beta/d_t, beta_max)``)
      instead of a constant ``w_t = beta``.
    eps: floor on ``d_t`` before dividing.

  Returns:
    :class:`AlignDistilTeacher`.
  """
  fn = "aligndistil_teacher"
  _checks.check_positive(fn, "beta", beta)
  if adaptive:
    if beta_max is None:
      raise ValueError(f"{fn}: `beta_max` is required when `adaptive=True`.")
    _checks.check_positive(fn, "beta_max", beta_max)
  names, arrays = ["reference_logits", "dpo_logits"], [reference_logits, dpo_logits]
  if reverse_dpo_logits is not None:
    names.append("reverse_dpo_logits")
    arrays.append(reverse_dpo_logits)
  if len(_checks.shape_of(reference_logits)) < 1:
    raise ValueError(f"{fn}: logits need a trailing vocabulary axis [..., V].")
  _checks.check_same_shape(fn, tuple(names), *arrays)

  ref = jax.lax.stop_gradient(_log_softmax(reference_logits))
  dpo = jax.lax.stop_gradient(_log_softmax(dpo_logits))
  contrast = (
      ref if reverse_dpo_logits is None
      else jax.lax.stop_gradient(_log_softmax(reverse_dpo_logits))
  )
  tv = 0.5 * jnp.sum(jnp.abs(jnp.exp(dpo) - jnp.exp(contrast)), axis=-1)
  if adaptive:
    coef = jnp.minimum(beta / jnp.maximum(tv, eps), beta_max)
  else:
    coef = jnp.full(tv.shape, beta, dtype=tv.dtype)
  teacher = jax.nn.log_softmax(ref + coef[..., None] * (dpo - contrast), axis=-1)
  return AlignDistilTeacher(
      logits=jax.lax.stop_gradient(teacher),
      coefficients=jax.lax.stop_gradient(coef),
      tv_distance=jax.lax.stop_gradient(tv),
  )


def aligndistil_loss(
    policy_logits,
    reference_logits,
    dpo_logits,
    reverse_dpo_logits,
    mask,
    *,
    beta: float,
    beta_max: Optional[float] = None,
    adaptive: bool = True,
    divergence: str = "reverse_kl",
    average: bool = True,
) -> tuple[Array, AlignDistilOutput]:
  """Token-level AlignDistil distillation loss.

  Args:
    policy_logits: ``[B, T, V]`` logits of the policy being trained.
    reference_logits: ``[B, T, V]`` reference logits (frozen).
    dpo_logits: ``[B, T, V]`` DPO-model logits (frozen).
    reverse_dpo_logits: ``[B, T, V]`` reverse-DPO logits (frozen), or None for
      the non-contrastive DPO reward.
    mask: ``[B, T]`` response positions to distil on.
    beta, beta_max, adaptive: teacher construction, see
      :func:`aligndistil_teacher`.
    divergence: ``"reverse_kl"`` (``KL(pi_theta || pi*)``) or ``"forward_kl"``
      (``KL(pi* || pi_theta)``).
    average: per-example mean over masked tokens (True) or sum (False).

  Returns:
    ``(losses [B], AlignDistilOutput)``.
  """
  fn = "aligndistil_loss"
  _checks.check_choice(fn, "divergence", divergence, DIVERGENCES)
  _checks.check_rank(fn, "policy_logits", policy_logits, 3, "[B, T, V]")
  _checks.check_same_shape(
      fn, ("policy_logits", "reference_logits"), policy_logits, reference_logits
  )
  _checks.check_mask(fn, "mask", mask, "policy_logits[..., 0]", _checks.shape_of(policy_logits)[:2])
  teacher = aligndistil_teacher(
      reference_logits, dpo_logits, reverse_dpo_logits,
      beta=beta, beta_max=beta_max, adaptive=adaptive,
  )
  student = _log_softmax(policy_logits)
  if divergence == "reverse_kl":
    per_token = jnp.sum(jnp.exp(student) * (student - teacher.logits), axis=-1)
  else:
    per_token = jnp.sum(jnp.exp(teacher.logits) * (teacher.logits - student), axis=-1)
  m = jnp.asarray(mask).astype(jnp.float32)
  losses = masked_mean(per_token, m) if average else masked_sum(per_token, m)
  return losses, AlignDistilOutput(
      token_losses=jax.lax.stop_gradient(per_token * m),
      coefficients=teacher.coefficients,
      tv_distance=teacher.tv_distance,
      mean_coefficient=masked_mean(teacher.coefficients, m),
      num_tokens=jnp.sum(m, axis=-1),
  )
