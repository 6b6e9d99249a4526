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


def _chunk_stats(unembed, hidden_chunk, labels_chunk, with_entropy: bool):
  """Label log-prob (and entropy) of one ``[B, C, D]`` chunk; logits live only here."""
  logits = _f32(unembed(hidden_chunk))
  lse = jax.nn.logsumexp(logits, axis=-1)
  safe = jnp.where(labels_chunk < 0, 0, labels_chunk)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  logp = picked - lse
  if not with_entropy:
    return logp, None
  probs = jnp.exp(logits - lse[..., None])
  entropy = lse - jnp.sum(probs * logits, axis=-1)
  return logp, entropy


def chunked_token_logprobs(
    hidden, labels, unembed, *, chunk_size: int, return_entropy: bool = False
):
  """Per-token label log-probs computed chunk by chunk over T, never holding ``[B, T, V]``.

  Equivalent to ``token_logprobs(unembed(hidden), labels)`` (and
  ``token_entropy(unembed(hidden))``), but the sequence is cut into chunks of
  ``chunk_size`` positions; each chunk's logits are formed, reduced to one
  number per position and dropped inside a ``lax.scan`` whose body is wrapped
  in ``jax.checkpoint``. Neither the forward nor the backward pass then holds
  more than ``[B, chunk_size, V]`` logits at once (the backward recomputes each
  chunk's logits from its hidden states). Math is float32 whatever the compute
  dtype of ``unembed``.

  Args:
    hidden: ``[B, T, D]`` final-normed hidden states (e.g. ``model(tokens,
      return_hidden=True)``); ``hidden[:, t]`` scores ``labels[:, t]``.
    labels: ``[B, T]`` integer ids. Negative ids (ignore markers) are scored as
      id 0; mask those positions out downstream.
    unembed: callable mapping ``[..., C, D]`` hidden states to ``[..., C, V]``
      logits (e.g. ``model.unembed``); gradients flow to the weights it closes over.
    chunk_size: positions per chunk (> 0). ``T`` need not be a multiple: the
      last chunk is padded and the padding dropped.
    return_entropy: also return per-position entropy of ``softmax(logits)`` in nats.

  Returns:
    ``logprobs [B, T]`` float32, or ``(logprobs, entropy)`` with both ``[B, T]``
    float32 when ``return_entropy``.
  """
  fn = "chunked_token_logprobs"
  _checks.check_rank(fn, "hidden", hidden, 3, "[B, T, D]")
  _checks.check_rank(fn, "labels", labels, 2, "[B, T]")
  _checks.check_integer(fn, "labels", labels)
  if _checks.shape_of(hidden)[:2] != _checks.shape_of(labels):
    raise ValueError(
        f"{fn}: `hidden` {_checks.shape_of(hidden)} and `labels` {_checks.shape_of(labels)} "
        "disagree on [B, T]; hidden[:, t] must score labels[:, t]."
    )
  if not callable(unembed):
    raise TypeError(f"{fn}: `unembed` must be a callable hidden [..., D] -> logits [..., V], "
                    f"got {type(unembed).__name__}.")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"{fn}: `chunk_size` must be a positive int, got {chunk_size!r}.")

  hidden = jnp.asarray(hidden)
  labels = jnp.asarray(labels)
  batch, length, dim = hidden.shape
  chunk = min(chunk_size, length) if length > 0 else 1
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))
  # [B, n*C, ...] -> [n, B, C, ...]: scan over chunks.
  hidden_c = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
  labels_c = labels.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def body_stats(h, lab):
    return _chunk_stats(unembed, h, lab, return_entropy)

  def body(carry, xs):
    return carry, body_stats(*xs)

  _, (logp, entropy) = jax.lax.scan(body, None, (hidden_c, labels_c))

  def unchunk(x):
    return x.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]

  if not return_entropy:
    return unchunk(logp)
  return unchunk(logp), unchunk(entropy)
