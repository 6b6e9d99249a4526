"""The jit-compiled sampler: prefill, a static-shape KV cache and a ``lax.while_loop`` decode.

One XLA program per set of static shapes does everything on device: it left-aligns
the prompts, builds each model's KV cache (``model.init_cache``), prefills it with the
prompt, then runs a ``while_loop`` that feeds the last token of every row, applies the
token masks / DFA constraint / model combination, samples, and writes the token, its
mask and its log-prob into ``[B, N]`` buffers. The loop stops as soon as every row has
emitted an EOS id (or has no allowed token left), so short answers cost short loops.

Everything that is a number -- temperature, top-k, top-p, EOS ids, the pad id, the
token masks, DFA tables and combination weights -- is an argument of the program, so
changing it never recompiles. Static are only the shapes, ``max_new_tokens``, the
cache length, whether the program is greedy, which optional inputs are present, and
the models' structure (their ``nnx.GraphDef``). The program is compiled once per such
key and reused (``jax.jit``'s cache); the caches are created inside the program, so
their buffers are updated in place and never leave the device.

On CPU, for two rows or more, the decode loop reads the linear layers' weights and
the unembedding from transposed copies made once per program, after the prefill
(:func:`alignjax.models.transformer.out_major`): XLA's CPU GEMM packs the whole
weight at every product of a few rows, while a product of ``[out, in]`` weights
streams them (bench/decoding.py prints both rates).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from alignjax.decoding import combine as combine_lib
from alignjax.decoding import constraints as constraints_lib
from alignjax.decoding import processors
from alignjax.models import transformer as transformer_lib

# On CPU the decode loop reads the models' linear weights and unembedding from transposed copies
# made once per program (`transformer.out_major`), held beside the originals while it runs:
# only for models of at most this many bytes of state together, at least 2 rows (one row
# is a matrix-vector product, fast either way) and at least OUT_MAJOR_MIN_TOKENS new
# tokens (on bench/decoding.py's 100M model at B=8 the transposes cost what ~8 steps save:
# 39 instead of 68 ms per step, ~0.25 s once).
OUT_MAJOR_MAX_BYTES = 4 << 30
OUT_MAJOR_MIN_TOKENS = 16


class GenerateOutput(NamedTuple):
  """What :func:`generate` returns (``B`` rows, ``N = max_new_tokens`` columns).

  Attributes:
    tokens: int32 ``[B, N]``; ``pad_token_id`` after a row's EOS (and after the loop stopped).
    mask: bool ``[B, N]``; True up to and including the EOS.
    logprobs: float32 ``[B, N]``; log-prob of each token under the distribution sampled
      from (after temperature, top-k, top-p and masks); for greedy rows ``log_softmax`` of
      the (combined) logits after the token masks; 0 where ``mask`` is False.
    model_logprobs: float32 ``[B, N]`` or None; with ``return_model_logprobs=True``, the
      log-prob of each token under the unmodified model (``log_softmax`` of the raw logits;
      of the combined logits for a :class:`~alignjax.decoding.LogitMixture`); 0 where
      ``mask`` is False.
  """
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  model_logprobs: Optional[jax.Array] = None
  selector_output: Optional[Any] = None


class TokenSelector(NamedTuple):
  """A token-selection rule that replaces the sampler's own draw at every step.

  Decoding methods that choose tokens by more than the next-token logits (ARGS's
  reward-guided search, ASAp's grammar-aligned reweighting; see
  :mod:`alignjax.decoding.reward_guided` and :mod:`alignjax.decoding.grammar_aligned`)
  plug into :func:`generate` through this hook and keep its prefill, caches, masks,
  EOS handling and ``while_loop``.

  Attributes:
    rule: a hashable object (part of the compile key: use a frozen dataclass) with
      ``init(modules, params, tokens, mask, *, cache_len, max_new_tokens) -> carry``,
      called once on the left-aligned prompts ``[B, T]``;
      ``select(modules, params, carry, logits, allowed, *, step, rng, done) ->
      (tokens [B] int32, logprobs [B] float32, carry)``, called at every step with the
      (combined) model logits ``[B, V]`` float32, the allowed tokens ``[B, V]`` bool
      (token masks and DFA), this step's key and the rows already stopped ``[B]``;
      ``finish(carry) -> pytree``, returned as ``GenerateOutput.selector_output``.
    modules: nnx modules the rule runs (split like the model: their parameters are traced).
    params: a pytree of arrays the rule reads (traced: new values never recompile).
  """
  rule: Any
  modules: tuple = ()
  params: Any = None


def generate(model, prompt_tokens, prompt_mask, *, max_new_tokens: int, temperature=0.0,
             top_k=0, top_p=1.0, eos_token_ids=(), pad_token_id: int = 0, rng=None,
             allowed_tokens=None, constraint: Optional[constraints_lib.TokenDFA] = None,
             return_model_logprobs: bool = False, cache_len: Optional[int] = None,
             mesh=None, selector: Optional[TokenSelector] = None) -> GenerateOutput:
  """Sample up to ``max_new_tokens`` tokens per prompt row, in one compiled program.

  Args:
    model: an ``alignjax.models`` model (``init_cache``, ``__call__(..., cache=)``,
      ``unembed``), or a :class:`~alignjax.decoding.LogitMixture` of several (DeRa,
      proxy tuning: see :mod:`alignjax.decoding.combine`), each with its own cache.
    prompt_tokens: int ``[B, T]`` prompts; padding anywhere (left padding is usual) --
      the program left-aligns the real tokens of each row, keeping their order.
    prompt_mask: ``[B, T]`` bool or 0/1, True on real prompt tokens; every row needs one.
    max_new_tokens: ``N > 0``, the number of columns of the output.
    temperature: scalar or ``[B]``; 0 is greedy, else the logits are divided by it.
    top_k: scalar or ``[B]``; keep the ``k`` most likely tokens (0 = off), after temperature.
    top_p: scalar or ``[B]`` in (0, 1]; nucleus filtering after top-k (1 = off), keeping
      the smallest set of most likely tokens whose probability reaches ``top_p``, never
      fewer than one (as transformers' ``TopPLogitsWarper``).
    eos_token_ids: int or sequence of ints; a row stops after emitting any of them
      (``()``: no EOS). EOS ids are tokens like any other for ``allowed_tokens``.
    pad_token_id: the token written after a row's EOS.
    rng: a ``jax.random`` key for sampling (default ``jax.random.key(0)``); unused by greedy.
    allowed_tokens: None or bool/0-1 ``[V]`` / ``[B, V]``; only allowed tokens are emitted.
    constraint: a :class:`~alignjax.decoding.TokenDFA`; tokens outside its transitions are
      masked at every step and EOS is allowed only in accepting states. A row with no
      allowed token left stops (its remaining tokens are padding).
    return_model_logprobs: also return ``model_logprobs`` (see :class:`GenerateOutput`).
    cache_len: the KV cache length (default ``T + max_new_tokens``); must be at least that.
    mesh: optional ``jax.sharding.Mesh`` (axes ``data``, ``fsdp``, ``tensor``); the prompt
      batch is placed with ``alignjax.sharding.batch_sharding(mesh)``. Shard the model's
      parameters beforehand (``from_hf(..., mesh=)`` or ``sharding.shard_model``).
    selector: a :class:`TokenSelector` that chooses every token in place of the
      sampler's greedy/temperature/top-k/top-p draw (which are then unused).

  Returns:
    :class:`GenerateOutput` with ``tokens``, ``mask``, ``logprobs`` (and ``model_logprobs``).

  Greedy is argmax; sampling follows transformers' order (token masks, temperature,
  top-k, top-p); see :mod:`alignjax.decoding.processors`.
  """
  fn = "generate"
  if isinstance(model, combine_lib.LogitMixture):
    models, weights = tuple(model.models), _host(model.weights, np.float32)
  else:
    models, weights = (model,), None
  for m in models:
    for attr in ("init_cache", "unembed"):
      if not callable(getattr(m, attr, None)):
        raise TypeError(f"{fn}: `model` must be an alignjax.models model with `{attr}` "
                        f"(or a LogitMixture of them), got {type(m).__name__}.")

  # --- shapes and static arguments -------------------------------------------------
  if not hasattr(prompt_tokens, "shape"):
    prompt_tokens = np.asarray(prompt_tokens)
  if not hasattr(prompt_mask, "shape"):
    prompt_mask = np.asarray(prompt_mask)
  if len(prompt_tokens.shape) != 2:
    raise ValueError(f"{fn}: `prompt_tokens` must be [B, T], got shape {tuple(prompt_tokens.shape)}.")
  B, T = prompt_tokens.shape
  if B < 1 or T < 1:
    raise ValueError(f"{fn}: `prompt_tokens` must be non-empty [B, T], got shape {(B, T)}.")
  if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise TypeError(f"{fn}: `prompt_tokens` must be integer token ids, got dtype {prompt_tokens.dtype}.")
  if tuple(prompt_mask.shape) != (B, T):
    raise ValueError(f"{fn}: `prompt_mask` shape {tuple(prompt_mask.shape)} must match "
                     f"`prompt_tokens` shape {(B, T)}.")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
    raise TypeError(f"{fn}: `max_new_tokens` must be an int, got {max_new_tokens!r}.")
  N = int(max_new_tokens)
  if N <= 0:
    raise ValueError(f"{fn}: `max_new_tokens` must be > 0, got {N}.")
  S = T + N if cache_len is None else int(cache_len)
  if S < T + N:
    raise ValueError(f"{fn}: prompt length {T} + max_new_tokens {N} = {T + N} exceeds "
                     f"`cache_len` {S}.")
  vocab = _vocab_size(models)

  # --- values (checked when concrete) ----------------------------------------------
  mask_np = _concrete(prompt_mask)
  if mask_np is not None:
    if not (mask_np.dtype == bool or np.all((mask_np == 0) | (mask_np == 1))):
      raise ValueError(f"{fn}: `prompt_mask` must be bool or 0/1.")
    empty = np.flatnonzero(~mask_np.astype(bool).any(-1))
    if empty.size:
      raise ValueError(f"{fn}: `prompt_mask` row {int(empty[0])} has no prompt token "
                       f"(every row needs at least one).")
    longest = int(mask_np.astype(bool).sum(-1).max())
    for m in models:
      max_pos = _max_positions(m)
      if max_pos is not None and longest + N > max_pos:
        raise ValueError(f"{fn}: prompt length {longest} + max_new_tokens {N} exceeds the model's "
                         f"maximum sequence length {max_pos}.")
  tok_np = _concrete(prompt_tokens)
  if tok_np is not None and vocab is not None:
    real = tok_np[mask_np.astype(bool)] if mask_np is not None else tok_np
    if real.size and (real.min() < 0 or real.max() >= vocab):
      raise ValueError(f"{fn}: `prompt_tokens` must be in [0, {vocab}), got range "
                       f"[{real.min()}, {real.max()}].")

  temperature = _per_row(fn, "temperature", temperature, B, jnp.float32)
  top_k = _per_row(fn, "top_k", top_k, B, jnp.int32)
  top_p = _per_row(fn, "top_p", top_p, B, jnp.float32)
  t_np, k_np, p_np = _concrete(temperature), _concrete(top_k), _concrete(top_p)
  if t_np is not None and (not np.all(np.isfinite(t_np)) or np.any(t_np < 0)):
    raise ValueError(f"{fn}: `temperature` must be finite and >= 0 (0 = greedy), got {t_np}.")
  if k_np is not None and np.any(k_np < 0):
    raise ValueError(f"{fn}: `top_k` must be >= 0 (0 = off), got {k_np}.")
  if p_np is not None and np.any(~((p_np > 0) & (p_np <= 1))):
    raise ValueError(f"{fn}: `top_p` must be in (0, 1] (1 = off), got {p_np}.")
  greedy = t_np is not None and bool(np.all(t_np == 0))
  if selector is not None:
    if not isinstance(selector, TokenSelector):
      raise TypeError(f"{fn}: `selector` must be a TokenSelector or None, got "
                      f"{type(selector).__name__}.")
    greedy = True  # one program: the selector draws the tokens
    sel_splits = [nnx.split(m) for m in selector.modules]
    sel = (selector.rule, tuple(g for g, _ in sel_splits))
    sel_args = (tuple(s for _, s in sel_splits), selector.params)
  else:
    sel, sel_args = None, (None, None)

  eos = np.atleast_1d(np.asarray(eos_token_ids if eos_token_ids is not None else (), dtype=np.int64))
  if eos.ndim != 1:
    raise ValueError(f"{fn}: `eos_token_ids` must be an int or a sequence of ints, got {eos_token_ids!r}.")
  if vocab is not None and eos.size and (eos.min() < 0 or eos.max() >= vocab):
    raise ValueError(f"{fn}: `eos_token_ids` must be in [0, {vocab}), got {eos.tolist()}.")
  if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)):
    raise TypeError(f"{fn}: `pad_token_id` must be an int, got {pad_token_id!r}.")
  if vocab is not None and not 0 <= pad_token_id < vocab:
    raise ValueError(f"{fn}: `pad_token_id` must be in [0, {vocab}), got {pad_token_id}.")

  if allowed_tokens is not None:
    allowed_tokens = _host(allowed_tokens)
    if allowed_tokens.ndim not in (1, 2) or (vocab is not None and allowed_tokens.shape[-1] != vocab) or (
        allowed_tokens.ndim == 2 and allowed_tokens.shape[0] != B):
      raise ValueError(f"{fn}: `allowed_tokens` must be [V] or [B, V] = [{B}, {vocab}], got shape "
                       f"{tuple(allowed_tokens.shape)}.")
    allowed_np = _concrete(allowed_tokens)
    if allowed_np is not None and not np.all(np.asarray(allowed_np, bool).reshape(-1, allowed_np.shape[-1]).any(-1)):
      raise ValueError(f"{fn}: `allowed_tokens` allows no token in some row.")
    allowed_tokens = _broadcast(allowed_tokens.astype(bool), (B, allowed_tokens.shape[-1]))

  if constraint is not None:
    if not isinstance(constraint, constraints_lib.TokenDFA):
      raise TypeError(f"{fn}: `constraint` must be a TokenDFA (see decoding.token_dfa), got "
                      f"{type(constraint).__name__}.")
    if vocab is not None and constraint.transitions.shape[-1] != vocab:
      raise ValueError(f"{fn}: `constraint.transitions` must be [num_states, {vocab}], got shape "
                       f"{tuple(constraint.transitions.shape)}.")
    start = _host(constraint.start, np.int32)
    if start.ndim > 1 or (start.ndim == 1 and start.shape[0] != B):
      raise ValueError(f"{fn}: `constraint.start` must be a scalar or [{B}], got shape {tuple(start.shape)}.")
    constraint = constraints_lib.TokenDFA(_host(constraint.transitions, np.int32), _broadcast(start, (B,)),
                                          _host(constraint.accepting, bool))

  if weights is not None:
    if weights.ndim not in (1, 2) or weights.shape[-1] != len(models) or (weights.ndim == 2 and weights.shape[0] != B):
      raise ValueError(f"{fn}: mixture `weights` must be [{len(models)}] or [{B}, {len(models)}], "
                       f"got shape {tuple(weights.shape)}.")
    weights = _broadcast(weights, (B, len(models)))

  if rng is None:
    rng = jax.random.key(0)

  tokens = _host(prompt_tokens, np.int32)
  mask = _host(prompt_mask, bool)
  if mesh is not None:
    from alignjax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
    bs = sharding_lib.batch_sharding(mesh)
    tokens, mask = jax.device_put(tokens, bs), jax.device_put(mask, bs)

  graphdefs, states = [], []
  for m in models:
    g, s = nnx.split(m)
    graphdefs.append(g)
    states.append(s)
  out = _program(tuple(graphdefs), tuple(states), tokens, mask, temperature, top_k, top_p,
                 eos.astype(np.int32), np.int32(pad_token_id), rng,
                 allowed_tokens, constraint, weights,
                 max_new_tokens=N, cache_len=S, greedy=greedy,
                 return_model_logprobs=bool(return_model_logprobs), mesh=mesh,
                 selector=sel, selector_args=sel_args, out_major=_out_major(states, mesh, B, N))
  return GenerateOutput(*out)


def _out_major(states, mesh, batch: int, new_tokens: int) -> bool:
  """Whether the decode loop runs on transposed weights (unsharded CPU models; see ``OUT_MAJOR_MAX_BYTES``)."""
  leaves = [x for x in jax.tree.leaves(states) if isinstance(x, (jax.Array, jax.core.Tracer))]
  if mesh is not None or not leaves or batch < 2 or new_tokens < OUT_MAJOR_MIN_TOKENS:
    return False
  concrete = [x for x in leaves if not isinstance(x, jax.core.Tracer)]  # inside a user's jit: the default backend
  platforms = {d.platform for x in concrete for d in x.devices()} or {jax.default_backend()}
  nbytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)  # key arrays (LoRA dropout) too
  return platforms == {"cpu"} and nbytes <= OUT_MAJOR_MAX_BYTES


@functools.partial(jax.jit, static_argnames=("graphdefs", "max_new_tokens", "cache_len", "greedy",
                                               "return_model_logprobs", "mesh", "selector", "out_major"))
def _program(graphdefs, states, tokens, mask, temperature, top_k, top_p, eos_ids, pad_id, rng,
             allowed, dfa, weights, *, max_new_tokens, cache_len, greedy, return_model_logprobs,
             mesh=None, selector=None, selector_args=(None, None), out_major=False):
  """The whole generation as one XLA program (see the module docstring)."""
  models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
  if selector is not None:
    rule, sel_params = selector[0], selector_args[1]
    sel_modules = [nnx.merge(g, s) for g, s in zip(selector[1], selector_args[0])]
  B, T = tokens.shape
  N = max_new_tokens

  # Left-align every row: real tokens to the end, in their order (a stable sort).
  order = jnp.argsort(mask.astype(jnp.int32), axis=-1, stable=True)
  tokens = jnp.take_along_axis(tokens, order, axis=-1)
  mask = jnp.take_along_axis(mask, order, axis=-1)

  V = None
  caches, logits_list = [], []
  for m in models:
    cache = _constrain_cache(m.init_cache(B, cache_len), mesh)
    hidden, cache = m(tokens, attention_mask=mask, cache=cache, return_hidden=True)
    z = m.unembed(hidden[:, -1])
    caches.append(cache)
    logits_list.append(z)
    V = z.shape[-1]
  eos_onehot = jnp.zeros((V,), bool).at[eos_ids].set(True) if eos_ids.shape[0] else jnp.zeros((V,), bool)
  if out_major:  # the decode steps' products of B rows stream the weights (see transformer.out_major)
    for m in models:
      transformer_lib.out_major(m)

  def choose(logits_list, step, done, dfa_state, sel_carry=None):
    if weights is None:
      z = logits_list[0].astype(jnp.float32)
    else:
      z = combine_lib.combine_logits(logits_list, weights)
    allowed_t = jnp.ones(z.shape, bool) if allowed is None else allowed
    if dfa is not None:
      allowed_t = allowed_t & constraints_lib.dfa_allowed(dfa, dfa_state, eos_onehot)
    masked = jnp.where(allowed_t, z, processors.NEG_INF) if (allowed is not None or dfa is not None) else z
    if selector is not None:
      tok, lp, sel_carry = rule.select(sel_modules, sel_params, sel_carry, z, allowed_t, step=step,
                                       rng=jax.random.fold_in(rng, step), done=done)
    elif greedy:
      tok, lp = processors.greedy_tokens(masked)
    else:
      tok, lp = processors.sample_tokens(jax.random.fold_in(rng, step), masked,
                                         temperature=temperature, top_k=top_k, top_p=top_p)
    any_allowed = jnp.any(allowed_t, axis=-1)
    emit = ~done & any_allowed
    is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
    new_done = done | ~any_allowed | (emit & is_eos)
    out_tok = jnp.where(emit, tok, pad_id)
    out_lp = jnp.where(emit, lp, 0.0)
    if return_model_logprobs:
      mlp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tok[:, None], axis=-1)[:, 0]
      mlp = jnp.where(emit, mlp, 0.0)
    else:
      mlp = None
    if dfa is not None:
      dfa_state = jnp.where(emit, constraints_lib.dfa_step(dfa, dfa_state, tok), dfa_state)
    return out_tok, emit, out_lp, mlp, new_done, (dfa_state, sel_carry)

  def write(buffers, step, tok, emit, lp, mlp):
    out = [lax.dynamic_update_slice(buffers[0], tok[:, None], (0, step)),
           lax.dynamic_update_slice(buffers[1], emit[:, None], (0, step)),
           lax.dynamic_update_slice(buffers[2], lp[:, None], (0, step))]
    if mlp is not None:
      out.append(lax.dynamic_update_slice(buffers[3], mlp[:, None], (0, step)))
    return tuple(out)

  buffers = (jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), bool), jnp.zeros((B, N), jnp.float32))
  if return_model_logprobs:
    buffers = buffers + (jnp.zeros((B, N), jnp.float32),)
  done = jnp.zeros((B,), bool)
  dfa_state = dfa.start if dfa is not None else jnp.zeros((B,), jnp.int32)
  sel_carry = None
  if selector is not None:
    sel_carry = rule.init(sel_modules, sel_params, tokens, mask, cache_len=cache_len, max_new_tokens=N)
  tok, emit, lp, mlp, done, dfa_state = choose(logits_list, 0, done, dfa_state, sel_carry)
  buffers = write(buffers, 0, tok, emit, lp, mlp)

  def cond(carry):
    step, _, _, done, _, _ = carry
    return (step < N) & ~jnp.all(done)

  def body(carry):
    step, caches, last, done, (dfa_state, sel_carry), buffers = carry
    new_caches, logits_list = [], []
    ones = jnp.ones((B, 1), bool)
    for m, cache in zip(models, caches):
      hidden, cache = m(last[:, None], attention_mask=ones, cache=cache, return_hidden=True)
      logits_list.append(m.unembed(hidden[:, 0]))
      new_caches.append(cache)
    tok, emit, lp, mlp, done, dfa_state = choose(logits_list, step, done, dfa_state, sel_carry)
    buffers = write(buffers, step, tok, emit, lp, mlp)
    return step + 1, tuple(new_caches), tok, done, dfa_state, buffers

  carry = (jnp.asarray(1, jnp.int32), tuple(caches), tok, done, dfa_state, buffers)
  carry = lax.while_loop(cond, body, carry)
  buffers = carry[-1]
  buffers = buffers if return_model_logprobs else buffers + (None,)
  return buffers + ((rule.finish(carry[-2][1]),) if selector is not None else (None,))


def _constrain_cache(cache, mesh):
  """Shard the cache over ``mesh``: keys [B, Hkv, Dh, S] (batch, kv_heads, head_dim, -), values [B, Hkv, S, Dh]
  (a scanned model's stacked leaves: layers first), positions and valid [B, S] (batch, -)."""
  if mesh is None:
    return cache
  from alignjax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

  def constrain(*names):
    def fn(x):
      axes = (("layers",) if x.ndim == len(names) + 1 else ()) + names
      spec = sharding_lib.logical_to_spec(axes, shape=x.shape, mesh=mesh)
      return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
    return fn
  return cache._replace(k=jax.tree.map(constrain("batch", "kv_heads", "head_dim", None), cache.k),
                        v=jax.tree.map(constrain("batch", "kv_heads", None, "head_dim"), cache.v),
                        positions=constrain("batch", None)(cache.positions),
                        valid=constrain("batch", None)(cache.valid))


def _per_row(fn: str, name: str, value: Any, B: int, dtype):
  """``value`` (scalar or [B]) broadcast to [B]: NumPy when concrete, so nothing compiles."""
  arr = value if isinstance(value, jax.core.Tracer) else np.asarray(value)
  if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != B):
    raise ValueError(f"{fn}: `{name}` must be a scalar or [{B}] (one per row), got shape {tuple(arr.shape)}.")
  if dtype == jnp.int32 and not jnp.issubdtype(arr.dtype, jnp.integer):
    raise TypeError(f"{fn}: `{name}` must be an integer, got {value!r}.")
  if isinstance(arr, np.ndarray):
    return np.broadcast_to(arr.astype(dtype), (B,))
  return jnp.broadcast_to(arr.astype(dtype), (B,))


