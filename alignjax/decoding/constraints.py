"""Token-level finite-state constraints for decoding.

A constraint is a deterministic finite automaton over token ids: a transition table
``transitions [S, V]`` int32 (``-1`` = token forbidden in that state), a start state
(one for all rows, or one per row), and the accepting states ``accepting [S]`` bool.
Inside the decode loop each row carries its state; at every step only tokens with a
transition are allowed, and the EOS ids are allowed exactly in accepting states (the
table's entries for EOS ids are ignored). After a row emits a token the row moves to
``transitions[state, token]``. So every finished row (one that emitted EOS) has spelled
a word of the DFA's language; a row cut off by ``max_new_tokens`` holds a prefix of one.

This is the token-level form of the regular-language constraints of Willard & Louf
2023, "Efficient Guided Generation for Large Language Models" (arXiv:2307.09702,
Sec. 3): a character-level regex compiled against a tokenizer yields such a table.
The arrays are traced, so swapping one DFA for another of the same shape never
recompiles the sampler.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class TokenDFA(NamedTuple):
  """A token-level DFA (a pytree of arrays; see the module docstring).

  Attributes:
    transitions: int32 ``[S, V]``; next state, or ``-1`` where the token is forbidden.
    start: int32 scalar or ``[B]``: the start state (per row).
    accepting: bool ``[S]``: states in which a row may emit EOS (and stop).
  """
  transitions: jax.Array
  start: jax.Array
  accepting: jax.Array


def token_dfa(transitions, start=0, accepting=None) -> TokenDFA:
  """Validated :class:`TokenDFA` from a table ``[S, V]``, a start state and accepting states.

  ``accepting`` is a bool mask ``[S]`` or a sequence of accepting state ids.
  """
  table = np.asarray(transitions)
  if table.ndim != 2 or table.shape[0] < 1:
    raise ValueError(f"token_dfa: `transitions` must be [num_states, vocab_size], got shape {table.shape}.")
  if not np.issubdtype(table.dtype, np.integer):
    raise TypeError(f"token_dfa: `transitions` must hold integer state ids, got dtype {table.dtype}.")
  S = table.shape[0]
  if table.min() < -1 or table.max() >= S:
    raise ValueError(f"token_dfa: `transitions` entries must be -1 or a state id in [0, {S}), "
                     f"got range [{table.min()}, {table.max()}].")
  start_arr = np.asarray(start)
  if not np.issubdtype(start_arr.dtype, np.integer) or start_arr.ndim > 1:
    raise ValueError(f"token_dfa: `start` must be an integer state id or [B] ids, got {start!r}.")
  if start_arr.size and (start_arr.min() < 0 or start_arr.max() >= S):
    raise ValueError(f"token_dfa: `start` must be in [0, {S}), got {start!r}.")
  if accepting is None:
    acc = np.zeros((S,), bool)
  else:
    acc_in = np.asarray(accepting)
    if acc_in.dtype == bool:
      if acc_in.shape != (S,):
        raise ValueError(f"token_dfa: bool `accepting` must have shape ({S},), got {acc_in.shape}.")
      acc = acc_in
    else:
      ids = acc_in.reshape(-1).astype(np.int64)
      if ids.size and (ids.min() < 0 or ids.max() >= S):
        raise ValueError(f"token_dfa: `accepting` state ids must be in [0, {S}), got {accepting!r}.")
      acc = np.zeros((S,), bool)
      acc[ids] = True
  return TokenDFA(table.astype(np.int32), start_arr.astype(np.int32), acc.astype(bool))


def dfa_from_sequences(sequences: Sequence[Sequence[int]], vocab_size: int, *,
                       num_states: int | None = None) -> TokenDFA:
  """A DFA accepting exactly the given token sequences (a trie; the start state is 0).

  ``num_states`` pads the table with unreachable states to a fixed size, so DFAs for
  different sets share one compiled sampler.

  With EOS ids passed to :func:`~alignjax.decoding.generate`, every row that stops
  has emitted one of ``sequences`` (then EOS).
  """
  if not sequences:
    raise ValueError("dfa_from_sequences: `sequences` must hold at least one token sequence.")
  children: list[dict[int, int]] = [{}]
  accepting = [False]
  for seq in sequences:
    state = 0
    for tok in seq:
      tok = int(tok)
      if not 0 <= tok < vocab_size:
        raise ValueError(f"dfa_from_sequences: token {tok} is outside [0, {vocab_size}).")
      if tok not in children[state]:
        children.append({})
        accepting.append(False)
        children[state][tok] = len(children) - 1
      state = children[state][tok]
    accepting[state] = True
  S = len(children) if num_states is None else int(num_states)
  if S < len(children):
    raise ValueError(f"dfa_from_sequences: `num_states` {num_states} is below the {len(children)} states needed.")
  accepting += [False] * (S - len(children))
  table = np.full((S, vocab_size), -1, np.int32)
  for s, ch in enumerate(children):
    for tok, nxt in ch.items():
      table[s, tok] = nxt
  return token_dfa(table, 0, np.asarray(accepting))


def dfa_allowed(dfa: TokenDFA, state: jax.Array, eos_onehot: jax.Array) -> jax.Array:
  """Allowed tokens ``[B, V]`` for rows in DFA ``state [B]``; EOS only in accepting states."""
  row = dfa.transitions[state]  # [B, V]
  allowed = row >= 0
  return jnp.where(eos_onehot[None, :], dfa.accepting[state][:, None], allowed)


def dfa_step(dfa: TokenDFA, state: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next state ``[B]`` after emitting ``tokens [B]`` (a forbidden token keeps the state)."""
  nxt = jnp.take_along_axis(dfa.transitions[state], tokens[:, None], axis=-1)[:, 0]
  return jnp.where(nxt >= 0, nxt, state)
