"""Logit processors for sampling: token masks, temperature, top-k, top-p.

Pure functions over ``[B, V]`` logits whose hyper-parameters are arrays (per row),
so they can be traced: changing them never recompiles the sampler. The order and
semantics follow transformers' ``generate`` (logits processors, then the warpers
``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``):

* token masks first (disallowed tokens get ``-inf``), as transformers applies
  ``LogitsProcessor`` s before warpers;
* temperature ``t > 0`` divides the logits; ``t == 0`` means greedy (argmax);
* top-k keeps the ``k`` largest logits and every logit tied with the k-th
  (``k == 0``: off; ``k >= V``: off);
* top-p (nucleus sampling, Holtzman et al. 2019, "The Curious Case of Neural Text
  Degeneration", arXiv:1904.09751, Sec. 3.1) keeps the smallest set of most likely
  tokens whose total probability reaches ``top_p`` (``top_p == 1``: off), computed on
  the distribution left by top-k, and never fewer than one token. Like transformers,
  a token is removed when the probability of it and every less likely token is
  ``<= 1 - top_p``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -jnp.inf


def apply_token_mask(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
  """``logits [B, V]`` with ``-inf`` where ``allowed [B, V]`` (or ``[V]``) is False."""
  if allowed is None:
    return logits
  return jnp.where(allowed.astype(bool), logits, NEG_INF)


def top_k_top_p_filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Top-k then top-p filtering of ``logits [B, V]`` (already temperature-scaled).

  ``top_k`` and ``top_p`` are ``[B]`` (or scalars); filtered entries become ``-inf``.
  One descending sort of the logits serves both filters: the kept set is
  ``{v : logits[v] >= cutoff}`` where ``cutoff`` is the smallest kept sorted logit,
  so ties with the cut-off are kept (as transformers' top-k does).
  """
  B, V = logits.shape
  top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,))
  top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,))
  sorted_logits = -lax.sort(-logits.astype(jnp.float32), dimension=-1)  # descending
  rank = jnp.arange(V, dtype=jnp.int32)[None, :]
  k = jnp.where((top_k <= 0) | (top_k >= V), V, top_k)  # [B]
  in_top_k = rank < k[:, None]
  # Ties with the k-th logit survive top-k: mark them kept too.
  kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
  in_top_k = in_top_k | (sorted_logits >= kth)
  masked_sorted = jnp.where(in_top_k, sorted_logits, NEG_INF)
  probs = jax.nn.softmax(masked_sorted, axis=-1)
  # Probability mass of this token and every less likely one (transformers' ascending
  # cumulative sum), computed as a reverse cumulative sum in descending order.
  tail = jnp.flip(jnp.cumsum(jnp.flip(probs, -1), axis=-1), -1)
  keep_sorted = in_top_k & ~(tail <= (1.0 - top_p)[:, None])
  keep_sorted = keep_sorted.at[:, 0].set(True)  # never fewer than one token
  num_kept = jnp.sum(keep_sorted, axis=-1)  # kept entries are a prefix in sorted order
  cutoff = jnp.take_along_axis(sorted_logits, (num_kept - 1)[:, None], axis=-1)
  return jnp.where(logits >= cutoff, logits, NEG_INF)


def sampling_logits(logits: jax.Array, *, temperature: jax.Array, top_k: jax.Array,
                    top_p: jax.Array) -> jax.Array:
  """Temperature, top-k and top-p applied to ``logits [B, V]``, per row, as in transformers.

  Rows with ``temperature == 0`` are returned unscaled and unfiltered (they are
  decoded greedily by :func:`sample_tokens`). Filtering (a sort over V) is skipped at
  run time when no row uses top-k or top-p.
  """
  B = logits.shape[0]
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
  top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,))
  top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,))
  greedy = temperature <= 0
  scaled = logits.astype(jnp.float32) / jnp.where(greedy, 1.0, temperature)[:, None]
  needs_filter = jnp.any(~greedy & (((top_k > 0) & (top_k < logits.shape[-1])) | (top_p < 1.0)))
  filtered = lax.cond(needs_filter, lambda x: top_k_top_p_filter(x, top_k, top_p), lambda x: x, scaled)
  return jnp.where(greedy[:, None], scaled, filtered)


def sample_tokens(rng: jax.Array, logits: jax.Array, *, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sample one token per row from (masked) ``logits [B, V]``.

  Returns ``(tokens [B] int32, logprobs [B] float32)``, where the log-prob is under the
  distribution actually sampled from (after temperature, top-k and top-p); rows with
  ``temperature == 0`` take the argmax and report ``log_softmax(logits)`` of it.
  """
  B = logits.shape[0]
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
  processed = sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  sampled = jax.random.categorical(rng, processed, axis=-1).astype(jnp.int32)
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  tokens = jnp.where(temperature <= 0, greedy_tok, sampled)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), tokens[:, None], axis=-1)[:, 0]
  return tokens, logprobs


def greedy_tokens(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Argmax of (masked) ``logits [B, V]`` and its ``log_softmax``: ``(tokens [B], logprobs [B])``."""
  logits = logits.astype(jnp.float32)
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  top = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  logprobs = top - jax.nn.logsumexp(logits, axis=-1)
  return tokens, logprobs
