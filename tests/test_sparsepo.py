"""SparsePO against a float64 NumPy loop of the authors' SparseTrainer loss, and its TDPO1 identity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from tests import numpy_reference as ref
from tests.conftest import random_mask

B, T, TR, V = 4, 5, 6, 7

# One compiled program per test instead of op-by-op dispatch (hyper-parameters traced).
_loss = jax.jit(L.sparsepo_loss)


def _inputs(rng):
  pol_c = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  pol_r = rng.normal(size=(B, TR, V)).astype(np.float32) * 2
  ref_c = (pol_c + rng.normal(size=pol_c.shape)).astype(np.float32)
  ref_r = (pol_r + rng.normal(size=pol_r.shape)).astype(np.float32)
  lab_c = rng.integers(0, V, size=(B, T)).astype(np.int32)
  lab_r = rng.integers(0, V, size=(B, TR)).astype(np.int32)
  m_c = random_mask(rng, B, T)  # row 0: no chosen response tokens
  m_r = random_mask(rng, B, TR, min_len=1)
  return pol_c, pol_r, ref_c, ref_r, lab_c, lab_r, m_c, m_r


def _masks(rng):
  # ReLU outputs like the authors' mask network: non-negative, some exact zeros, some > 1.
  f = lambda shape: np.maximum(rng.normal(0.5, 0.6, size=shape), 0.0).astype(np.float32)
  return (f((B, T)), f((B, TR))), (f((B, T)), f((B, TR)))


def _np_sparsepo(pol_c, pol_r, ref_c, ref_r, lab_c, lab_r, m_c, m_r, um, dm, beta, l1u, l1d):
  """The authors' loss, written as they do: token_kl = sum p_ref (log pi - log pi_ref) (= -KL),
  d = kl_chosen - kl_rejected, loss = -log sigmoid(beta (u - d)) + L1 terms. Also returns
  d loss / d masks."""
  def side(pol, rf, lab, m, u, dmask):
    Bn, Tn, _ = pol.shape
    U, Kneg, rho, kln = np.zeros(Bn), np.zeros(Bn), np.zeros((Bn, Tn)), np.zeros((Bn, Tn))
    for b in range(Bn):
      for t in range(Tn):
        lp, lr = ref.log_softmax(pol[b, t]), ref.log_softmax(rf[b, t])
        rho[b, t] = lp[lab[b, t]] - lr[lab[b, t]]
        kln[b, t] = float(np.sum(np.exp(lr) * (lp - lr)))
        if m[b, t]:
          U[b] += u[b, t] * rho[b, t]
          Kneg[b] += dmask[b, t] * kln[b, t]
    return U, Kneg, rho, kln
  Uc, kc, rho_c, kln_c = side(pol_c, ref_c, lab_c, m_c, um[0], dm[0])
  Ur, kr, rho_r, kln_r = side(pol_r, ref_r, lab_r, m_r, um[1], dm[1])
  u, d = Uc - Ur, kc - kr
  losses = np.array([-ref.log_sigmoid(beta * (u[b] - d[b])) for b in range(B)])
  l1u_sum = np.sum(um[0] * m_c, 1) + np.sum(um[1] * m_r, 1)
  l1d_sum = np.sum(dm[0] * m_c, 1) + np.sum(dm[1] * m_r, 1)
  losses = losses + l1u * l1u_sum + l1d * l1d_sum
  s = np.array([1 / (1 + math.exp(-beta * (u[b] - d[b]))) for b in range(B)])
  k = (-beta * (1 - s))[:, None]  # d(-log sigmoid(beta z)) / dz
  grads = {
      "u_c": (k * rho_c + l1u) * m_c, "u_r": (-k * rho_r + l1u) * m_r,
      "d_c": (-k * kln_c + l1d) * m_c, "d_r": (k * kln_r + l1d) * m_r,
  }
  return losses, beta * (Uc + kc), beta * (Ur + kr), -kc, -kr, grads


@pytest.mark.parametrize("beta, l1u, l1d", [(0.1, 0.0, 0.0), (0.8, 0.01, 0.002), (2.0, 0.0005, 0.0)])
def test_sparsepo_matches_numpy(rng, beta, l1u, l1d):
  args = _inputs(rng)
  um, dm = _masks(rng)
  losses, out = _loss(*args, reward_masks=um, kl_masks=dm, beta=beta, l1_reward=l1u, l1_kl=l1d)
  want, cr, rr, kc, kr, g_want = _np_sparsepo(*args, um, dm, beta, l1u, l1d)
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.chosen_rewards, cr, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.rejected_rewards, rr, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.chosen_masked_kl, kc, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.rejected_masked_kl, kr, rtol=2e-5, atol=2e-5)
  assert np.all(np.isfinite(losses))
  # Gradients into the masks (how a mask network learns) against the NumPy derivative.
  def total(uc, ur, dc, dr):
    return _loss(*args, reward_masks=(uc, ur), kl_masks=(dc, dr), beta=beta,
                 l1_reward=l1u, l1_kl=l1d)[0].sum()
  g = jax.grad(total, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (um[0], um[1], dm[0], dm[1])))
  for got, key in zip(g, ("u_c", "u_r", "d_c", "d_r")):
    np.testing.assert_allclose(got, g_want[key], rtol=1e-4, atol=1e-6)


def test_policy_gradient_finite_differences(rng):
  pol_c, pol_r, ref_c, ref_r, lab_c, lab_r, m_c, m_r = _inputs(rng)
  um, dm = _masks(rng)
  beta = 0.7
  f = lambda pc, pr, rc, rr: _loss(pc, pr, rc, rr, lab_c, lab_r, m_c, m_r, reward_masks=um,
                                   kl_masks=dm, beta=beta)[0].sum()
  g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*map(jnp.asarray, (pol_c, pol_r, ref_c, ref_r)))
  np.testing.assert_array_equal(g[2], 0.0)
  np.testing.assert_array_equal(g[3], 0.0)
  assert np.all(np.asarray(g[0])[~m_c] == 0.0)
  np_loss = lambda pc, pr: _np_sparsepo(pc, pr, ref_c, ref_r, lab_c, lab_r, m_c, m_r, um, dm, beta, 0, 0)[0].sum()
  h = 1e-5
  pc64, pr64 = pol_c.astype(np.float64), pol_r.astype(np.float64)
  for (b, t) in list(zip(*np.nonzero(m_c)))[:3]:
    for v in (int(lab_c[b, t]), (int(lab_c[b, t]) + 1) % V):
      e = np.zeros_like(pc64); e[b, t, v] = h
      fd = (np_loss(pc64 + e, pr64) - np_loss(pc64 - e, pr64)) / (2 * h)
      np.testing.assert_allclose(g[0][b, t, v], fd, rtol=2e-3, atol=2e-5)
  for (b, t) in list(zip(*np.nonzero(m_r)))[:3]:
    v = int(lab_r[b, t])
    e = np.zeros_like(pr64); e[b, t, v] = h
    fd = (np_loss(pc64, pr64 + e) - np_loss(pc64, pr64 - e)) / (2 * h)
    np.testing.assert_allclose(g[1][b, t, v], fd, rtol=2e-3, atol=2e-5)


def test_all_ones_masks_is_tdpo1(rng):
  args = _inputs(rng)
  ones = (np.ones((B, T), np.float32), np.ones((B, TR), np.float32))
  beta = 0.5
  losses, out = _loss(*args, reward_masks=ones, beta=beta)
  # TDPO-style sequence loss in NumPy: rho sums and KL sums, neither stopped.
  want, _, _, kc, kr = ref.tdpo(*args, beta, 1.0, "tdpo1", False)
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.chosen_masked_kl, kc, rtol=2e-5, atol=2e-5)
  # Same gradients as TDPO1 (no stop-gradient on the chosen KL, unlike TDPO2).
  jargs = list(map(jnp.asarray, args))
  g_sp = jax.jit(jax.grad(lambda pc, pr: _loss(pc, pr, *jargs[2:], reward_masks=ones, beta=beta)[0].sum(),
                          argnums=(0, 1)))(jargs[0], jargs[1])
  g_td = jax.jit(jax.grad(lambda pc, pr: L.tdpo_loss(pc, pr, *jargs[2:], beta=beta, variant="tdpo1")[0].sum(),
                          argnums=(0, 1)))(jargs[0], jargs[1])
  np.testing.assert_allclose(g_sp[0], g_td[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_sp[1], g_td[1], rtol=1e-5, atol=1e-7)
  # L1 of all-ones masks counts the response tokens of both sides.
  np.testing.assert_allclose(out.reward_mask_l1, args[6].sum(1) + args[7].sum(1))


def test_kl_masks_default_to_reward_masks(rng):
  args = _inputs(rng)
  um, _ = _masks(rng)
  a, oa = _loss(*args, reward_masks=um, beta=0.3, l1_reward=0.01, l1_kl=0.02)
  b, ob = _loss(*args, reward_masks=um, kl_masks=um, beta=0.3, l1_reward=0.01, l1_kl=0.02)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(oa.kl_mask_l1, ob.reward_mask_l1, rtol=1e-6)


def test_errors(rng):
  args = _inputs(rng)
  um, dm = _masks(rng)
  with pytest.raises(TypeError, match="sparsepo_loss: `reward_masks` must be a pair"):
    L.sparsepo_loss(*args, reward_masks=um[0])
  with pytest.raises(ValueError, match=r"`kl_masks\[1\]` has shape"):
    L.sparsepo_loss(*args, reward_masks=um, kl_masks=(dm[0], dm[1][:, :-1]))
  with pytest.raises(ValueError, match="sparsepo_loss: `l1_kl`"):
    L.sparsepo_loss(*args, reward_masks=um, l1_kl=-1.0)
  with pytest.raises(ValueError, match="sparsepo_loss: `beta`"):
    L.sparsepo_loss(*args, reward_masks=um, beta=0.0)
  bad = list(args); bad[2] = bad[2][:, :, :-1]
  with pytest.raises(ValueError, match="share one shape"):
    L.sparsepo_loss(*bad, reward_masks=um)
