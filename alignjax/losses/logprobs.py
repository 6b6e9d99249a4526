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

from typing import Any, Callable, NamedTuple, Optional, Sequence

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


class TokenStats(NamedTuple):
  """Per-position statistics ``[B, T]`` float32 of :func:`chunked_token_stats` (None: not asked for).

  Attributes:
    logprobs: ``log pi(labels)``.
    reference_logprobs: ``log pi_ref(labels)`` (stop-gradient).
    kl: ``KL(pi_ref || pi)`` over the vocabulary at each position (the TDPO
      direction; gradients flow to ``pi`` only).
    entropy: entropy of ``pi`` in nats.
  """
  logprobs: Array
  reference_logprobs: Optional[Array] = None
  kl: Optional[Array] = None
  entropy: Optional[Array] = None


def chunked_scan(fn: Callable, arrays: Sequence[Array], *, chunk_size: int, needed: Optional[Array] = None):
  """``fn`` over chunks of positions of ``[N, T, ...]`` arrays, in a ``lax.scan`` under ``jax.checkpoint``.

  The ONE chunking loop of alignjax: ``T`` is cut into ``K = ceil(T / C)``
  chunks of ``C = min(chunk_size, T)`` positions (the last zero-padded);
  ``fn(*chunks)`` sees ``[N, C, ...]`` slices and whatever it builds inside
  (``[N, C, V]`` logits) lives only there: the backward pass recomputes it
  chunk by chunk. Returns ``fn``'s outputs stacked over chunks (leaves
  ``[K, ...]``); :func:`chunked_map` unstacks per-position outputs.

  ``needed`` (``[N, T]`` bool, e.g. the response mask): only those positions matter. The
  chunks then start at the first position any row needs (a traced offset, so no recompile
  per batch; the arrays are zero-padded past ``T``), and a chunk no row needs anything from
  is not run (``lax.cond`` inside the checkpoint): its outputs are zeros. Positions before
  the first needed one are in no chunk. For ``fn`` whose outputs are sums over the chunk's
  positions that unneeded positions add nothing to (masked sums), the chunks' total is the
  same as without ``needed``.
  """
  return _chunks(fn, arrays, chunk_size, needed)[0]


def _chunks(fn: Callable, arrays: Sequence[Array], chunk_size: int, needed) -> tuple[Any, Any]:
  """:func:`chunked_scan`'s outputs ``[K, ...]`` and the first chunk's start (0 without ``needed``)."""
  arrays = [jnp.asarray(a) for a in arrays]
  n, length = arrays[0].shape[:2]
  chunk = max(1, min(chunk_size, length))
  k = -(-length // chunk) if length else 1
  if needed is None:
    pad = k * chunk - length

    def chunks(x):
      if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
      return x.reshape((n, k, chunk) + x.shape[2:]).swapaxes(0, 1)

    body = jax.checkpoint(fn)
    _, out = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None, tuple(chunks(a) for a in arrays))
    return out, 0

  needed = jnp.asarray(needed, bool)
  if needed.shape != (n, length):
    raise ValueError(f"chunked_scan: `needed` must be [N, T] = {(n, length)} like the arrays, got {needed.shape}.")
  first = jnp.argmax(jnp.any(needed, axis=0))   # 0 when nothing is needed (every chunk is then skipped)

  def pad(x):   # room for k whole chunks from any start in [0, T)
    return jnp.pad(x, ((0, 0), (0, k * chunk)) + ((0, 0),) * (x.ndim - 2))

  padded, needed = [pad(a) for a in arrays], pad(needed)
  shapes = jax.eval_shape(fn, *(jax.ShapeDtypeStruct((n, chunk) + a.shape[2:], a.dtype) for a in arrays))

  @jax.checkpoint   # outside the cond: the backward pass keeps only each chunk's inputs
  def body(used, *xs):
    return jax.lax.cond(used, lambda xs: fn(*xs),
                        lambda xs: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), xs)

  def step(carry, i):
    start = first + i * chunk
    xs = tuple(jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=1) for a in padded)
    used = jnp.any(jax.lax.dynamic_slice_in_dim(needed, start, chunk, axis=1))
    return carry, body(used, *xs)

  _, out = jax.lax.scan(step, None, jnp.arange(k))
  return out, first


def chunked_map(fn: Callable, arrays: Sequence[Array], *, chunk_size: int, needed: Optional[Array] = None):
  """:func:`chunked_scan` of a per-position ``fn`` (outputs ``[N, C, ...]``), unstacked to ``[N, T, ...]``.

  ``needed``: the positions whose outputs are used, chunked as in :func:`chunked_scan`;
  outputs before the first needed position and in skipped chunks are 0, the other unneeded
  positions hold ``fn``'s outputs. With prompts before responses this computes the
  unembedding and softmax of the response positions only (as TRL's ``use_logits_to_keep``):
  half the vocabulary work at equal prompt and response lengths.
  """
  n, length = jnp.shape(arrays[0])[:2]
  out, first = _chunks(fn, arrays, chunk_size, needed)

  def place(x):   # [K, N, C, ...] -> [N, T, ...], chunk j at positions first + j*C ...
    if x is None:
      return None
    k, _, c = x.shape[:3]
    x = x.swapaxes(0, 1).reshape((n, k * c) + x.shape[3:])
    if needed is None:
      return x[:, :length]
    full = jnp.zeros((n, length + k * c) + x.shape[2:], x.dtype)
    return jax.lax.dynamic_update_slice_in_dim(full, x, first, axis=1)[:, :length]
  return jax.tree.map(place, out)


