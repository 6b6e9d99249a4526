"""Sampling processors and DFA helpers against independent references.

References: transformers' ``TemperatureLogitsWarper`` / ``TopKLogitsWarper`` /
``TopPLogitsWarper`` (torch), float64 NumPy for the logit combination, and a direct
Python walk over the trie for the DFA builder.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from alignjax import decoding
from alignjax.decoding import constraints, processors
from transformers.generation import logits_process as hf_lp


def _hf_warp(logits, temperature, top_k, top_p):
  """transformers' warpers, applied in generate's order, on one row."""
  scores = torch.tensor(logits[None], dtype=torch.float32)
  ids = torch.zeros((1, 1), dtype=torch.long)
  scores = hf_lp.TemperatureLogitsWarper(temperature)(ids, scores)
  if top_k:
    scores = hf_lp.TopKLogitsWarper(top_k)(ids, scores)
  if top_p < 1.0:
    scores = hf_lp.TopPLogitsWarper(top_p)(ids, scores)
  return scores[0].numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_temperature_top_k_top_p_match_transformers_warpers(seed):
  rng = np.random.default_rng(seed)
  B, V = 16, 50
  logits = (rng.normal(size=(B, V)) * 2.0).astype(np.float32)
  temperature = rng.choice([0.3, 0.7, 1.0, 1.5], size=B).astype(np.float32)
  top_k = rng.choice([0, 1, 3, 10, 60], size=B).astype(np.int32)
  top_p = rng.choice([1.0, 0.05, 0.5, 0.9], size=B).astype(np.float32)
  got = np.asarray(processors.sampling_logits(jnp.asarray(logits), temperature=temperature,
                                              top_k=top_k, top_p=top_p))
  for b in range(B):
    want = _hf_warp(logits[b], float(temperature[b]), int(top_k[b]), float(top_p[b]))
    np.testing.assert_array_equal(np.isinf(got[b]), np.isinf(want), err_msg=f"row {b}")
    kept = ~np.isinf(want)
    np.testing.assert_allclose(got[b][kept], want[kept], rtol=1e-6)
    assert kept.sum() >= 1


def test_top_k_keeps_ties_like_transformers():
  logits = np.array([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]], np.float32)
  got = np.asarray(processors.top_k_top_p_filter(jnp.asarray(logits), jnp.array([3]), jnp.array([1.0])))
  want = _hf_warp(logits[0], 1.0, 3, 1.0)  # keeps both 2.0s tied with the third
  np.testing.assert_array_equal(np.isinf(got[0]), np.isinf(want))


def test_top_p_never_keeps_fewer_than_one():
  logits = np.array([[5.0, 1.0, 0.0, -1.0]], np.float32)
  got = np.asarray(processors.top_k_top_p_filter(jnp.asarray(logits), jnp.array([0]), jnp.array([1e-6])))
  assert np.isfinite(got[0, 0]) and np.isinf(got[0, 1:]).all()


def test_greedy_rows_are_left_unscaled():
  logits = np.array([[1.0, 2.0, 3.0]], np.float32)
  got = processors.sampling_logits(jnp.asarray(logits), temperature=0.0, top_k=1, top_p=0.1)
  np.testing.assert_array_equal(np.asarray(got), logits)
  # Mixed rows: the greedy row stays unfiltered while the sampled row is filtered.
  two = np.concatenate([logits, logits])
  got = np.asarray(processors.sampling_logits(jnp.asarray(two), temperature=np.array([0.0, 1.0]),
                                              top_k=np.array([1, 1]), top_p=1.0))
  np.testing.assert_array_equal(got[0], logits[0])
  np.testing.assert_array_equal(np.isinf(got[1]), [True, True, False])
  tok, lp = processors.sample_tokens(jax.random.key(0), jnp.asarray(two), temperature=np.array([0.0, 1.0]),
                                     top_k=np.array([1, 1]), top_p=1.0)
  np.testing.assert_array_equal(np.asarray(tok), [2, 2])
  want0 = 3.0 - np.log(np.exp([1.0, 2.0, 3.0]).sum())  # greedy: log_softmax of the logits
  np.testing.assert_allclose(np.asarray(lp), [want0, 0.0], atol=1e-6)


def test_combine_logits_matches_numpy_mixture():
  rng = np.random.default_rng(0)
  z = [rng.normal(size=(3, 7)) for _ in range(3)]
  w = rng.normal(size=(3, 3))
  got = np.asarray(decoding.combine_logits([jnp.asarray(x, jnp.float32) for x in z], jnp.asarray(w)))
  log_softmax = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  want = sum(w[:, m:m + 1] * z[m] for m in range(3))  # raw logits: same softmax up to a row shift
  np.testing.assert_allclose(log_softmax(got.astype(np.float64)), log_softmax(want), atol=1e-5)


def test_dera_and_proxy_tuning_weights():
  a = object()
  mix = decoding.dera(a, a, jnp.array([0.0, 0.25, 2.0]))
  np.testing.assert_allclose(np.asarray(mix.weights), [[0, 1], [0.25, 0.75], [2, -1]])
  mix = decoding.proxy_tuning(a, a, a, 0.5)
  np.testing.assert_allclose(np.asarray(mix.weights), [1, 0.5, -0.5])
  with pytest.raises(ValueError, match="mixture: `weights`"):
    decoding.mixture([a, a], [1.0, 2.0, 3.0])


def test_dfa_from_sequences_accepts_exactly_the_sequences():
  seqs = [[3, 4, 5], [3, 7], [9], [3, 4]]
  dfa = decoding.dfa_from_sequences(seqs, 12)
  table, acc = np.asarray(dfa.transitions), np.asarray(dfa.accepting)

  def accepts(seq):
    s = 0
    for t in seq:
      s = table[s, t]
      if s < 0:
        return False
    return bool(acc[s])

  for s in seqs:
    assert accepts(s)
  for s in ([3], [4], [3, 4, 5, 1], [9, 9], [], [3, 7, 7]):
    assert not accepts(s), s


def test_dfa_allowed_forces_eos_only_in_accepting_states():
  dfa = decoding.dfa_from_sequences([[2, 3]], 6)
  eos = np.zeros(6, bool)
  eos[[0, 5]] = True
  state = jnp.array([0, 1, 2])
  allowed = np.asarray(constraints.dfa_allowed(dfa, state, jnp.asarray(eos)))
  np.testing.assert_array_equal(allowed, [[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]])
  nxt = np.asarray(constraints.dfa_step(dfa, state, jnp.array([2, 3, 0])))
  np.testing.assert_array_equal(nxt, [1, 2, 2])


@pytest.mark.parametrize("kwargs,match", [
    (dict(transitions=np.zeros((2, 3), np.float32)), "integer"),
    (dict(transitions=np.full((2, 3), 5)), "entries"),
    (dict(transitions=np.zeros((2, 3), int), start=4), "`start`"),
    (dict(transitions=np.zeros((2, 3), int), accepting=[7]), "`accepting`"),
    (dict(transitions=np.zeros((3,), int)), "num_states"),
])
def test_token_dfa_bad_input(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    decoding.token_dfa(**kwargs)
