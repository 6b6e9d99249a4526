"""Decoding guided by a reward model: ARGS (reward-guided search) and best-of-N.

Both run on the one compiled sampler (:func:`alignjax.decoding.generate`): best-of-N
samples ``n`` completions per prompt with it and scores them; ARGS plugs a
:class:`~alignjax.decoding.sampler.TokenSelector` into its loop, so the prefill, the
policy's KV cache, token masks, DFA constraints, model mixtures and EOS handling are the
sampler's own.

* ARGS -- Khanov, Burapacheep & Li 2024, "ARGS: Alignment as Reward-Guided Search"
  (ICLR 2024, arXiv:2402.01694), Eq. 1 and Alg. 1: at every step the policy's top-k
  tokens ``v`` are scored ``s(v) = z_v + w · r([x, y_<t, v])``, with ``z`` the policy's
  next-token logits and ``r`` a reward model on the prompt, the tokens generated so far
  and the candidate; greedy takes ``argmax s``, stochastic sampling draws from
  ``softmax(s / temperature)``. (Logits and log-probs differ by a per-row constant, so
  both give the same choice and the same sampling distribution.) As the authors' ``ARGS.generate_step``
  (github.com/deeplearning-wisc/args, ``argsearch.py``): raw logits (not log-probs),
  top-k over the raw logits, and the reward model keeps its own KV cache with ``k``
  candidate rows per prompt (after each step the chosen candidate's row is copied to
  all ``k``).
* Best-of-N (rejection sampling) -- e.g. Nakano et al. 2021, "WebGPT"
  (arXiv:2112.09332, Sec. 3.2), Stiennon et al. 2020 (arXiv:2009.01325): draw ``n``
  samples, return the one the reward model scores highest.
* GenARM -- Xu et al. 2024, "GenARM: Reward Guided Generation with Autoregressive
  Reward Model for Test-Time Alignment" (arXiv:2410.08193): a model combination, see
  :func:`genarm`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from alignjax.decoding import combine as combine_lib
from alignjax.decoding import processors
from alignjax.decoding import sampler as sampler_lib


class ArgsOutput(NamedTuple):
  """What :func:`args_generate` returns (``B`` rows, ``N = max_new_tokens`` steps, ``k`` candidates).

  Attributes:
    tokens: int32 ``[B, N]``; ``pad_token_id`` after a row's EOS.
    mask: bool ``[B, N]``; True up to and including the EOS.
    logprobs: float32 ``[B, N]``: greedy -- ``log_softmax`` of the policy's (masked)
      logits at the chosen token, as :func:`~alignjax.decoding.generate`'s greedy rows;
      sampling -- the log-prob under ``softmax(s / temperature)`` over the k candidates.
      0 where ``mask`` is False.
    candidate_tokens: int32 ``[B, N, k]``: the policy's top-k tokens at every step.
    candidate_logits: float32 ``[B, N, k]``: their raw policy logits ``z_v`` (-inf if masked).
    candidate_rewards: float32 ``[B, N, k]``: ``r([x, y_<t, v])`` for each candidate.
    Candidates are meaningful where ``mask`` is True.
  """
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  candidate_tokens: jax.Array
  candidate_logits: jax.Array
  candidate_rewards: jax.Array


class BestOfNOutput(NamedTuple):
  """What :func:`best_of_n` returns (``B`` prompts, ``n`` samples, ``N = max_new_tokens``).

  Attributes:
    tokens: int32 ``[B, N]``: the best completion of each prompt.
    mask: bool ``[B, N]``: its mask (True up to and including EOS).
    logprobs: float32 ``[B, N]``: its tokens' log-probs under the sampling distribution.
    scores: float32 ``[B, n]``: the score of every sample.
    index: int32 ``[B]``: which sample is returned (the first of ties).
    samples: :class:`~alignjax.decoding.GenerateOutput` with all ``B * n`` samples
      (row ``b * n + j`` is sample ``j`` of prompt ``b``).
  """
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  scores: jax.Array
  index: jax.Array
  samples: Any


# ---------------------------------------------------------------------------- ARGS
def _cache_batch_axis(x) -> int:
  """The batch axis of a KV-cache leaf: k [B,K,Dh,S] / v [B,K,S,Dh], or stacked with L in front."""
  return x.ndim - 4


def _repeat_cache(cache, k: int):
  """Each row of a KVCache repeated ``k`` times (row b -> rows b*k ... b*k+k-1)."""
  rep = lambda x: jnp.repeat(x, k, axis=_cache_batch_axis(x))
  return cache._replace(k=jax.tree.map(rep, cache.k), v=jax.tree.map(rep, cache.v),
                        positions=jnp.repeat(cache.positions, k, axis=0),
                        valid=jnp.repeat(cache.valid, k, axis=0))


def _keep_candidate(cache, slot, choice, k: int):
  """Copy the chosen candidate's k/v at cache ``slot`` into all k rows of its prompt.

  Only the slot written this step differs between a prompt's k rows, so this equals the
  authors' full reorder of the cache (``_reorder_cache(cache, [choice] * k)``).
  """
  def fix(x, slot_axis):  # slot_axis: after the batch axis (keys 3, values 2)
    ax = _cache_batch_axis(x)
    col = lax.dynamic_slice_in_dim(x, slot, 1, axis=ax + slot_axis)  # [..., B*k, K, ...1...]
    lead = col.shape[:ax]
    grouped = col.reshape(lead + (-1, k) + col.shape[ax + 1:])  # [..., B, k, K, ...1...]
    idx = choice.reshape((1,) * ax + (-1, 1) + (1,) * (col.ndim - ax - 1))
    chosen = jnp.take_along_axis(grouped, idx, axis=ax + 1)
    col = jnp.broadcast_to(chosen, grouped.shape).reshape(col.shape)
    return lax.dynamic_update_slice_in_dim(x, col, slot, axis=ax + slot_axis)
  return cache._replace(k=jax.tree.map(lambda x: fix(x, 3), cache.k), v=jax.tree.map(lambda x: fix(x, 2), cache.v))


@dataclasses.dataclass(frozen=True)
class _ArgsRule:
  """ARGS's token choice as a sampler TokenSelector rule (k candidates per row)."""
  k: int

  def init(self, modules, params, tokens, mask, *, cache_len, max_new_tokens):
    del params
    rm = modules[0]
    B = tokens.shape[0]
    cache = rm.init_cache(B, cache_len)
    _, cache = rm(tokens, attention_mask=mask, cache=cache)  # the prompt, once per row
    bufs = (jnp.zeros((B, max_new_tokens, self.k), jnp.int32),
            jnp.zeros((B, max_new_tokens, self.k), jnp.float32),
            jnp.zeros((B, max_new_tokens, self.k), jnp.float32))
    return _repeat_cache(cache, self.k), bufs

  def select(self, modules, params, carry, logits, allowed, *, step, rng, done):
    del done
    rm = modules[0]
    w, temperature = params
    cache, bufs = carry
    B, k = logits.shape[0], self.k
    masked = jnp.where(allowed, logits, processors.NEG_INF)
    cand_logits, cand = lax.top_k(masked, k)  # [B, k]
    slot = cache.length
    rewards, cache = rm(cand.reshape(B * k, 1), attention_mask=jnp.ones((B * k, 1), bool), cache=cache)
    rewards = rewards.reshape(B, k).astype(jnp.float32)
    # Scores: z_v + w * r (the authors' `rewards * weight + prescreen_logits`).
    scores = jnp.where(jnp.isneginf(cand_logits), processors.NEG_INF, cand_logits + w[:, None] * rewards)
    greedy = temperature <= 0
    scaled = scores / jnp.where(greedy, 1.0, temperature)[:, None]
    sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    choice = jnp.where(greedy, jnp.argmax(scores, axis=-1).astype(jnp.int32), sampled)
    tok = jnp.take_along_axis(cand, choice[:, None], axis=-1)[:, 0]
    greedy_lp = (jnp.take_along_axis(masked, tok[:, None], axis=-1)[:, 0]
                 - jax.nn.logsumexp(masked, axis=-1))
    sample_lp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), choice[:, None], axis=-1)[:, 0]
    lp = jnp.where(greedy, greedy_lp, sample_lp)
    cache = _keep_candidate(cache, slot, choice, k)
    bufs = tuple(lax.dynamic_update_slice(b, x[:, None].astype(b.dtype), (0, step, 0))
                 for b, x in zip(bufs, (cand, cand_logits, rewards)))
    return tok, lp, (cache, bufs)

  def finish(self, carry):
    return carry[1]


