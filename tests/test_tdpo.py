import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from tests import numpy_reference as ref
from tests.conftest import random_mask

B, T, TR, V = 5, 7, 6, 10


def _inputs(rng):
  pol_c = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  pol_r = rng.normal(size=(B, TR, V)).astype(np.float32) * 2
  ref_c = (pol_c + rng.normal(size=pol_c.shape)).astype(np.float32)
  ref_r = (pol_r + rng.normal(size=pol_r.shape)).astype(np.float32)
  lab_c = rng.integers(0, V, size=(B, T)).astype(np.int32)
  lab_r = rng.integers(0, V, size=(B, TR)).astype(np.int32)
  m_c = random_mask(rng, B, T)
  m_r = random_mask(rng, B, TR, min_len=1)
  return pol_c, pol_r, ref_c, ref_r, lab_c, lab_r, m_c, m_r


@pytest.mark.parametrize(
    "variant, beta, alpha, average",
    list(itertools.product(["tdpo1", "tdpo2"], [0.1, 0.5, 2.0], [0.0, 0.5, 1.0], [False, True])),
)
def test_tdpo_matches_numpy(rng, variant, beta, alpha, average):
  args = _inputs(rng)
  losses, out = L.tdpo_loss(*args, beta=beta, alpha=alpha, variant=variant, average_log_prob=average)
  want, cr, rr, kc, kr = ref.tdpo(*args, beta, alpha, variant, average)
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.chosen_rewards, cr, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.rejected_rewards, rr, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.chosen_seq_kl, kc, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.rejected_seq_kl, kr, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.margins, cr - rr, rtol=1e-4, atol=1e-4)
  assert np.all(np.isfinite(losses)) and out.chosen_seq_kl[0] == 0.0  # row 0 fully masked
  assert np.all(out.chosen_seq_kl >= -1e-6)


def test_tdpo_from_stats_equals_from_logits(rng):
  pol_c, pol_r, ref_c, ref_r, lab_c, lab_r, m_c, m_r = _inputs(rng)
  sc = L.tdpo_sequence_stats(pol_c, ref_c, lab_c, m_c)
  sr = L.tdpo_sequence_stats(pol_r, ref_r, lab_r, m_r)
  np.testing.assert_allclose(sc.policy_logps, L.sequence_logprobs(pol_c, lab_c, m_c), rtol=1e-6)
  a, _ = L.tdpo_loss_from_stats(sc, sr, beta=0.2, alpha=0.3)
  b, _ = L.tdpo_loss(pol_c, pol_r, ref_c, ref_r, lab_c, lab_r, m_c, m_r, beta=0.2, alpha=0.3)
  np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_gradients(rng, variant):
  pol_c, pol_r, ref_c, ref_r, lab_c, lab_r, m_c, m_r = map(jnp.asarray, _inputs(rng))
  beta, alpha = 0.5, 0.7

  def total(pc, pr, rc, rr):
    return L.tdpo_loss(pc, pr, rc, rr, lab_c, lab_r, m_c, m_r, beta=beta, alpha=alpha, variant=variant)[0].sum()

  g_pc, g_pr, g_rc, g_rr = jax.grad(total, argnums=(0, 1, 2, 3))(pol_c, pol_r, ref_c, ref_r)
  np.testing.assert_array_equal(g_rc, 0.0)
  np.testing.assert_array_equal(g_rr, 0.0)
  assert np.all(np.isfinite(g_pc)) and np.all(np.isfinite(g_pr))

  # The chosen response's gradient, written out by hand: in TDPO2 its sequential
  # KL is a constant (stop-gradient), in TDPO1 it is live.
  sr = L.tdpo_sequence_stats(pol_r, ref_r, lab_r, m_r)
  kc_const = L.tdpo_sequence_stats(pol_c, ref_c, lab_c, m_c).seq_kl

  def by_hand(pc):
    lr = L.masked_sum(L.token_logprobs(pc, lab_c) - L.token_logprobs(ref_c, lab_c), m_c)
    kc = L.masked_sum(L.token_kl(ref_c, pc), m_c)
    if variant == "tdpo2":
      z = lr - sr.logratio - alpha * (sr.seq_kl - kc_const)
    else:
      z = lr - sr.logratio - (sr.seq_kl - kc)
    return -jax.nn.log_sigmoid(beta * z).sum()

  np.testing.assert_allclose(g_pc, jax.grad(by_hand)(pol_c), rtol=1e-4, atol=1e-6)
  # Padded positions get no gradient.
  assert np.all(np.asarray(g_pc)[~np.asarray(m_c)] == 0.0)


def test_tdpo2_stop_gradient_changes_chosen_grad(rng):
  args = list(map(jnp.asarray, _inputs(rng)))
  def g(variant, alpha):
    f = lambda pc: L.tdpo_loss(pc, *args[1:], beta=0.5, alpha=alpha, variant=variant)[0].sum()
    return jax.grad(f)(args[0])
  # alpha=1 makes TDPO1 and TDPO2 equal in value but not in gradient.
  v1 = L.tdpo_loss(*args, beta=0.5, alpha=1.0, variant="tdpo1")[0]
  v2 = L.tdpo_loss(*args, beta=0.5, alpha=1.0, variant="tdpo2")[0]
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  assert not np.allclose(g("tdpo1", 1.0), g("tdpo2", 1.0))


def test_jit_parity(rng):
  args = _inputs(rng)
  f = lambda *a: L.tdpo_loss(*a, beta=0.3, alpha=0.5)
  for e, j in zip(jax.tree.leaves(f(*args)), jax.tree.leaves(jax.jit(f)(*args))):
    np.testing.assert_allclose(e, j, rtol=1e-5, atol=1e-6)


def test_errors(rng):
  args = list(_inputs(rng))
  with pytest.raises(ValueError, match="unknown `variant` 'tdpo3'"):
    L.tdpo_loss(*args, variant="tdpo3")
  with pytest.raises(ValueError, match="beta"):
    L.tdpo_loss(*args, beta=0.0)
  with pytest.raises(ValueError, match="alpha"):
    L.tdpo_loss(*args, alpha=-0.5)
  bad = list(args); bad[2] = bad[2][:, :, :-1]
  with pytest.raises(ValueError, match="share one shape"):
    L.tdpo_loss(*bad)
  bad = list(args); bad[6] = bad[6][:, :-1]
  with pytest.raises(ValueError, match="chosen|mask"):
    L.tdpo_loss(*bad)
  bad = list(args); bad[1] = bad[1][:-1]; bad[3] = bad[3][:-1]; bad[5] = bad[5][:-1]; bad[7] = bad[7][:-1]
  with pytest.raises(ValueError, match="share one shape"):
    L.tdpo_loss(*bad)
