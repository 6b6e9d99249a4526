"""SparsePO: preference optimisation with sparse token masks on the reward and the KL.

Christopoulou et al., 2024. SparsePO: Controlling Preference Alignment of LLMs
via Sparse Token Masks. arXiv:2410.05102.

SparsePO starts from the token-level DPO objective (TDPO1 of Zeng et al.,
arXiv:2404.11999) and lets two non-negative token masks choose which tokens
carry the reward (``m^u``) and the per-token KL (``m^d``):

``U = sum_t m^u_t log(pi(y_t)/pi_ref(y_t))``, ``K = sum_t m^d_t KL(pi_ref(.|y_<t) || pi(.|y_<t))``

over response positions of each side, and
``loss = -log sigmoid(beta ((U_w - U_l) - (K_l - K_w))) + l1_u sum m^u + l1_d sum m^d``.

As in the authors' ``SparseTrainer.get_batch_loss_metrics``
(``huawei-noah/HEBO/SparsePO/src/trainers/sparse_trainer.py``): no stop-gradient on
either KL (TDPO1, not TDPO2), reference quantities are computed without gradient,
the L1 terms are ``||m * loss_mask||_1`` of both sides, and the logged rewards
are ``beta (U - K)`` (their ``token_kl`` is ``sum p_ref (log pi - log pi_ref) = -KL``).

The authors' masks (``src/masks/mask_models.py``, default ``mask_model="simple_all"``)
are learned: for every layer ``l`` of the *reference* model, the hidden states at
the positions that predict the labels (``h_l[:, :-1]``, embeddings excluded) pass
a shared LayerNorm, a per-layer ``Linear(d, 1)``, ReLU and dropout; a bias-free
``Linear(L, 1)`` mixes the layers, then ReLU and dropout (``mask_dropout=0.01``, which
their default ``disable_dropout=True`` switches off). The mask parameters train
jointly with the policy (``mask_weight_decay=0.01`` on their weights).
"sparse-common" (``rw_kl_independent=False``, the default) uses one mask network
for both terms and halves both L1 coefficients to compensate for counting it
twice; "sparse-indp" trains two networks. Here the masks are inputs, so a
caller may pass any non-negative masks (learned, fixed, or all ones) and scales
the L1 coefficients itself; the registry's ``sparsepo`` algorithm
(:mod:`alignjax.training.algorithms.sparsepo`, ``loss.mask="learned"``) holds the
mask network and trains it with the policy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from alignjax.losses import _checks
from alignjax.losses.logprobs import token_kl, token_logprobs

Array = jax.Array


class SparsePOOutput(NamedTuple):
  """Per-example SparsePO diagnostics, each ``[B]``.

  Attributes:
    chosen_rewards: ``beta * (U_w - K_w)`` as the authors log it.
    rejected_rewards: ``beta * (U_l - K_l)``.
    margins: ``chosen_rewards - rejected_rewards``.
    accuracies: 1.0 where ``chosen_rewards > rejected_rewards``.
    chosen_masked_kl: ``K_w``, the mask-weighted sequential KL of ``y_w``.
    rejected_masked_kl: ``K_l``.
    reward_mask_l1: ``sum m^u`` over response positions of both sides.
    kl_mask_l1: ``sum m^d`` over response positions of both sides.
    logits: ``(U_w - U_l) - (K_l - K_w)``, before ``beta``.
  """

  chosen_rewards: Array
  rejected_rewards: Array
  margins: Array
  accuracies: Array
  chosen_masked_kl: Array
  rejected_masked_kl: Array
  reward_mask_l1: Array
  kl_mask_l1: Array
  logits: Array


def _f32(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mask_pair(fn: str, name: str, masks, chosen_shape, rejected_shape):
  if not isinstance(masks, (tuple, list)) or len(masks) != 2:
    raise TypeError(
        f"{fn}: `{name}` must be a pair (chosen [B, T], rejected [B, T']) of masks, "
        f"got {type(masks).__name__}."
    )
  _checks.check_mask(fn, f"{name}[0]", masks[0], "chosen_labels", chosen_shape)
  _checks.check_mask(fn, f"{name}[1]", masks[1], "rejected_labels", rejected_shape)
  return _f32(masks[0]), _f32(masks[1])


def _check_side(fn, side, policy_logits, reference_logits, labels, mask):
  _checks.check_logits_labels(fn, f"policy_{side}_logits", policy_logits, f"{side}_labels", labels)
  _checks.check_same_shape(
      fn, (f"policy_{side}_logits", f"reference_{side}_logits"), policy_logits, reference_logits
  )
  _checks.check_mask(fn, f"{side}_mask", mask, f"{side}_labels", _checks.shape_of(labels))


def _side(policy_logits, reference_logits, labels, mask):
  reference_logits = jax.lax.stop_gradient(reference_logits)
  logratio = token_logprobs(policy_logits, labels) - token_logprobs(reference_logits, labels)
  kl = token_kl(reference_logits, policy_logits)  # KL(pi_ref || pi), gradient through pi
  return logratio, kl, _f32(mask).astype(jnp.float32)


def sparsepo_loss(
    policy_chosen_logits,
    policy_rejected_logits,
    reference_chosen_logits,
    reference_rejected_logits,
    chosen_labels,
    rejected_labels,
    chosen_mask,
    rejected_mask,
    *,
    reward_masks,
    kl_masks=None,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
) -> tuple[Array, SparsePOOutput]:
  """SparsePO loss from logits (the authors' learned-mask trainer).

  Christopoulou et al., 2024, arXiv:2410.05102, Sec. 3 (the masked token-level
  objective and its L1 sparsity terms). Per side, over response positions (``*_mask``):
  ``U = sum_t m^u_t rho_t`` with ``rho_t = log pi(y_t) - log pi_ref(y_t)`` and
  ``K = sum_t m^d_t KL_t(pi_ref || pi)``;
  ``loss = -log sigmoid(beta ((U_w - U_l) - (K_l - K_w)))
  + l1_reward * (sum m^u_w + sum m^u_l) + l1_kl * (sum m^d_w + sum m^d_l)``.
  No stop-gradient on either KL; the reference logits get none. With all masks 1
  and no L1 this is TDPO1 (:func:`alignjax.losses.tdpo_loss`, ``variant="tdpo1"``).
  Gradients also flow into the masks, so a mask network trains through this loss.

  Args:
    policy_chosen_logits: ``[B, T, V]`` policy logits aligned with ``chosen_labels``.
    policy_rejected_logits: ``[B, T', V]`` the same for the rejected responses.
    reference_chosen_logits: ``[B, T, V]`` reference logits (no gradient).
    reference_rejected_logits: ``[B, T', V]`` reference logits (no gradient).
    chosen_labels, rejected_labels: ``[B, T]`` / ``[B, T']`` token ids.
    chosen_mask, rejected_mask: ``[B, T]`` / ``[B, T']`` response positions.
    reward_masks: pair ``(m^u_w [B, T], m^u_l [B, T'])`` of non-negative masks.
    kl_masks: pair ``(m^d_w, m^d_l)``; None uses ``reward_masks`` (one common mask;
      the authors then halve both L1 coefficients, which is the caller's choice).
    beta: inverse temperature, > 0.
    l1_reward: coefficient of the L1 norm of the reward masks, >= 0.
    l1_kl: coefficient of the L1 norm of the KL masks, >= 0.

  Returns:
    ``(losses [B], SparsePOOutput)``.
  """
  fn = "sparsepo_loss"
  _checks.check_positive(fn, "beta", beta)
  _checks.check_in_range(fn, "l1_reward", l1_reward, 0.0, float("inf"))
  _checks.check_in_range(fn, "l1_kl", l1_kl, 0.0, float("inf"))
  _check_side(fn, "chosen", policy_chosen_logits, reference_chosen_logits, chosen_labels, chosen_mask)
  _check_side(fn, "rejected", policy_rejected_logits, reference_rejected_logits, rejected_labels,
              rejected_mask)
  shape_c, shape_r = _checks.shape_of(chosen_labels), _checks.shape_of(rejected_labels)
  if shape_c[0] != shape_r[0]:
    raise ValueError(f"{fn}: chosen and rejected batch sizes differ ({shape_c[0]} vs {shape_r[0]}).")
  u_c, u_r = _mask_pair(fn, "reward_masks", reward_masks, shape_c, shape_r)
  if kl_masks is None:
    d_c, d_r = u_c, u_r
  else:
    d_c, d_r = _mask_pair(fn, "kl_masks", kl_masks, shape_c, shape_r)
  rho_c, kl_c, m_c = _side(policy_chosen_logits, reference_chosen_logits, chosen_labels, chosen_mask)
  rho_r, kl_r, m_r = _side(policy_rejected_logits, reference_rejected_logits, rejected_labels,
                           rejected_mask)
  U_c = jnp.sum(u_c * rho_c * m_c, axis=-1)
  U_r = jnp.sum(u_r * rho_r * m_r, axis=-1)
  K_c = jnp.sum(d_c * kl_c * m_c, axis=-1)
  K_r = jnp.sum(d_r * kl_r * m_r, axis=-1)
  logits = (U_c - U_r) - (K_r - K_c)
  reward_l1 = jnp.sum(jnp.abs(u_c) * m_c, axis=-1) + jnp.sum(jnp.abs(u_r) * m_r, axis=-1)
  kl_l1 = jnp.sum(jnp.abs(d_c) * m_c, axis=-1) + jnp.sum(jnp.abs(d_r) * m_r, axis=-1)
  losses = -jax.nn.log_sigmoid(beta * logits) + l1_reward * reward_l1 + l1_kl * kl_l1
  chosen_rewards = jax.lax.stop_gradient(beta * (U_c - K_c))
  rejected_rewards = jax.lax.stop_gradient(beta * (U_r - K_r))
  sg = jax.lax.stop_gradient
  return losses, SparsePOOutput(
      chosen_rewards=chosen_rewards,
      rejected_rewards=rejected_rewards,
      margins=chosen_rewards - rejected_rewards,
      accuracies=(chosen_rewards > rejected_rewards).astype(jnp.float32),
      chosen_masked_kl=sg(K_c),
      rejected_masked_kl=sg(K_r),
      reward_mask_l1=sg(reward_l1),
      kl_mask_l1=sg(kl_l1),
      logits=sg(logits),
  )