def args_generate(model, rm, prompt_tokens, prompt_mask, *, max_new_tokens: int, k: int, w,
                  temperature=0.0, eos_token_ids=(), pad_token_id: int = 0, rng=None,
                  allowed_tokens=None, constraint=None, cache_len: Optional[int] = None,
                  mesh=None) -> ArgsOutput:
  """ARGS: reward-guided decoding, one compiled program for all steps.

  Khanov et al. 2024, "ARGS: Alignment as Reward-Guided Search" (arXiv:2402.01694),
  Eq. 1 / Alg. 1: at step t, for the policy's top-``k`` tokens ``v`` (by its raw logits
  ``z``), ``s(v) = z_v + w · r([x, y_<t, v])``; greedy (``temperature == 0``) takes
  ``argmax_v s(v)``, otherwise ``v ~ softmax(s / temperature)`` over the k candidates.
  This follows the authors' ``ARGS.generate_step`` (``argsearch.py``), with two
  differences, both documented choices:

  * Rows stop at EOS (``eos_token_ids``); the authors' loop never stops and always runs
    ``max_new_token`` steps.
  * Each row chooses among its own k candidates; the authors' greedy step takes the
    argmax over the flattened ``[B * k]`` scores (correct only for B = 1, which their
    code assumes).

  The reward model keeps its own KV cache with ``k`` rows per prompt: the prompt is
  prefilled once per row and copied, and each step feeds the k candidates as one token
  each, then copies the chosen candidate's new slot to all k rows. ``k`` is static (one
  program per k); ``w`` and ``temperature`` are traced: changing them never recompiles
  (greedy and sampling are the same program).

  Args:
    model: the policy (an ``alignjax.models`` model or a ``LogitMixture``).
    rm: a :class:`~alignjax.models.RewardModel` (``init_cache``, ``__call__(..., cache=)``)
      over the policy's vocabulary.
    prompt_tokens, prompt_mask: ``[B, T]`` prompts (any padding; see ``generate``).
    max_new_tokens: ``N``, the most tokens per row.
    k: the number of candidates per step, ``1 <= k <= V``.
    w: the reward weight, scalar or ``[B]``; 0 is the policy's greedy decoding.
    temperature: scalar or ``[B]``; 0 is greedy, > 0 samples ``softmax(s / temperature)``.
    eos_token_ids, pad_token_id, allowed_tokens, constraint, cache_len, mesh: as
      :func:`~alignjax.decoding.generate` (masked tokens are never candidates; with a
      mesh, load the policy and ``rm`` with it too).
    rng: a ``jax.random`` key (used when sampling; default ``jax.random.key(0)``).

  Returns:
    :class:`ArgsOutput`.
  """
  fn = "args_generate"
  for attr in ("init_cache", "__call__"):
    if not callable(getattr(rm, attr, None)):
      raise TypeError(f"{fn}: `rm` must be an alignjax RewardModel (with `{attr}`), got "
                      f"{type(rm).__name__}.")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"{fn}: `k` must be an int >= 1 (static), got {k!r}.")
  models_ = model.models if hasattr(model, "models") and hasattr(model, "weights") else (model,)
  vocab = getattr(getattr(models_[0], "config", None), "vocab_size", None)
  rm_vocab = getattr(getattr(rm, "config", None), "vocab_size", None)
  if vocab is not None and rm_vocab is not None and vocab != rm_vocab:
    raise ValueError(f"{fn}: `rm` must share the policy's vocabulary ({vocab} tokens), got {rm_vocab}.")
  if vocab is not None and k > vocab:
    raise ValueError(f"{fn}: `k` must be <= the vocabulary size {vocab}, got {k}.")
  B = np.shape(prompt_tokens)[0] if len(np.shape(prompt_tokens)) == 2 else None
  if B is None:
    raise ValueError(f"{fn}: `prompt_tokens` must be [B, T], got shape {np.shape(prompt_tokens)}.")
  per_row, concrete = sampler_lib._per_row, sampler_lib._concrete  # pylint: disable=protected-access
  w = per_row(fn, "w", w, B, jnp.float32)
  temperature = per_row(fn, "temperature", temperature, B, jnp.float32)
  t_np, w_np = concrete(temperature), concrete(w)
  if t_np is not None and (not np.all(np.isfinite(t_np)) or np.any(t_np < 0)):
    raise ValueError(f"{fn}: `temperature` must be finite and >= 0 (0 = greedy), got {t_np}.")
  if w_np is not None and not np.all(np.isfinite(w_np)):
    raise ValueError(f"{fn}: `w` must be finite, got {w_np}.")
  rm_cfg = getattr(rm, "config", None)
  if getattr(rm_cfg, "learned_positions", False):
    longest = np.shape(prompt_tokens)[1] + int(max_new_tokens)
    if longest > rm_cfg.max_position_embeddings:
      raise ValueError(f"{fn}: prompt length + max_new_tokens = {longest} exceeds the reward model's "
                       f"maximum sequence length {rm_cfg.max_position_embeddings}.")
  selector = sampler_lib.TokenSelector(_ArgsRule(int(k)), (rm,), (w, temperature))
  out = sampler_lib.generate(model, prompt_tokens, prompt_mask, max_new_tokens=max_new_tokens,
                             eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, rng=rng,
                             allowed_tokens=allowed_tokens, constraint=constraint, cache_len=cache_len,
                             selector=selector, mesh=mesh)
  cand, cand_logits, rewards = out.selector_output
  return ArgsOutput(out.tokens, out.mask, out.logprobs, cand, cand_logits, rewards)


