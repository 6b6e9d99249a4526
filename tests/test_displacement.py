"""CHES scores against a NumPy loop with the authors' indexing (ches/ches.py), and gradient entanglement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L

B, D = 4, 5


def _authors_layout(rng, T, resp_lens):
  """Full (prompt + response) hidden states, left-padded so every response ends at T - 1,
  and the index of each row's last prompt token, as the authors' compute_ches_scores takes."""
  hidden = rng.normal(size=(B, T, D))
  last_prompt = np.array([T - 1 - n for n in resp_lens])
  return hidden, last_prompt


def _np_ches_authors(h_pos, h_neg, last_pos, last_neg, length_normalize):
  """Loop over the positions the authors keep: last prompt token .. second-to-last token."""
  out = np.zeros(B)
  for b in range(B):
    keep_p = range(last_pos[b], h_pos.shape[1] - 1)
    keep_n = range(last_neg[b], h_neg.shape[1] - 1)
    sp = sum((h_pos[b, t] for t in keep_p), np.zeros(D))
    sn = sum((h_neg[b, t] for t in keep_n), np.zeros(D))
    if length_normalize:
      n_p, n_n = len(keep_p), len(keep_n)
      out[b] = float(sp @ sn) / (n_p * n_n) - float(sp @ sp) / n_p ** 2
    else:
      out[b] = float(sp @ sn) - float(sp @ sp)
  return out


def _label_aligned(hidden, last_prompt):
  """This library's layout: hidden[:, :-1] with the token response mask shifted like labels."""
  T = hidden.shape[1]
  token_mask = np.arange(T)[None, :] > last_prompt[:, None]  # response tokens
  return hidden[:, :-1].astype(np.float32), token_mask[:, 1:]


@pytest.mark.parametrize("length_normalize", [False, True])
def test_ches_matches_authors_indexing(rng, length_normalize):
  h_pos, last_pos = _authors_layout(rng, 9, [3, 5, 1, 7])
  h_neg, last_neg = _authors_layout(rng, 11, [6, 2, 4, 9])
  want = _np_ches_authors(h_pos, h_neg, last_pos, last_neg, length_normalize)
  hp, mp = _label_aligned(h_pos, last_pos)
  hn, mn = _label_aligned(h_neg, last_neg)
  got = L.ches_scores(hp, hn, mp, mn, length_normalize=length_normalize)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_ches_right_padding_and_empty_row(rng):
  # Right padding beyond the mask changes nothing; identical responses give CHES = 0.
  h = rng.normal(size=(B, 6, D)).astype(np.float32)
  m = np.zeros((B, 6), bool); m[:, 1:4] = True
  m[3] = False  # a row with no response tokens
  pad_h = np.concatenate([h, rng.normal(size=(B, 3, D)).astype(np.float32)], axis=1)
  pad_m = np.concatenate([m, np.zeros((B, 3), bool)], axis=1)
  for ln in (False, True):
    same = L.ches_scores(h, h, m, m, length_normalize=ln)
    np.testing.assert_allclose(same, 0.0, atol=1e-5)
    other = rng.normal(size=(B, 6, D)).astype(np.float32)
    a = L.ches_scores(h, other, m, m, length_normalize=ln)
    b = L.ches_scores(pad_h, other, pad_m, m, length_normalize=ln)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(a)) and float(a[3]) == 0.0
  # bf16 inputs are summed in float32.
  got = L.ches_scores(jnp.asarray(h, jnp.bfloat16), jnp.asarray(h, jnp.bfloat16), m, m)
  assert got.dtype == jnp.float32


def test_ches_gradient(rng):
  hp = rng.normal(size=(B, 4, D)).astype(np.float32)
  hn = rng.normal(size=(B, 5, D)).astype(np.float32)
  mp = rng.random((B, 4)) < 0.7
  mn = rng.random((B, 5)) < 0.7
  g_p, g_n = jax.grad(lambda a, b: L.ches_scores(a, b, mp, mn).sum(), argnums=(0, 1))(hp, hn)
  sp = (hp * mp[..., None]).astype(np.float64).sum(1)
  sn = (hn * mn[..., None]).astype(np.float64).sum(1)
  # d/dh+_t = m+_t (S- - 2 S+), d/dh-_t = m-_t S+
  np.testing.assert_allclose(g_p, mp[..., None] * (sn - 2 * sp)[:, None, :], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_n, mn[..., None] * sp[:, None, :], rtol=1e-5, atol=1e-5)


def test_gradient_entanglement(rng):
  gc = {"w": rng.normal(size=(B, 3, 2)), "b": rng.normal(size=(B, 2))}
  gr = {"w": rng.normal(size=(B, 3, 2)), "b": rng.normal(size=(B, 2))}
  gr["w"][2], gr["b"][2] = 0.0, 0.0  # zero gradient: cosine defined as 0
  out = L.gradient_entanglement(gc, gr)
  flat = lambda g, i: np.concatenate([g["b"][i].ravel(), g["w"][i].ravel()])
  for i in range(B):
    x, y = flat(gc, i), flat(gr, i)
    np.testing.assert_allclose(out.inner_product[i], x @ y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.chosen_norm[i], np.linalg.norm(x), rtol=1e-5)
    cos = 0.0 if np.linalg.norm(y) == 0 else x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    np.testing.assert_allclose(out.cosine[i], cos, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="gradient_entanglement: `chosen_grads` and `rejected_grads`"):
    L.gradient_entanglement(gc, {"w": gr["w"]})
  with pytest.raises(ValueError, match="leaf 0 has shapes"):
    L.gradient_entanglement(gc, {"b": gr["b"][:, :1], "w": gr["w"]})


def test_errors(rng):
  h = rng.normal(size=(B, 4, D)).astype(np.float32)
  m = np.ones((B, 4), bool)
  with pytest.raises(ValueError, match="ches_scores: `chosen_hidden` must have rank 3"):
    L.ches_scores(h[0], h, m[0], m)
  with pytest.raises(ValueError, match="share the batch and hidden sizes"):
    L.ches_scores(h, h[..., :-1], m, m)
  with pytest.raises(ValueError, match="`rejected_mask` has shape"):
    L.ches_scores(h, h, m, m[:, :-1])
