"""Kahneman-Tversky Optimization (KTO), as TRL's ``KTOTrainer`` computes it.

Ethayarajh et al., 2024. KTO: Model Alignment as Prospect Theoretic
Optimization. arXiv:2402.01306, Eq. (7)-(8).

KTO learns from *unpaired* binary feedback: each row is one (prompt, completion)
labelled desirable or undesirable. With the implied reward
``r = log pi(y|x) - log pi_ref(y|x)`` (summed over the completion) and the
reference point ``z0 = KL(pi || pi_ref)`` estimated on the batch,

* desirable rows:   ``w_d * (1 - sigmoid(beta * (r - z0)))``
* undesirable rows: ``w_u * (1 - sigmoid(beta * (z0 - r)))``

TRL (>= 1.0, ``trl/trainer/kto_trainer.py``, ``_compute_loss``) estimates ``z0``
as ``max(0, mean_i(log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)))`` over *mismatched*
pairs ``(x_i, y'_i)`` built by rotating the batch's completions by one
(:func:`kto_mismatched_pairs`), computes the policy term under ``no_grad`` and
detaches the estimate, so no gradient flows through ``z0``. The batch loss is the
mean of the per-row losses over desirable and undesirable rows together
(``losses.nanmean()``), i.e. ``losses.mean()`` of what :func:`kto_loss` returns.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses import _checks

Array = jax.Array


class KTOOutput(NamedTuple):
  """Per-example KTO diagnostics (each ``[B]`` unless noted).

  Attributes:
    rewards: implied reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` of every row.
    chosen_rewards: ``rewards`` on desirable rows, 0 elsewhere (TRL logs the mean
      over desirable rows: ``chosen_rewards.sum() / desirable.sum()``).
    rejected_rewards: ``rewards`` on undesirable rows, 0 elsewhere.
    desirable: 1.0 on desirable rows, 0.0 on undesirable ones.
    kl: scalar ``[]``, the (stop-gradient) reference point ``z0`` used.
  """

  rewards: Array
  chosen_rewards: Array
  rejected_rewards: Array
  desirable: Array
  kl: Array


def _f32(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def kto_mismatched_pairs(n: int) -> np.ndarray:
  """Completion index each prompt is paired with for KTO's KL estimate (TRL's rotation).

  TRL builds the mismatched pairs by rotating the completions by +1 within each
  batch of ``per_device_train_batch_size`` consecutive rows (``dataset.map`` with
  ``KL_completion_ids = [completions[-1]] + completions[:-1]`` and a sequential
  sampler): ``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``. So prompt ``i`` gets
  the completion of the *previous* row, prompt 0 that of the last row. Use it as
  ``kl_completions = completions[kto_mismatched_pairs(B)]`` on one device's batch
  (Ethayarajh et al., 2024, arXiv:2402.01306, Sec. 4.1).

  Args:
    n: rows in the batch, >= 1. With ``n == 1`` the "mismatched" pair is the
      matched one, as in TRL.

  Returns:
    ``int32 [n]`` array ``[(i - 1) mod n for i in range(n)]``.
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"kto_mismatched_pairs: `n` must be a positive int, got {n!r}.")
  return ((np.arange(n) - 1) % n).astype(np.int32)


def kto_kl_estimate(policy_kl_logps, reference_kl_logps) -> Array:
  """KTO's reference point ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))``.

  Ethayarajh et al., 2024, arXiv:2402.01306, Eq. (8) as TRL computes it: the
  mean over the batch's mismatched pairs (:func:`kto_mismatched_pairs`) of the
  summed completion log-ratio, clamped at 0 and detached (stop-gradient).

  Args:
    policy_kl_logps: ``[B]`` policy log-probabilities of the mismatched completions.
    reference_kl_logps: ``[B]`` reference log-probabilities of the same.

  Returns:
    float32 scalar ``[]``, no gradient.
  """
  fn = "kto_kl_estimate"
  _checks.check_rank(fn, "policy_kl_logps", policy_kl_logps, 1, "[B]")
  _checks.check_rank(fn, "reference_kl_logps", reference_kl_logps, 1, "[B]")
  _checks.check_same_shape(
      fn, ("policy_kl_logps", "reference_kl_logps"), policy_kl_logps, reference_kl_logps
  )
  diff = _f32(policy_kl_logps) - _f32(reference_kl_logps)
  return jax.lax.stop_gradient(jnp.maximum(jnp.mean(diff), 0.0))


def kto_loss(
    policy_logps,
    reference_logps,
    desirable,
    kl,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, KTOOutput]:
  """Per-row KTO loss (TRL ``loss_type="kto"``).

  Ethayarajh et al., 2024. KTO: Model Alignment as Prospect Theoretic
  Optimization. arXiv:2402.01306, Eq. (7). With ``r = policy_logps -
  sg(reference_logps)`` and ``z0 = sg(kl)``:
  ``w_d (1 - sigmoid(beta (r - z0)))`` on desirable rows and
  ``w_u (1 - sigmoid(beta (z0 - r)))`` on undesirable ones. TRL's batch loss is
  ``losses.mean()``.

  Args:
    policy_logps: ``[B]`` summed completion log-probabilities under the policy.
    reference_logps: ``[B]`` the same under the reference model (no gradient).
    desirable: ``[B]`` bool (or 0/1 integer) labels, True for desirable rows.
    kl: scalar reference point, usually :func:`kto_kl_estimate` (no gradient);
      0 drops it (what TRL uses when it does not estimate the KL).
    beta: reward scale, > 0.
    desirable_weight: ``w_d`` >= 0 (Eq. (8) of the paper suggests
      ``w_d n_d / (w_u n_u)`` in [1, 4/3]).
    undesirable_weight: ``w_u`` >= 0.

  Returns:
    ``(losses [B], KTOOutput)``.
  """
  fn = "kto_loss"
  _checks.check_positive(fn, "beta", beta)
  _checks.check_in_range(fn, "desirable_weight", desirable_weight, 0.0, float("inf"))
  _checks.check_in_range(fn, "undesirable_weight", undesirable_weight, 0.0, float("inf"))
  names = ("policy_logps", "reference_logps", "desirable")
  for name, x in zip(names, (policy_logps, reference_logps, desirable)):
    _checks.check_rank(fn, name, x, 1, "[B]")
  _checks.check_same_shape(fn, names, policy_logps, reference_logps, desirable)
  d_dtype = jnp.asarray(desirable).dtype
  if not (d_dtype == jnp.bool_ or jnp.issubdtype(d_dtype, jnp.integer)):
    raise TypeError(f"kto_loss: `desirable` must be bool or integer 0/1 labels, got dtype {d_dtype}.")
  if _checks.shape_of(kl) != ():
    raise ValueError(f"kto_loss: `kl` must be a scalar (shape ()), got shape {_checks.shape_of(kl)}.")
  is_desirable = jnp.asarray(desirable) != 0
  logratio = _f32(policy_logps) - jax.lax.stop_gradient(_f32(reference_logps))
  z0 = jax.lax.stop_gradient(_f32(kl))
  chosen = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio - z0)))
  rejected = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - logratio)))
  losses = jnp.where(is_desirable, chosen, rejected)
  rewards = jax.lax.stop_gradient(beta * logratio)
  return losses, KTOOutput(
      rewards=rewards,
      chosen_rewards=jnp.where(is_desirable, rewards, 0.0),
      rejected_rewards=jnp.where(is_desirable, 0.0, rewards),
      desirable=is_desirable.astype(jnp.float32),
      kl=z0,
  )