# ---------------------------------------------------------------------------- best-of-N
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rm_scores(graphdef, state, tokens, mask):
  return nnx.merge(graphdef, state)(tokens, attention_mask=mask)


def _score(rm, tokens, mask) -> np.ndarray:
  if isinstance(rm, nnx.Module):  # one compiled forward per shape
    graphdef, state = nnx.split(rm)
    return _rm_scores(graphdef, state, tokens, mask)
  return rm(tokens, mask)


@jax.jit
def _with_prompt(prompt, prompt_mask, tokens, mask):
  """Prompt + completion rows ``[R, T+N]`` (the reward model's input)."""
  return (jnp.concatenate([jnp.asarray(prompt, jnp.int32), tokens], axis=1),
          jnp.concatenate([jnp.asarray(prompt_mask, bool), mask], axis=1))


@functools.partial(jax.jit, static_argnames=("n",))
def _best_rows(scores, tokens, mask, logprobs, *, n):
  """The highest-scoring of each prompt's ``n`` rows (the first of ties): tokens, mask, logprobs, scores, index."""
  scores = scores.reshape(-1, n)
  index = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  pick = jnp.arange(scores.shape[0]) * n + index
  return tokens[pick], mask[pick], logprobs[pick], scores, index


def best_of_n(model, rm, prompt_tokens, prompt_mask, *, n: int, max_new_tokens: int,
              temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(), pad_token_id: int = 0,
              rng, allowed_tokens=None, constraint=None, mesh=None) -> BestOfNOutput:
  """Best-of-N sampling: ``n`` samples per prompt, the one with the highest reward.

  Rejection sampling against a reward model as in Nakano et al. 2021, "WebGPT"
  (arXiv:2112.09332, Sec. 3.2) and Stiennon et al. 2020, "Learning to summarize from
  human feedback" (arXiv:2009.01325): for each prompt ``x`` draw ``y_1..y_n ~ π(·|x)``
  with :func:`~alignjax.decoding.generate` (the prompt rows repeated ``n`` times, one
  program), score ``r(x, y_j)`` and return ``argmax_j r(x, y_j)`` (the first of ties).

  Args:
    model: the policy (an ``alignjax.models`` model or a ``LogitMixture``).
    rm: a :class:`~alignjax.models.RewardModel`, or any callable
      ``score(tokens [R, T+N], mask [R, T+N]) -> [R]`` over prompt + completion (the
      prompt as given, padding included, then the completion with ``out.mask``).
    prompt_tokens, prompt_mask: ``[B, T]`` prompts.
    n: samples per prompt (>= 1).
    max_new_tokens, temperature, top_k, top_p, eos_token_ids, pad_token_id,
      allowed_tokens, constraint, mesh: as :func:`~alignjax.decoding.generate` (``[B]``
      values and ``[B, V]`` masks apply to every sample of their prompt; with a mesh the
      ``B * n`` rows are split over its batch axes and scored where they were drawn).
    rng: a ``jax.random`` key.

  Returns:
    :class:`BestOfNOutput` (``tokens [B, N]``, ``scores [B, n]``, ``index [B]``, ...).
  """
  fn = "best_of_n"
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"{fn}: `n` must be an int >= 1, got {n!r}.")
  if not callable(rm):
    raise TypeError(f"{fn}: `rm` must be a RewardModel or a callable (tokens, mask) -> [rows], "
                    f"got {type(rm).__name__}.")
  tokens = np.asarray(prompt_tokens)
  mask = np.asarray(prompt_mask)
  if tokens.ndim != 2:
    raise ValueError(f"{fn}: `prompt_tokens` must be [B, T], got shape {tokens.shape}.")
  if mask.shape != tokens.shape:
    raise ValueError(f"{fn}: `prompt_mask` shape {mask.shape} must match `prompt_tokens` "
                     f"{tokens.shape}.")
  B = tokens.shape[0]

  def rows(x):
    """A scalar, or per-prompt values [B] repeated for the n samples of each prompt."""
    arr = np.asarray(x)
    return np.repeat(arr, n, axis=0) if arr.ndim == 1 else arr

  for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
    if np.ndim(value) > 1 or (np.ndim(value) == 1 and np.shape(value)[0] != B):
      raise ValueError(f"{fn}: `{name}` must be a scalar or [{B}], got shape {np.shape(value)}.")
  if allowed_tokens is not None and np.ndim(allowed_tokens) == 2:
    allowed_tokens = np.repeat(np.asarray(allowed_tokens), n, axis=0)
  if constraint is not None and np.ndim(constraint.start) == 1:
    constraint = constraint._replace(start=np.repeat(np.asarray(constraint.start), n, axis=0))
  rep_tokens = np.repeat(tokens, n, axis=0)
  rep_mask = np.repeat(mask, n, axis=0)
  out = sampler_lib.generate(model, rep_tokens, rep_mask, max_new_tokens=max_new_tokens,
                             temperature=rows(temperature), top_k=rows(top_k), top_p=rows(top_p),
                             eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, rng=rng,
                             allowed_tokens=allowed_tokens, constraint=constraint, mesh=mesh)
  full, full_mask = _with_prompt(rep_tokens, rep_mask, out.tokens, out.mask)
  scores = jnp.asarray(_score(rm, full, full_mask), jnp.float32)
  if scores.shape != (B * n,):
    raise ValueError(f"{fn}: `rm` must return one score per row, [{B * n}], got shape {scores.shape}.")
  return BestOfNOutput(*_best_rows(scores, out.tokens, out.mask, out.logprobs, n=n), out)


