"""Grammar-aligned sampling: ASAp over the sampler's DFA constraints.

Park, Wang, Berg-Kirkpatrick, Polikarpova & D'Antoni 2024, "Grammar-Aligned Decoding"
(NeurIPS 2024, arXiv:2405.21047). Masking the tokens a grammar forbids (grammar-
constrained decoding, GCD) samples each token from ``p(v | y_<t)`` renormalised over the
allowed tokens, which distorts the distribution over whole sequences: the target is
``P(y | y ∈ L) ∝ p(y) 1[y ∈ L]``, whose next-token distribution is (Sec. 3, Eq. 2)

    P(v | y_<t, L) ∝ p(v | y_<t) · EFG(y_<t v),   EFG(w) = E_{y ~ p(· | w)} 1[w y ∈ L],

the expected future grammaticality of a prefix. ASAp (Alg. 1, "Adaptive Sampling with
Approximate expected futures") keeps a trie of the prefixes sampled so far and, for each,
an over-approximation of its EFG: a prefix never expanded counts 1; a prefix whose next
token distribution has been seen counts ``Σ_{v allowed} p(v | w) · EFG~(w v)``. Each new
sample draws ``v`` with probability ∝ ``p(v | w) · EFG~(w v)`` over the allowed tokens,
then updates the trie along its path; the estimates only tighten, and repeated sampling
converges to ``P(y | y ∈ L)`` (Sec. 4).

This follows the authors' ``transformers-GAD`` processor
(``GrammarAlignedOracleLogitsProcessor`` and ``oracle_trie.TrieNode``,
github.com/ebmoon/transformers-GAD): the probabilities are the model's unmasked softmax
at temperature 1; a node's estimate is the sum over its allowed children of
``raw_likelihood · success_rate`` (children never expanded count 1, EOS children stay 1),
propagated to the root after each expansion; the adjusted score of an allowed token is
``log p(v) + log EFG~(child)``; one sample at a time, the trie kept across samples of
one prompt.

Here the per-step work stays in the compiled sampler (a
:class:`~alignjax.decoding.sampler.TokenSelector`): the trie is handed to it as a table
``child_row [M, V]`` (the row of each expanded child, -1 otherwise) and
``log_efg [M]``; each row walks the table as it samples and records, per step, the
log-mass of the allowed tokens and the sampled token's log-prob, from which the host
updates the trie. Deferring the update to the end of a sample changes nothing: within a
sample a node's choice depends only on its children's estimates, which that sample only
changes below the node. ``batch_size > 1`` draws several samples from one snapshot of
the trie (faster; not the authors' sequential schedule, the default ``batch_size=1``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alignjax.decoding import constraints as constraints_lib
from alignjax.decoding import processors
from alignjax.decoding import sampler as sampler_lib


@dataclasses.dataclass(frozen=True)
class _AsapRule:
  """ASAp's reweighted draw as a sampler TokenSelector rule; params = (child_row, log_efg)."""

  def init(self, modules, params, tokens, mask, *, cache_len, max_new_tokens):
    del modules, params, mask, cache_len
    B = tokens.shape[0]
    zeros = jnp.zeros((B, max_new_tokens), jnp.float32)
    return jnp.zeros((B,), jnp.int32), zeros, zeros  # every row starts at the root (row 0)

  def select(self, modules, params, carry, logits, allowed, *, step, rng, done):
    del modules, done
    child_row, log_efg = params
    node, mass_buf, lp_buf = carry
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # unmasked, temperature 1
    in_trie = node >= 0
    rows = child_row[jnp.maximum(node, 0)]  # [B, V]
    bias = jnp.where(in_trie[:, None] & (rows >= 0), log_efg[jnp.maximum(rows, 0)], 0.0)
    adjusted = jnp.where(allowed, logp + bias, processors.NEG_INF)
    tok = jax.random.categorical(rng, adjusted, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(adjusted, axis=-1), tok[:, None], axis=-1)[:, 0]
    log_mass = jax.nn.logsumexp(jnp.where(allowed, logp, processors.NEG_INF), axis=-1)
    model_lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    nxt = jnp.where(in_trie, jnp.take_along_axis(rows, tok[:, None], axis=-1)[:, 0], -1)
    mass_buf = lax.dynamic_update_slice(mass_buf, log_mass[:, None], (0, step))
    lp_buf = lax.dynamic_update_slice(lp_buf, model_lp[:, None], (0, step))
    return tok, lp, (nxt, mass_buf, lp_buf)

  def finish(self, carry):
    return carry[1], carry[2]


