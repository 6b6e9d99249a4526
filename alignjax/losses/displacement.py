"""Likelihood-displacement diagnostics: CHES scores and gradient entanglement.

Razin et al., 2024. Unintentional Unalignment: Likelihood Displacement in
Direct Preference Optimization. arXiv:2410.08847 (ICLR 2025).

DPO can *lower* the probability of the preferred response when the preferred
and dispreferred responses are similar in the model's hidden-embedding space.
The Centered Hidden Embedding Similarity (CHES, Definition 2) measures that
similarity per preference pair; pairs with the highest (length-normalised) CHES
are the ones that cause displacement, and the authors filter them out.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from alignjax.losses import _checks

Array = jax.Array


def _f32(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def ches_scores(
    chosen_hidden,
    rejected_hidden,
    chosen_mask,
    rejected_mask,
    *,
    length_normalize: bool = False,
) -> Array:
  """CHES score of each (prompt, preferred, dispreferred) triple.

  Razin et al., 2024, arXiv:2410.08847, Definition 2 (and its length-normalised
  variant of Sec. 6). With ``S+ = sum_t h+_t`` and ``S- = sum_t h-_t`` the sums of
  the last-layer hidden states over the positions that *predict* the response
  tokens, and ``n+``, ``n-`` their counts:

  * ``CHES = <S+, S-> - ||S+||^2``
  * length-normalised: ``<S+, S-> / (n+ n-) - ||S+||^2 / n+^2``.

  Positions, as in the authors' ``ches/ches.py``: from the last prompt token
  (whose hidden state predicts the first response token) to the second-to-last
  response token; the last token's state (usually EOS) predicts nothing and is
  dropped. That is exactly the label-aligned layout of this library: pass
  ``hidden[:, :-1]`` of the full prompt+response sequence with the response
  mask shifted like the labels (``mask[:, 1:]``, see
  :func:`alignjax.losses.shift_for_next_token`). A side with no response
  tokens contributes ``S = 0`` (so the score is 0 when the preferred side is
  empty), and the normalised terms divide by ``max(n, 1)``.

  Args:
    chosen_hidden: ``[B, T, D]`` last-layer hidden states on ``(x, y+)``,
      label-aligned (``chosen_hidden[:, t]`` predicts label ``t``).
    rejected_hidden: ``[B, T', D]`` the same on ``(x, y-)``.
    chosen_mask: ``[B, T]`` label positions of the preferred response.
    rejected_mask: ``[B, T']`` label positions of the dispreferred response.
    length_normalize: use the length-normalised score.

  Returns:
    ``[B]`` float32 scores; higher means more displacement-prone.
  """
  fn = "ches_scores"
  _checks.check_rank(fn, "chosen_hidden", chosen_hidden, 3, "[B, T, D]")
  _checks.check_rank(fn, "rejected_hidden", rejected_hidden, 3, "[B, T', D]")
  b_c, t_c, d_c = _checks.shape_of(chosen_hidden)
  b_r, t_r, d_r = _checks.shape_of(rejected_hidden)
  if (b_c, d_c) != (b_r, d_r):
    raise ValueError(
        f"{fn}: `chosen_hidden` {(b_c, t_c, d_c)} and `rejected_hidden` {(b_r, t_r, d_r)} "
        "must share the batch and hidden sizes [B, ., D]."
    )
  _checks.check_mask(fn, "chosen_mask", chosen_mask, "chosen_hidden[..., 0]", (b_c, t_c))
  _checks.check_mask(fn, "rejected_mask", rejected_mask, "rejected_hidden[..., 0]", (b_r, t_r))
  m_pos = _f32(chosen_mask).astype(jnp.float32)
  m_neg = _f32(rejected_mask).astype(jnp.float32)
  s_pos = jnp.sum(_f32(chosen_hidden) * m_pos[..., None], axis=1)
  s_neg = jnp.sum(_f32(rejected_hidden) * m_neg[..., None], axis=1)
  cross = jnp.sum(s_pos * s_neg, axis=-1)
  self_sq = jnp.sum(s_pos * s_pos, axis=-1)
  if not length_normalize:
    return cross - self_sq
  n_pos = jnp.maximum(jnp.sum(m_pos, axis=-1), 1.0)
  n_neg = jnp.maximum(jnp.sum(m_neg, axis=-1), 1.0)
  return cross / (n_pos * n_neg) - self_sq / (n_pos * n_pos)


class EntanglementOutput(NamedTuple):
  """Per-pair gradient geometry, each ``[B]``.

  Attributes:
    inner_product: ``<g+, g->`` summed over every leaf of the pytrees.
    cosine: ``<g+, g-> / (||g+|| ||g-||)`` (0 where either norm is 0).
    chosen_norm: ``||g+||``.
    rejected_norm: ``||g-||``.
  """

  inner_product: Array
  cosine: Array
  chosen_norm: Array
  rejected_norm: Array


def gradient_entanglement(chosen_grads, rejected_grads) -> EntanglementOutput:
  """Inner product and cosine of per-example gradients of the chosen and rejected log-probs.

  Razin et al., 2024, arXiv:2410.08847, Sec. 4: under a DPO step the preferred
  log-probability changes by a multiple of ``||g+||^2 - <g+, g->`` with
  ``g± = grad_theta log pi(y±|x)``, so it falls when ``<g+, g->`` exceeds
  ``||g+||^2`` (CHES is that quantity's hidden-embedding proxy); Yuan et al., 2024, "A
  Common Pitfall of Margin-based Language Model Alignment: Gradient
  Entanglement", arXiv:2410.13828, call this gradient entanglement.

  Args:
    chosen_grads: pytree whose leaves are ``[B, ...]`` per-example gradients of
      ``log pi(y+|x)`` (e.g. from ``jax.vmap(jax.grad(...))``).
    rejected_grads: pytree of the same structure and shapes for ``y-``.

  Returns:
    :class:`EntanglementOutput`.
  """
  fn = "gradient_entanglement"
  struct_c = jax.tree.structure(chosen_grads)
  struct_r = jax.tree.structure(rejected_grads)
  if struct_c != struct_r:
    raise ValueError(f"{fn}: `chosen_grads` and `rejected_grads` must share one pytree structure.")
  leaves_c, leaves_r = jax.tree.leaves(chosen_grads), jax.tree.leaves(rejected_grads)
  if not leaves_c:
    raise ValueError(f"{fn}: `chosen_grads` has no array leaves.")
  batch = None
  for i, (a, b) in enumerate(zip(leaves_c, leaves_r)):
    sa, sb = _checks.shape_of(a), _checks.shape_of(b)
    if sa != sb or len(sa) < 1:
      raise ValueError(
          f"{fn}: leaf {i} has shapes {sa} (chosen) and {sb} (rejected); expected one shape [B, ...]."
      )
    if batch is None:
      batch = sa[0]
    elif sa[0] != batch:
      raise ValueError(f"{fn}: leaf {i} has batch size {sa[0]}, expected {batch} like leaf 0.")

  def per_example(x, y):
    x, y = _f32(x), _f32(y)
    return jnp.sum((x * y).reshape(x.shape[0], -1), axis=-1)

  inner = sum(per_example(a, b) for a, b in zip(leaves_c, leaves_r))
  sq_c = sum(per_example(a, a) for a in leaves_c)
  sq_r = sum(per_example(b, b) for b in leaves_r)
  norm_c, norm_r = jnp.sqrt(sq_c), jnp.sqrt(sq_r)
  denom = norm_c * norm_r
  cosine = jnp.where(denom > 0, inner / jnp.where(denom > 0, denom, 1.0), 0.0)
  return EntanglementOutput(inner_product=inner, cosine=cosine, chosen_norm=norm_c,
                            rejected_norm=norm_r)