# ---------------------------------------------------------------------------- GenARM
def genarm(base, arm, alpha=1.0) -> combine_lib.LogitMixture:
  """GenARM decoding as a model combination: ``softmax((log π_base + α log π_ARM) / T)``.

  Xu et al. 2024, "GenARM: Reward Guided Generation with Autoregressive Reward Model for
  Test-Time Alignment" (arXiv:2410.08193): the autoregressive reward model ``π_ARM``
  (a causal LM trained with :func:`alignjax.losses.genarm_loss`,
  ``-log σ(β (log π_ARM(y_w) - log π_ARM(y_l)))``) guides the frozen base model token
  by token, ``π(y_t | ·) ∝ π_base(y_t | ·) · π_ARM(y_t | ·)^α`` with ``α = 1/β``. As the
  authors' generation scripts (``evaluation/HH/generate_outputs_HH.py``: the
  language-model-arithmetic formula ``M_base + alpha * M_arm`` over each model's
  log-softmax, then ``temperature``), pass the result to
  :func:`~alignjax.decoding.generate` with the temperature ``T`` (their default 0.5;
  they note ``1 / (1 + α)`` as the principled choice), ``top_k=0``, ``top_p=1``.
  ``alpha`` is a scalar or ``[B]``; it is traced (never recompiles).
  """
  xp = jnp if isinstance(alpha, jax.core.Tracer) else np
  alpha = xp.asarray(alpha, xp.float32)
  if alpha.ndim > 1:
    raise ValueError(f"genarm: `alpha` must be a scalar or [B], got shape {alpha.shape}.")
  return combine_lib.mixture((base, arm), xp.stack([xp.ones_like(alpha), alpha], axis=-1))


__all__ = ["ArgsOutput", "BestOfNOutput", "args_generate", "best_of_n", "genarm"]