class _Node:
  __slots__ = ("parent", "p_in", "state", "mass", "value", "children")

  def __init__(self, parent: int, p_in: float, state: int):
    self.parent = parent  # row of the parent (-1 for the root)
    self.p_in = p_in  # p(token into this node | parent's prefix)
    self.state = state  # DFA state after the prefix (-1: no DFA given)
    self.mass = None  # Σ_{v allowed} p(v | prefix); None until expanded
    self.value = 1.0  # the EFG estimate (1 until expanded)
    self.children: dict[int, int] = {}  # token -> row of expanded children


class Trie:
  """The sampled prefixes of one prompt with their EFG estimates (host side, float64).

  Rows are the expanded prefixes (the root is row 0). ``efg(prefix)`` is the estimate of
  the expected future grammaticality of a token prefix (1 if never expanded); at the
  root it estimates P(a sample is grammatical) from above.

  An expanded node's estimate is ``Σ_{expanded children c} p_c EFG~_c`` plus the mass of
  its allowed tokens not expanded yet (EOS included), ``mass - Σ_c p_c``. With the DFA
  (``constraint``, ``eos_token_ids``; ASAp passes them) a node whose allowed tokens are
  all expanded children (EOS not allowed) has no such mass: its estimate is the sum over
  its children alone, as the authors' ``TrieNode`` sums every allowed child. Without the
  DFA the difference ``mass - Σ_c p_c`` of float32 log-probs stays: its rounding, ~1e-7
  of ``mass``, swamps tiny estimates (a grammar of probability 1e-6).
  """

  def __init__(self, vocab_size: int, capacity: int, constraint: Optional[constraints_lib.TokenDFA] = None,
               eos_token_ids: Sequence[int] = ()):
    self.vocab_size = vocab_size
    start = -1
    if constraint is not None:
      self._transitions = np.asarray(constraint.transitions)
      self._accepting = np.asarray(constraint.accepting, bool)
      expandable = self._transitions >= 0
      expandable[:, [e for e in eos_token_ids if 0 <= e < vocab_size]] = False  # EOS ids: accepting states only
      self._num_expandable = expandable.sum(axis=1)
      start = int(np.asarray(constraint.start))
    self.nodes = [_Node(-1, 1.0, start)]
    self.child_row = np.full((capacity, vocab_size), -1, np.int32)
    self.log_efg = np.zeros((capacity,), np.float32)
    self.device_tables = None  # cached device copies, reset when the trie changes

  def __len__(self) -> int:
    return len(self.nodes)

  def find(self, prefix: Sequence[int]) -> Optional[int]:
    row = 0
    for tok in prefix:
      row = self.nodes[row].children.get(int(tok))
      if row is None:
        return None
    return row

  def efg(self, prefix: Sequence[int] = ()) -> float:
    row = self.find(prefix)
    return 1.0 if row is None else self.nodes[row].value

  def _add_child(self, row: int, tok: int, p_in: float) -> int:
    new = len(self.nodes)
    if new >= self.child_row.shape[0]:  # double the capacity (a new program shape)
      self.child_row = np.concatenate([self.child_row, np.full_like(self.child_row, -1)])
      self.log_efg = np.concatenate([self.log_efg, np.zeros_like(self.log_efg)])
    parent = self.nodes[row]
    state = int(self._transitions[parent.state, tok]) if parent.state >= 0 else -1
    self.nodes.append(_Node(row, p_in, state))
    parent.children[tok] = new
    self.child_row[row, tok] = new
    return new

  def _complete(self, node: _Node) -> bool:
    """Every allowed token of the node's prefix has an expanded child (and EOS is not allowed)."""
    return (node.state >= 0 and not self._accepting[node.state]
            and len(node.children) == self._num_expandable[node.state])

  def _refresh(self, row: int):
    """Recompute the estimates of node ``row`` and its ancestors (children before parents)."""
    while row >= 0:
      node = self.nodes[row]
      if node.mass is not None:
        kids = [self.nodes[c] for c in node.children.values()]
        rest = 0.0 if self._complete(node) else max(node.mass - math.fsum(c.p_in for c in kids), 0.0)
        value = rest + math.fsum(c.p_in * c.value for c in kids)
        if value != node.value:
          node.value = value
          self.log_efg[row] = -np.inf if value <= 0 else math.log(value)
          self.device_tables = None
      row = node.parent

  def update(self, tokens, mask, log_mass, model_logprobs, eos_ids):
    """Add one sample's path: its tokens [N], mask [N] and the per-step log-masses and
    model log-probs recorded by the sampler."""
    n_emit = int(np.sum(mask))
    last = int(tokens[n_emit - 1]) if n_emit else None
    # Steps at which the row chose: every emitted token, plus a dead end (no allowed token).
    visited = n_emit + int(n_emit < len(tokens) and (last is None or last not in eos_ids))
    row = 0
    for i in range(visited):
      node = self.nodes[row]
      if node.mass is None:
        node.mass = float(np.exp(np.float64(log_mass[i])))
      if i >= n_emit or i + 1 >= visited:
        break  # a dead end, or the next prefix is never expanded (EOS, or cut off)
      tok = int(tokens[i])
      child = node.children.get(tok)
      if child is None:
        child = self._add_child(row, tok, float(np.exp(np.float64(model_logprobs[i]))))
        self.device_tables = None
      row = child
    self._refresh(row)


