"""Critical-token scores and the authors' token-weighted DPO against float64 NumPy loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from tests import numpy_reference as ref
from tests.conftest import random_mask

B, T, V = 4, 6, 9


def _sig(x):
  return 1.0 / (1.0 + math.exp(-x))


def _token_inputs(rng, T_r=T):
  pc = -rng.uniform(0.1, 4.0, size=(B, T)).astype(np.float32)
  pr = -rng.uniform(0.1, 4.0, size=(B, T_r)).astype(np.float32)
  rc = (pc + rng.normal(size=pc.shape) * 0.5).astype(np.float32)
  rr = (pr + rng.normal(size=pr.shape) * 0.5).astype(np.float32)
  m_c = random_mask(rng, B, T)  # row 0 has no response tokens
  m_r = random_mask(rng, B, T_r)
  w_r = rng.uniform(0.0, 1.0, size=(B, T_r)).astype(np.float32)
  w_c = rng.uniform(0.0, 1.0, size=(B, T)).astype(np.float32)
  return pc, pr, rc, rr, m_c, m_r, w_r, w_c


def _np_cdpo(pc, pr, rc, rr, m_c, m_r, w_r, w_c, beta, eps, pairing):
  """The authors' CDPOTrainer.dpo_loss ("position") or the weighted sequence margin, with
  d loss / d policy log-probs derived by hand."""
  Bn, Tn = pc.shape
  losses = np.zeros(Bn)
  g_c, g_r = np.zeros(pc.shape), np.zeros(pr.shape)
  dl = lambda z: beta * (-(1 - eps) * (1 - _sig(beta * z)) + eps * _sig(beta * z))
  for b in range(Bn):
    c = [float(m_c[b, t]) * (float(pc[b, t]) - float(rc[b, t])) for t in range(Tn)]
    r = [float(m_r[b, t]) * (float(pr[b, t]) - float(rr[b, t])) for t in range(pr.shape[1])]
    wc = [1.0 if w_c is None else float(w_c[b, t]) for t in range(Tn)]
    if pairing == "position":
      for t in range(Tn):
        z = wc[t] * c[t] - float(w_r[b, t]) * r[t]
        losses[b] += (-(1 - eps) * ref.log_sigmoid(beta * z) - eps * ref.log_sigmoid(-beta * z)) / Tn
        g_c[b, t] = dl(z) * wc[t] * m_c[b, t] / Tn
        g_r[b, t] = -dl(z) * float(w_r[b, t]) * m_r[b, t] / Tn
    else:
      z = sum(wc[t] * c[t] for t in range(Tn)) - sum(float(w_r[b, t]) * r[t] for t in range(len(r)))
      losses[b] = -(1 - eps) * ref.log_sigmoid(beta * z) - eps * ref.log_sigmoid(-beta * z)
      g_c[b] = [dl(z) * wc[t] * m_c[b, t] for t in range(Tn)]
      g_r[b] = [-dl(z) * float(w_r[b, t]) * m_r[b, t] for t in range(len(r))]
  return losses, g_c, g_r


def test_critical_token_scores_match_numpy(rng):
  zp = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  zn = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
  p = L.critical_token_scores(zp, zn, labels)
  want = np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      # Log-probs instead of logits: the same contrastive distribution.
      s = 2 * ref.log_softmax(zp[b, t]) - ref.log_softmax(zn[b, t])
      e = np.exp(s - s.max())
      want[b, t] = e[labels[b, t]] / e.sum()
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-7)
  g = jax.grad(lambda a: L.critical_token_scores(a, zn, labels).sum())(jnp.asarray(zp))
  np.testing.assert_array_equal(g, 0.0)  # frozen contrastive models
  with pytest.raises(ValueError, match="critical_token_scores"):
    L.critical_token_scores(zp, zn[:, :-1], labels)


@pytest.mark.parametrize("pairing", ["position", "sequence"])
@pytest.mark.parametrize("beta, eps, use_wc", [(0.1, 0.0, False), (0.5, 0.2, True), (2.0, 0.0, True)])
def test_cdpo_matches_numpy(rng, pairing, beta, eps, use_wc):
  pc, pr, rc, rr, m_c, m_r, w_r, w_c = _token_inputs(rng)
  w_c = w_c if use_wc else None
  f = lambda a, b_, c_, d_: L.cdpo_loss(a, b_, c_, d_, m_c, m_r, rejected_weights=w_r, chosen_weights=w_c,
                                       beta=beta, label_smoothing=eps, pairing=pairing)
  losses, out = f(pc, pr, rc, rr)
  want, g_c_want, g_r_want = _np_cdpo(pc, pr, rc, rr, m_c, m_r, w_r, w_c, beta, eps, pairing)
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)
  # Row 0 has no chosen response tokens; with one empty side the loss is still finite.
  assert np.all(np.isfinite(losses))
  cr = beta * np.array([np.sum(m_c[b] * (pc[b].astype(np.float64) - rc[b])) for b in range(B)])
  np.testing.assert_allclose(out.chosen_rewards, cr, rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda *a: f(*a)[0].sum(), argnums=(0, 1, 2, 3))(*map(jnp.asarray, (pc, pr, rc, rr)))
  np.testing.assert_allclose(grads[0], g_c_want, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grads[1], g_r_want, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)
  assert np.all(np.asarray(grads[0])[~m_c] == 0.0)  # padding gets no gradient


def test_empty_row_is_log2_and_padding_counts_in_position_mean(rng):
  pc, pr, rc, rr, m_c, m_r, w_r, _ = _token_inputs(rng)
  m_c[1] = False; m_r[1] = False
  for pairing in ("position", "sequence"):
    losses, _ = L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r, beta=0.3,
                            label_smoothing=0.1, pairing=pairing)
    np.testing.assert_allclose(losses[1], math.log(2.0), rtol=1e-6)
  # The authors' position mean runs over all T positions: right-padding by k
  # positions rescales the non-constant part by T / (T + k).
  pad = lambda x, v=0: np.concatenate([x, np.full((B, 3), v, x.dtype)], axis=1)
  a, _ = L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r, beta=0.3)
  b, _ = L.cdpo_loss(pad(pc), pad(pr), pad(rc), pad(rr), pad(m_c, False), pad(m_r, False),
                     rejected_weights=pad(w_r), beta=0.3)
  np.testing.assert_allclose(b, (a * T + 3 * math.log(2.0)) / (T + 3), rtol=1e-5)
  s1, _ = L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r, pairing="sequence")
  s2, _ = L.cdpo_loss(pad(pc), pad(pr), pad(rc), pad(rr), pad(m_c, False), pad(m_r, False),
                      rejected_weights=pad(w_r), pairing="sequence")
  np.testing.assert_allclose(s1, s2, rtol=1e-6)


def test_unit_weights_sequence_is_dpo(rng):
  pc, pr, rc, rr, m_c, m_r, _, _ = _token_inputs(rng, T_r=T + 2)
  ones = np.ones_like(pr)
  losses, _ = L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=ones, beta=0.4, pairing="sequence")
  seq = lambda x, m: np.sum(np.where(m, x, 0.0), axis=1)
  want = ref.dpo(seq(pc, m_c), seq(pr, m_r), seq(rc, m_c), seq(rr, m_r), 0.4, 0.0)
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)


def test_scores_feed_rejected_weights_end_to_end(rng):
  zp = rng.normal(size=(B, T, V)).astype(np.float32)
  zn = rng.normal(size=(B, T, V)).astype(np.float32)
  labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
  pc, pr, rc, rr, m_c, m_r, _, _ = _token_inputs(rng)
  w_r = 1.0 - L.critical_token_scores(zp, zn, labels)
  losses, _ = L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r, beta=0.1)
  want, _, _ = _np_cdpo(pc, pr, rc, rr, m_c, m_r, np.asarray(w_r), None, 0.1, 0.0, "position")
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)


def test_errors(rng):
  pc, pr, rc, rr, m_c, m_r, w_r, w_c = _token_inputs(rng, T_r=T + 1)
  with pytest.raises(ValueError, match="pairing='position'.*one length T"):
    L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r)
  with pytest.raises(ValueError, match="unknown `pairing` 'tokens'"):
    L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r, pairing="tokens")
  with pytest.raises(ValueError, match="share one shape"):
    L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r[:, :-1], pairing="sequence")
  with pytest.raises(ValueError, match="share one shape"):
    L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r, chosen_weights=w_c[:, 1:], pairing="sequence")
  with pytest.raises(ValueError, match="cdpo_loss: `label_smoothing`"):
    L.cdpo_loss(pc, pr, rc, rr, m_c, m_r, rejected_weights=w_r, label_smoothing=0.6, pairing="sequence")
  with pytest.raises(ValueError, match="rank 2"):
    L.cdpo_loss(pc[0], pr, rc, rr, m_c, m_r, rejected_weights=w_r, pairing="sequence")