def _host(x, dtype=None):
  """NumPy copy of a concrete array (host-side preprocessing compiles nothing); tracers pass through."""
  if isinstance(x, jax.core.Tracer):
    return x if dtype is None else x.astype(dtype)
  if isinstance(x, jax.Array) and (dtype is None or x.dtype == np.dtype(dtype)):
    return x  # already on device (maybe sharded): no copy
  x = np.asarray(x)
  return x if dtype is None else x.astype(dtype)


def _broadcast(x, shape):
  return jnp.broadcast_to(x, shape) if isinstance(x, jax.core.Tracer) else np.broadcast_to(x, shape)


def _concrete(x) -> Optional[np.ndarray]:
  """``x`` as a NumPy array, or None if it is a tracer (inside a user's jit)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _vocab_size(models) -> Optional[int]:
  sizes = set()
  for m in models:
    v = getattr(getattr(m, "config", None), "vocab_size", None)
    if isinstance(v, (int, np.integer)):
      sizes.add(int(v))
  if len(sizes) > 1:
    raise ValueError(f"generate: all combined models must share one vocabulary, got vocab sizes {sorted(sizes)}.")
  return sizes.pop() if sizes else None


def _max_positions(model) -> Optional[int]:
  """The hard position limit of models with learned position embeddings (GPT-2), else None."""
  cfg = getattr(model, "config", None)
  if not getattr(cfg, "learned_positions", False):
    return None
  v = getattr(cfg, "max_position_embeddings", None)
  return int(v) if isinstance(v, (int, np.integer)) and v > 0 else None