class ASAp:
  """Grammar-aligned sampling (ASAp, arXiv:2405.21047, Alg. 1) from ``model`` under a DFA.

  ``ASAp(model, constraint, *, max_new_tokens, eos_token_ids)``; ``.sample(prompt, rng,
  num_samples=1, batch_size=1)`` draws samples of one prompt and updates that prompt's
  trie; ``.trie(prompt)`` is it (``.trie(prompt).efg(prefix)`` the current estimates).
  Over repeated calls the samples' distribution converges to the model's distribution
  conditioned on the language of the DFA (``P(y | y ∈ L)``, sequences ending in EOS),
  where plain masking (``generate(constraint=...)``) keeps its distortion.

  Args:
    model: an ``alignjax.models`` model (or a ``LogitMixture``: the combined logits are
      the distribution aligned to the grammar).
    constraint: a :class:`~alignjax.decoding.TokenDFA` with one start state.
    max_new_tokens: the longest sample; choose it above the longest word of interest
      (a sample cut off before EOS is not a word and teaches the trie nothing about it).
    eos_token_ids: the EOS ids (non-empty): a sample is a word of L followed by EOS.
    pad_token_id: written after EOS.
    capacity: initial number of trie rows in the device table (doubled when full; each
      new size compiles the sampler once more).
  """

  def __init__(self, model, constraint: constraints_lib.TokenDFA, *, max_new_tokens: int,
               eos_token_ids, pad_token_id: int = 0, capacity: int = 64):
    fn = "ASAp"
    if not isinstance(constraint, constraints_lib.TokenDFA):
      raise TypeError(f"{fn}: `constraint` must be a TokenDFA (see decoding.token_dfa), got "
                      f"{type(constraint).__name__}.")
    if np.ndim(constraint.start) != 0:
      raise ValueError(f"{fn}: `constraint.start` must be one start state (a scalar), got shape "
                       f"{np.shape(constraint.start)}.")
    eos = tuple(int(e) for e in np.atleast_1d(np.asarray(eos_token_ids, np.int64)))
    if not eos:
      raise ValueError(f"{fn}: `eos_token_ids` must hold at least one id (samples end with EOS).")
    for name, v in (("max_new_tokens", max_new_tokens), ("capacity", capacity)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{fn}: `{name}` must be an int >= 1, got {v!r}.")
    self.model = model
    self.constraint = constraint
    self.max_new_tokens = int(max_new_tokens)
    self.eos_token_ids = eos
    self.pad_token_id = pad_token_id
    self.capacity = int(capacity)
    self.vocab_size = int(np.shape(constraint.transitions)[1])
    self._tries: dict[tuple, Trie] = {}
    self._calls = 0

  def trie(self, prompt_tokens) -> Trie:
    """The trie of one prompt (``[T]`` token ids), created empty on first use."""
    key = tuple(int(t) for t in np.asarray(prompt_tokens).reshape(-1))
    if key not in self._tries:
      self._tries[key] = Trie(self.vocab_size, self.capacity, self.constraint, self.eos_token_ids)
    return self._tries[key]

  def sample(self, prompt_tokens, rng, *, num_samples: int = 1,
             batch_size: int = 1) -> sampler_lib.GenerateOutput:
    """Draw ``num_samples`` samples of one prompt (``[T]`` or ``[1, T]``), updating its trie.

    Samples are drawn ``batch_size`` at a time from the current trie, then added to it
    in order (``batch_size=1``: the authors' one-at-a-time schedule). Returns a
    :class:`~alignjax.decoding.GenerateOutput` with ``[num_samples, N]`` tokens, mask,
    logprobs (under the reweighted distribution sampled from) and ``model_logprobs``
    (the model's unmasked log-probs of the tokens).
    """
    fn = "ASAp.sample"
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim == 2 and prompt.shape[0] == 1:
      prompt = prompt[0]
    if prompt.ndim != 1 or prompt.shape[0] < 1 or not np.issubdtype(prompt.dtype, np.integer):
      raise ValueError(f"{fn}: `prompt_tokens` must be one prompt of integer ids, [T] or [1, T], got "
                       f"shape {np.shape(prompt_tokens)}.")
    for name, v in (("num_samples", num_samples), ("batch_size", batch_size)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{fn}: `{name}` must be an int >= 1, got {v!r}.")
    trie = self.trie(prompt)
    tokens = np.repeat(prompt[None].astype(np.int32), batch_size, 0)
    mask = np.ones_like(tokens, bool)
    outs = []
    remaining = int(num_samples)
    while remaining > 0:
      if trie.device_tables is None:
        trie.device_tables = (jnp.asarray(trie.child_row), jnp.asarray(trie.log_efg))
      selector = sampler_lib.TokenSelector(_AsapRule(), (), trie.device_tables)
      key = jax.random.fold_in(rng, self._calls)
      self._calls += 1
      out = sampler_lib.generate(self.model, tokens, mask, max_new_tokens=self.max_new_tokens,
                                 eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                 rng=key, constraint=self.constraint, selector=selector)
      log_mass, model_lp = (np.asarray(x) for x in out.selector_output)
      toks, msk, lps = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
      take = min(batch_size, remaining)
      for b in range(take):
        trie.update(toks[b], msk[b], log_mass[b], model_lp[b], self.eos_token_ids)
      outs.append((toks[:take], msk[:take], lps[:take], np.where(msk[:take], model_lp[:take], 0.0)))
      remaining -= take
    cat = [np.concatenate([o[i] for o in outs]) for i in range(4)]
    return sampler_lib.GenerateOutput(*(jax.device_put(x) for x in cat))


__all__ = ["ASAp", "Trie"]
