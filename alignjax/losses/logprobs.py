"""Token and sequence log-probabilities, masked reductions and per-token KL.

Conventions used throughout :mod:`alignjax.losses`:

* ``logits`` are ``[B, T, V]`` and ``logits[:, t]`` scores ``labels[:, t]``.
  Raw decoder outputs predict the *next* token; :func:`shift_for_next_token`
  aligns them.
* ``mask`` is ``[B, T]`` (bool or 0/1). Positions with ``mask == 0`` contribute
  nothing and may hold any label, including negative "ignore" ids such as -100.
* All arithmetic on probabilities is done in float32 regardless of the input
  dtype (bf16 logits are common on TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses import _checks

Array = jax.Array


def _f32(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mask(mask) -> Array:
  return jnp.asarray(mask).astype(jnp.float32)


def masked_sum(x, mask, axis: int = -1) -> Array:
  """Sum of ``x`` over ``axis`` counting only positions where ``mask`` is set."""
  return jnp.sum(_f32(x) * _mask(mask), axis=axis)


def masked_mean(x, mask, axis: int = -1) -> Array:
  """Mean of ``x`` over masked positions; 0 (not NaN) where nothing is masked in."""
  m = _mask(mask)
  total = jnp.sum(_f32(x) * m, axis=axis)
  count = jnp.sum(m, axis=axis)
  return total / jnp.maximum(count, 1.0)


def shift_for_next_token(logits, tokens, mask=None):
  """Aligns causal-LM outputs with the tokens they predict.

  Args:
    logits: ``[B, T, V]`` decoder outputs for ``tokens``.
    tokens: ``[B, T]`` input token ids.
    mask: optional ``[B, T]`` mask over ``tokens`` marking the positions whose
      log-probability should count (e.g. the response, not the prompt).

  Returns:
    ``(logits[:, :-1], tokens[:, 1:], mask[:, 1:])`` (mask omitted if None).
  """
  fn = "shift_for_next_token"
  _checks.check_logits_labels(fn, "logits", logits, "tokens", tokens)
  if mask is None:
    return logits[:, :-1], tokens[:, 1:]
  _checks.check_mask(fn, "mask", mask, "tokens", _checks.shape_of(tokens))
  return logits[:, :-1], tokens[:, 1:], mask[:, 1:]


def token_logprobs(logits, labels) -> Array:
  """Log-probability of each label under ``softmax(logits)``.

  Args:
    logits: ``[B, T, V]``.
    labels: ``[B, T]`` integer ids. Negative ids (ignore markers) are scored as
      id 0; mask those positions out downstream.

  Returns:
    ``[B, T]`` float32 log-probabilities.
  """
  _checks.check_logits_labels("token_logprobs", "logits", logits, "labels", labels)
  logits = _f32(logits)
  labels = jnp.asarray(labels)
  safe = jnp.where(labels < 0, 0, labels)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(logits, labels, mask, *, average: bool = False) -> Array:
  """Summed (or token-averaged) log-probability of each masked sequence.

  Args:
    logits: ``[B, T, V]``.
    labels: ``[B, T]`` integer ids.
    mask: ``[B, T]`` positions to count.
    average: divide by the number of masked tokens (IPO / SimPO style).

  Returns:
    ``[B]`` float32; rows with an empty mask give 0.
  """
  fn = "sequence_logprobs"
  _checks.check_logits_labels(fn, "logits", logits, "labels", labels)
  _checks.check_mask(fn, "mask", mask, "labels", _checks.shape_of(labels))
  lp = token_logprobs(logits, labels)
  return masked_mean(lp, mask) if average else masked_sum(lp, mask)


def token_kl(p_logits, q_logits) -> Array:
  """Per-position ``KL(softmax(p_logits) || softmax(q_logits))`` over the vocabulary.

  Args:
    p_logits: ``[..., V]`` logits of the distribution the expectation is under.
    q_logits: ``[..., V]`` logits of the other distribution.

  Returns:
    ``[...]`` float32, non-negative up to rounding.
  """
  if _checks.shape_of(p_logits) != _checks.shape_of(q_logits):
    raise ValueError(
        f"token_kl: `p_logits` {_checks.shape_of(p_logits)} and `q_logits` "
        f"{_checks.shape_of(q_logits)} must share one shape [..., V]."
    )
  if len(_checks.shape_of(p_logits)) < 1:
    raise ValueError("token_kl: logits need a trailing vocabulary axis [..., V].")
  logp = jax.nn.log_softmax(_f32(p_logits), axis=-1)
  logq = jax.nn.log_softmax(_f32(q_logits), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def token_entropy(logits) -> Array:
  """Per-position entropy of ``softmax(logits)`` in nats, ``[...]`` float32."""
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def sequence_kl(p_logits, q_logits, mask, *, average: bool = False) -> Array:
  """Sequential KL: per-token ``KL(p || q)`` summed (or averaged) over ``mask``.

  Args:
    p_logits, q_logits: ``[B, T, V]``.
    mask: ``[B, T]``.
    average: divide by the number of masked tokens.

  Returns:
    ``[B]`` float32.
  """
  fn = "sequence_kl"
  _checks.check_rank(fn, "p_logits", p_logits, 3, "[B, T, V]")
  _checks.check_same_shape(fn, ("p_logits", "q_logits"), p_logits, q_logits)
  _checks.check_mask(fn, "mask", mask, "p_logits[..., 0]", _checks.shape_of(p_logits)[:2])
  kl = token_kl(p_logits, q_logits)
  return masked_mean(kl, mask) if average else masked_sum(kl, mask)