def chunked_token_stats(hidden, labels, unembed, *, chunk_size: int, reference_hidden=None,
                        reference_unembed=None, return_entropy: bool = False, needed=None) -> TokenStats:
  """Label log-probs (and a frozen model's log-probs, per-token KL, entropy), chunked over T.

  Equivalent to computing full float32 logits ``unembed(hidden)`` (and
  ``reference_unembed(reference_hidden)``) and reducing them per position, but
  never holding ``[B, T, V]``: see :func:`chunked_scan`. With a reference, the
  per-token ``KL(pi_ref || pi)`` is TDPO's sequential-KL term (Zeng et al.
  2024, "Token-level Direct Preference Optimization", arXiv:2404.11999, Eq. 6);
  the reference side is stop-gradient.

  Args:
    hidden: ``[B, T, D]`` final-normed hidden states; ``hidden[:, t]`` scores ``labels[:, t]``.
    labels: ``[B, T]`` integer ids (negative ids are scored as id 0; mask them downstream).
    unembed: ``[..., C, D] -> [..., C, V]`` logits (e.g. ``model.unembed``).
    chunk_size: positions per chunk (> 0).
    reference_hidden, reference_unembed: the frozen model's, or None.
    return_entropy: also the entropy of ``pi``.
    needed: optional ``[B, T]`` bool, the positions whose statistics are used (e.g. the
      response mask); the others may be returned as 0 (see :func:`chunked_map`).

  Returns:
    :class:`TokenStats` of ``[B, T]`` float32 arrays.
  """
  fn = "chunked_token_stats"
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
  with_ref = reference_hidden is not None
  if with_ref and not callable(reference_unembed):
    raise TypeError(f"{fn}: `reference_unembed` must be a callable when `reference_hidden` is given.")

  def stats(h, lab, *ref):
    safe = jnp.where(lab < 0, 0, lab)[..., None]
    logits = _f32(unembed(h))
    if not ref:  # label log-prob without a normalised [B, C, V] array
      lse = jax.nn.logsumexp(logits, axis=-1)
      out = {"logprobs": jnp.take_along_axis(logits, safe, axis=-1)[..., 0] - lse}
      if return_entropy:
        out["entropy"] = lse - jnp.sum(jnp.exp(logits - lse[..., None]) * logits, axis=-1)
      return out
    logp = jax.nn.log_softmax(logits, axis=-1)
    out = {"logprobs": jnp.take_along_axis(logp, safe, axis=-1)[..., 0]}
    if return_entropy:
      out["entropy"] = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if ref:
      logq = jax.lax.stop_gradient(jax.nn.log_softmax(_f32(reference_unembed(ref[0])), axis=-1))
      out["reference_logprobs"] = jnp.take_along_axis(logq, safe, axis=-1)[..., 0]
      out["kl"] = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    return out

  arrays = [hidden, labels] + ([reference_hidden] if with_ref else [])
  return TokenStats(**chunked_map(stats, arrays, chunk_size=chunk_size, needed=needed))


def chunked_token_logprobs(
    hidden, labels, unembed, *, chunk_size: int, return_entropy: bool = False, needed=None
):
  """Per-token label log-probs computed chunk by chunk over T, never holding ``[B, T, V]``.

  Equivalent to ``token_logprobs(unembed(hidden), labels)`` (and
  ``token_entropy(unembed(hidden))``), but the sequence is cut into chunks of
  ``chunk_size`` positions; each chunk's logits are formed, reduced to one
  number per position and dropped inside a ``lax.scan`` whose body is wrapped
  in ``jax.checkpoint`` (:func:`chunked_scan`). Neither the forward nor the
  backward pass then holds more than ``[B, chunk_size, V]`` logits at once.
  Math is float32 whatever the compute dtype of ``unembed``.

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
    needed: optional ``[B, T]`` bool, the positions whose log-probs are used (e.g. the
      response mask); the others may be returned as 0 (see :func:`chunked_map`).

  Returns:
    ``logprobs [B, T]`` float32, or ``(logprobs, entropy)`` with both ``[B, T]``
    float32 when ``return_entropy``.
  """
  try:
    out = chunked_token_stats(hidden, labels, unembed, chunk_size=chunk_size, return_entropy=return_entropy,
                              needed=needed)
  except (TypeError, ValueError) as e:
    raise type(e)(str(e).replace("chunked_token_stats", "chunked_token_logprobs")) from None
  return (out.logprobs, out.entropy) if return_entropy else out.logprobs
