"""Decoding-time alignment by combining the logits of several models at every step.

A :class:`LogitMixture` is a list of models sharing one vocabulary and a weight
vector (one per model, or one per row and model); at every decoding step the sampler
runs each model with its own KV cache and samples from
``softmax(sum_m w[b, m] * z_m[b])``, with ``z_m`` the model's next-token logits.
The weights are traced values: changing them between calls never recompiles.

Two published instances:

* DeRa -- Liu et al. 2024, "Decoding-time Realignment of Language Models"
  (arXiv:2402.02992), Eq. 9 and Alg. 1: ``softmax(lambda * z_aligned + (1 - lambda) * z_ref)``;
  ``lambda = 1`` is the aligned model, ``0`` the reference, ``> 1`` extrapolates.
  Use :func:`dera`.
* Proxy tuning / weak-to-strong -- Liu et al. 2024, "Tuning Language Models by Proxy"
  (arXiv:2401.08565), Eq. 1: ``z_strong + alpha * (z_small_aligned - z_small_ref)``;
  see also Mitchell et al. 2024, "An Emulator for Fine-Tuning Large Language Models
  using Small Language Models" (arXiv:2310.12962). Use :func:`proxy_tuning`.

Because softmax is invariant to a per-row shift, using logits or log-softmaxes in the
sum gives the same distribution whenever the weights sum to a constant per row (true
for both instances).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class LogitMixture(NamedTuple):
  """Models whose next-token logits are summed with ``weights`` ``[M]`` or ``[B, M]``.

  Pass it to :func:`~alignjax.decoding.generate` in place of a model.
  """
  models: tuple
  weights: jax.Array


def mixture(models: Sequence, weights) -> LogitMixture:
  """A validated :class:`LogitMixture` of ``models`` with ``weights [M]`` or ``[B, M]``."""
  models = tuple(models)
  if len(models) < 1:
    raise ValueError("mixture: `models` must hold at least one model.")
  w = weights if isinstance(weights, jax.core.Tracer) else np.asarray(weights, np.float32)
  if w.ndim not in (1, 2) or w.shape[-1] != len(models):
    raise ValueError(f"mixture: `weights` must be [{len(models)}] or [B, {len(models)}] "
                     f"(one per model), got shape {w.shape}.")
  vocab = {_vocab_size(m) for m in models}
  vocab.discard(None)
  if len(vocab) > 1:
    raise ValueError(f"mixture: all models must share one vocabulary, got vocab sizes {sorted(vocab)}.")
  return LogitMixture(models, w)


def dera(aligned, reference, lam) -> LogitMixture:
  """DeRa (arXiv:2402.02992, Eq. 9): ``softmax(lam * z_aligned + (1 - lam) * z_ref)``.

  ``lam`` is a scalar or ``[B]`` (a realignment strength per row).
  """
  xp = jnp if isinstance(lam, jax.core.Tracer) else np
  lam = xp.asarray(lam, xp.float32)
  if lam.ndim > 1:
    raise ValueError(f"dera: `lam` must be a scalar or [B], got shape {lam.shape}.")
  return mixture((aligned, reference), xp.stack([lam, 1.0 - lam], axis=-1))


def proxy_tuning(strong, small_aligned, small_reference, alpha=1.0) -> LogitMixture:
  """Proxy tuning (arXiv:2401.08565, Eq. 1): ``z_strong + alpha * (z_small_aligned - z_small_ref)``.

  ``alpha`` is a scalar or ``[B]``. The models may differ in size but must share the vocabulary.
  """
  xp = jnp if isinstance(alpha, jax.core.Tracer) else np
  alpha = xp.asarray(alpha, xp.float32)
  if alpha.ndim > 1:
    raise ValueError(f"proxy_tuning: `alpha` must be a scalar or [B], got shape {alpha.shape}.")
  return mixture((strong, small_aligned, small_reference),
                 xp.stack([xp.ones_like(alpha), alpha, -alpha], axis=-1))


def combine_logits(logits: Sequence[jax.Array], weights: jax.Array) -> jax.Array:
  """``sum_m weights[:, m] * logits[m]`` for ``logits`` M arrays ``[B, V]``, in float32.

  Each model's logits are first normalised with ``log_softmax`` so that ``-inf`` or
  very large raw logits of one model cannot dominate through an offset; the result is
  the same distribution whenever the weights sum to a constant per row.
  """
  B = logits[0].shape[0]
  w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (B, len(logits)))
  if len(logits) == 1:
    return logits[0].astype(jnp.float32) * w[:, 0:1]
  total = 0.0
  for m, z in enumerate(logits):
    total = total + w[:, m:m + 1] * jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
  return total


def _vocab_size(model):
  cfg = getattr(model, "config", None)
  v = getattr(cfg, "vocab_size", None)
  return int(v) if isinstance(v, (int, np.integer)) else None
