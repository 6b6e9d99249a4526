"""Pairwise reward-model loss: Bradley–Terry, as TRL's ``RewardTrainer`` computes it.

References:
  * Bradley & Terry, 1952. Rank Analysis of Incomplete Block Designs. Biometrika 39.
  * Ouyang et al., 2022. Training language models to follow instructions with human
    feedback (InstructGPT). arXiv:2203.02155, Eq. 1:
    loss(θ) = -E[log σ(r_θ(x, y_w) - r_θ(x, y_l))].
  * Touvron et al., 2023. Llama 2. arXiv:2307.09288, Eq. 2 (the margin m(r)):
    -log σ(r_θ(x, y_c) - r_θ(x, y_r) - m(r)).
  * Eisenstein et al., 2023. Helping or Herding? Reward Model Ensembles Mitigate but do
    not Eliminate Reward Hacking. arXiv:2312.09244 (the auxiliary centering loss,
    TRL's ``center_rewards_coefficient``): + η (r(x, y_c) + r(x, y_r))².
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from alignjax.losses import _checks


class RewardOutput(NamedTuple):
  """Per-example diagnostics of :func:`bradley_terry_loss`, each ``[B]`` (no gradient).

  Attributes:
    chosen_rewards: the reward model's score of the chosen response.
    rejected_rewards: the score of the rejected response.
    margins: ``chosen_rewards - rejected_rewards`` (TRL's logged ``margin``, before the mean).
    accuracies: 1.0 where ``chosen_rewards > rejected_rewards`` else 0.0 (TRL's ``accuracy``).
  """
  chosen_rewards: jax.Array
  rejected_rewards: jax.Array
  margins: jax.Array
  accuracies: jax.Array


def bradley_terry_loss(
    chosen_scores: ArrayLike, rejected_scores: ArrayLike, *,
    margin: Optional[ArrayLike] = None, center_rewards_coefficient: Optional[float] = None,
) -> tuple[jax.Array, RewardOutput]:
  """Bradley–Terry pairwise loss of a scalar reward model, per example.

  Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155), Eq. 1, with Llama 2's margin
  (arXiv:2307.09288, Eq. 2) and the centering term of Eisenstein et al. 2023
  (arXiv:2312.09244), exactly as TRL's ``RewardTrainer.compute_loss``:

    loss_b = -log σ(c_b - r_b - m_b) + η (c_b + r_b)²

  with ``c``/``r`` the chosen/rejected scores, ``m`` the margin (0 when None) and
  ``η = center_rewards_coefficient`` (the term is absent when None). TRL averages over
  the batch both the log-sigmoid term and the squared sum, so ``losses.mean()`` equals
  TRL's loss.

  Args:
    chosen_scores: ``[B]`` scores of the chosen responses (``rm(chosen_tokens, mask)``).
    rejected_scores: ``[B]`` scores of the rejected responses.
    margin: None, a scalar or ``[B]``: the required score gap per pair.
    center_rewards_coefficient: None or a float >= 0.

  Returns:
    ``(losses [B] float32, RewardOutput)``.
  """
  fn = "bradley_terry_loss"
  _checks.check_rank(fn, "chosen_scores", chosen_scores, 1, "[B]")
  _checks.check_rank(fn, "rejected_scores", rejected_scores, 1, "[B]")
  _checks.check_same_shape(fn, ("chosen_scores", "rejected_scores"), chosen_scores, rejected_scores)
  B = _checks.shape_of(chosen_scores)[0]
  if margin is not None and _checks.shape_of(margin) not in ((), (B,)):
    raise ValueError(f"{fn}: `margin` must be None, a scalar or [B] = [{B}], got shape "
                     f"{_checks.shape_of(margin)}.")
  if center_rewards_coefficient is not None:
    coef = _checks._concrete(center_rewards_coefficient)  # pylint: disable=protected-access
    if coef is not None and not float(coef) >= 0:
      raise ValueError(f"{fn}: `center_rewards_coefficient` must be None or >= 0, got "
                       f"{center_rewards_coefficient}.")
  c = jnp.asarray(chosen_scores).astype(jnp.float32)
  r = jnp.asarray(rejected_scores).astype(jnp.float32)
  logits = c - r
  if margin is not None:
    logits = logits - jnp.asarray(margin, jnp.float32)
  losses = -jax.nn.log_sigmoid(logits)
  if center_rewards_coefficient is not None:
    losses = losses + jnp.asarray(center_rewards_coefficient, jnp.float32) * jnp.square(c + r)
  c_sg, r_sg = jax.lax.stop_gradient(c), jax.lax.stop_gradient(r)
  diag = RewardOutput(chosen_rewards=c_sg, rejected_rewards=r_sg, margins=c_sg - r_sg,
                      accuracies=(c_sg > r_sg).astype(jnp.float32))
  return losses, diag


__all__ = ["RewardOutput", "bradley_terry_loss"]
