"""Sequence-level offline preference losses: DPO (with cDPO smoothing) and GPO.

All functions take per-example sequence log-probabilities ``[B]`` of the chosen
(preferred, ``y_w``) and rejected (``y_l``) responses under the policy and the
reference model, and return ``(losses [B], diagnostics)``. Reference terms are
wrapped in ``stop_gradient``: no gradient ever reaches the reference model.

References:
  * Rafailov et al., 2023. Direct Preference Optimization. arXiv:2305.18290.
  * Mitchell, 2023. A note on DPO with noisy preferences (cDPO).
  * Tang et al., 2024. Generalized Preference Optimization. arXiv:2402.05749.
  * Azar et al., 2023. A General Theoretical Paradigm ... (IPO). arXiv:2310.12036.
  * Zhao et al., 2023. SLiC-HF. arXiv:2305.10425.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from alignjax.losses import _checks

Array = jax.Array


class PreferenceOutput(NamedTuple):
  """Per-example diagnostics of a pairwise preference loss, each ``[B]``.

  Attributes:
    chosen_rewards: implicit reward ``beta * (log pi(y_w) - log pi_ref(y_w))``.
    rejected_rewards: the same for ``y_l``.
    margins: ``chosen_rewards - rejected_rewards``.
    accuracies: 1.0 where ``chosen_rewards > rejected_rewards`` else 0.0.
    logits: the log-ratio difference ``rho`` the loss is a function of,
      *before* multiplying by ``beta``.
  """

  chosen_rewards: Array
  rejected_rewards: Array
  margins: Array
  accuracies: Array
  logits: Array


def _f32(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _pair_inputs(fn, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
  names = (
      "policy_chosen_logps",
      "policy_rejected_logps",
      "reference_chosen_logps",
      "reference_rejected_logps",
  )
  arrays = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  for name, x in zip(names, arrays):
    _checks.check_rank(fn, name, x, 1, "[B]")
  _checks.check_same_shape(fn, names, *arrays)
  pc, pr = _f32(policy_chosen), _f32(policy_rejected)
  rc = jax.lax.stop_gradient(_f32(ref_chosen))
  rr = jax.lax.stop_gradient(_f32(ref_rejected))
  return pc - rc, pr - rr


def _diagnostics(beta, chosen_logratio, rejected_logratio) -> PreferenceOutput:
  chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratio)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratio)
  margins = chosen_rewards - rejected_rewards
  return PreferenceOutput(
      chosen_rewards=chosen_rewards,
      rejected_rewards=rejected_rewards,
      margins=margins,
      accuracies=(chosen_rewards > rejected_rewards).astype(jnp.float32),
      logits=jax.lax.stop_gradient(chosen_logratio - rejected_logratio),
  )


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    robust: bool = False,
) -> tuple[Array, PreferenceOutput]:
  """DPO loss with optional label-noise handling (cDPO or robust DPO).

  With ``rho = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``,
  ``l(+) = -log sigmoid(beta * rho)`` and ``l(-) = -log sigmoid(-beta * rho)``:

  * DPO / cDPO: ``(1 - eps) l(+) + eps l(-)`` (conservative DPO, Mitchell 2023).
  * robust DPO: ``((1 - eps) l(+) - eps l(-)) / (1 - 2 eps)``, the unbiased
    estimate under label flips of probability ``eps`` (Chowdhury et al., 2024,
    arXiv:2403.00409).

  Args:
    policy_chosen_logps: ``[B]`` policy log-probabilities of chosen responses.
    policy_rejected_logps: ``[B]`` policy log-probabilities of rejected responses.
    reference_chosen_logps: ``[B]`` reference log-probabilities (no gradient).
    reference_rejected_logps: ``[B]`` reference log-probabilities (no gradient).
    beta: inverse temperature of the implicit reward, > 0.
    label_smoothing: assumed label-flip probability ``eps``; in [0, 0.5] for
      cDPO and in [0, 0.5) for robust DPO.
    robust: use the robust-DPO estimator instead of cDPO smoothing.

  Returns:
    ``(losses [B], PreferenceOutput)``.
  """
  fn = "dpo_loss"
  _checks.check_positive(fn, "beta", beta)
  _checks.check_in_range(
      fn, "label_smoothing", label_smoothing, 0.0, 0.5, hi_inclusive=not robust
  )
  chosen, rejected = _pair_inputs(
      fn, policy_chosen_logps, policy_rejected_logps,
      reference_chosen_logps, reference_rejected_logps,
  )
  rho = chosen - rejected
  agree = -jax.nn.log_sigmoid(beta * rho)
  flipped = -jax.nn.log_sigmoid(-beta * rho)
  if robust:
    losses = ((1.0 - label_smoothing) * agree - label_smoothing * flipped) / (
        1.0 - 2.0 * label_smoothing
    )
  else:
    losses = (1.0 - label_smoothing) * agree + label_smoothing * flipped
  return losses, _diagnostics(beta, chosen, rejected)


# Convex functions f of GPO: loss = f(beta * rho). Each is a proper convex
# surrogate of the 0-1 loss with f'(0) < 0 (Tang et al., 2024, Table 1).
def logistic(x: Array) -> Array:
  """``log(1 + exp(-x))``: DPO."""
  return jax.nn.softplus(-x)


def hinge(x: Array) -> Array:
  """``max(0, 1 - x)``: SLiC."""
  return jax.nn.relu(1.0 - x)


def squared(x: Array) -> Array:
  """``(x - 1)^2``: IPO (``beta = 2 * tau`` recovers IPO's ``(rho - 1/(2 tau))^2`` up to ``beta^2``)."""
  return jnp.square(x - 1.0)


def exponential(x: Array) -> Array:
  """``exp(-x)``."""
  return jnp.exp(-x)


def truncated_quadratic(x: Array) -> Array:
  """``max(0, 1 - x)^2``."""
  return jnp.square(jax.nn.relu(1.0 - x))


def savage(x: Array) -> Array:
  """``1 / (1 + exp(x))^2`` (Savage loss; non-convex but used in GPO's study)."""
  return jnp.square(jax.nn.sigmoid(-x))


GPO_FUNCTIONS: dict[str, Callable[[Array], Array]] = {
    "logistic": logistic,
    "hinge": hinge,
    "squared": squared,
    "exponential": exponential,
    "truncated_quadratic": truncated_quadratic,
    "savage": savage,
}

# Common names of the algorithms each function recovers.
GPO_ALIASES: dict[str, str] = {"dpo": "logistic", "slic": "hinge", "ipo": "squared"}


def gpo_function(name: str) -> Callable[[Array], Array]:
  """Looks up a GPO convex function by name or alias (``dpo``, ``slic``, ``ipo``)."""
  key = GPO_ALIASES.get(name, name)
  _checks.check_choice(
      "gpo_function", "loss_type", key, set(GPO_FUNCTIONS) | set(GPO_ALIASES)
  )
  return GPO_FUNCTIONS[key]


def gpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Callable[[Array], Array]] = "logistic",
) -> tuple[Array, PreferenceOutput]:
  """Generalized Preference Optimization: ``loss = f(beta * rho)``.

  Args:
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
      reference_rejected_logps: ``[B]`` sequence log-probabilities as in
      :func:`dpo_loss`.
    beta: scale of the log-ratio difference, > 0.
    loss_type: one of ``logistic`` (DPO), ``hinge`` (SLiC), ``squared`` (IPO),
      ``exponential``, ``truncated_quadratic``, ``savage`` (or the aliases
      ``dpo``, ``slic``, ``ipo``), or any callable ``f(x) -> loss``.

  Returns:
    ``(losses [B], PreferenceOutput)``.
  """
  fn = "gpo_loss"
  _checks.check_positive(fn, "beta", beta)
  f = loss_type if callable(loss_type) else gpo_function(loss_type)
  chosen, rejected = _pair_inputs(
      fn, policy_chosen_logps, policy_rejected_logps,
      reference_chosen_logps, reference_rejected_logps,
  )
  losses = f(beta * (chosen - rejected))
  return losses, _diagnostics(beta, chosen, rejected)
