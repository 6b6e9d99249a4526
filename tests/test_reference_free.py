"""SimPO, ORPO and GenARM against float64 NumPy transcriptions and TRL's CPO/ORPO trainers."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from tests import numpy_reference as ref

B = 6


def _avg(rng):
  c = -rng.uniform(0.05, 3.0, size=B)
  r = -rng.uniform(0.05, 3.0, size=B)
  c[0], r[0] = -1e-4, -0.69  # near probability 1 and across the -log 2 switch
  c[1], r[1] = -0.7, -40.0
  return c.astype(np.float32), r.astype(np.float32)


def _np_simpo(c, r, beta, gamma, eps):
  """Eq. (6) of arXiv:2405.14734 with label smoothing; also d loss / d c."""
  losses, grads = np.zeros(len(c)), np.zeros(len(c))
  for i in range(len(c)):
    z = beta * (float(c[i]) - float(r[i])) - gamma
    losses[i] = -(1 - eps) * ref.log_sigmoid(z) - eps * ref.log_sigmoid(-z)
    s = 1.0 / (1.0 + math.exp(-z))
    grads[i] = beta * (-(1 - eps) * (1 - s) + eps * s)
  return losses, grads


def _np_orpo(c, r, nll, beta):
  """Eqs. (4), (6)-(7) of arXiv:2403.07691: log odds = log(p / (1 - p)) with p = exp(avg)."""
  out, lo = np.zeros(len(c)), np.zeros(len(c))
  for i in range(len(c)):
    pc, pr = math.exp(float(c[i])), math.exp(float(r[i]))
    lo[i] = math.log(pc / -math.expm1(float(c[i]))) - math.log(pr / -math.expm1(float(r[i])))
    out[i] = float(nll[i]) - beta * ref.log_sigmoid(lo[i])
  return out, lo


def _fd(f, x, h=1e-6):
  """Central finite differences of sum(f(x)) in float64, one coordinate at a time."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in range(len(x)):
    e = np.zeros_like(x); e[i] = h
    g[i] = (np.sum(f(x + e)) - np.sum(f(x - e))) / (2 * h)
  return g


@pytest.mark.parametrize("beta, gamma, eps", [(2.0, 0.5, 0.0), (10.0, 1.6, 0.0), (2.5, 0.0, 0.2), (1.0, -0.3, 0.5)])
def test_simpo_matches_numpy(rng, beta, gamma, eps):
  c, r = _avg(rng)
  losses, out = L.simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=eps)
  want, dwant = _np_simpo(c, r, beta, gamma, eps)
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.chosen_rewards, beta * c.astype(np.float64), rtol=1e-6)
  np.testing.assert_allclose(out.logits, c.astype(np.float64) - r, rtol=1e-6, atol=1e-6)
  g_c, g_r = jax.grad(lambda a, b: L.simpo_loss(a, b, beta=beta, gamma=gamma, label_smoothing=eps)[0].sum(),
                      argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
  np.testing.assert_allclose(g_c, dwant, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_r, -dwant, rtol=1e-4, atol=1e-6)


def test_simpo_matches_trl_cpo(rng):
  torch = pytest.importorskip("torch")
  cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
  c, r = _avg(rng)
  for beta, gamma, eps in [(2.0, 0.5, 0.0), (2.5, 1.2, 0.1)]:
    # TRL's simpo_gamma is the absolute margin: it computes beta * (delta - simpo_gamma / beta).
    stub = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                                 label_smoothing=eps, accelerator=types.SimpleNamespace(device="cpu"))
    tc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    tr = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    t_losses, t_cr, t_rr = cpo.CPOTrainer.cpo_loss(stub, tc, tr)
    t_losses.sum().backward()
    losses, out = L.simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=eps)
    np.testing.assert_allclose(losses, t_losses.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.chosen_rewards, t_cr.numpy(), rtol=1e-6)
    np.testing.assert_allclose(out.rejected_rewards, t_rr.numpy(), rtol=1e-6)
    g_c, g_r = jax.grad(lambda a, b: L.simpo_loss(a, b, beta=beta, gamma=gamma, label_smoothing=eps)[0].sum(),
                        argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
    np.testing.assert_allclose(g_c, tc.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_r, tr.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_numpy(rng, beta):
  c, r = _avg(rng)
  nll = rng.uniform(0.5, 2.0, size=B).astype(np.float32)
  losses, out = L.orpo_loss(c, r, nll, beta=beta)
  want, lo = _np_orpo(c, r, nll, beta)
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.log_odds_chosen, lo, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.log_odds_ratio, [ref.log_sigmoid(v) for v in lo], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.nll_loss, nll)
  g_c, g_r, g_n = jax.grad(lambda a, b, n: L.orpo_loss(a, b, n, beta=beta)[0].sum(), argnums=(0, 1, 2))(
      jnp.asarray(c), jnp.asarray(r), jnp.asarray(nll))
  np.testing.assert_allclose(g_n, 1.0)
  fd_c = _fd(lambda x: _np_orpo(x, r, nll, beta)[0], c, h=1e-7)
  fd_r = _fd(lambda x: _np_orpo(c, x, nll, beta)[0], r, h=1e-7)
  np.testing.assert_allclose(g_c, fd_c, rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(g_r, fd_r, rtol=2e-3, atol=1e-4)
  assert np.all(np.isfinite(g_c)) and np.all(np.isfinite(g_r))


def test_orpo_matches_trl(rng):
  torch = pytest.importorskip("torch")
  orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
  c, r = _avg(rng)
  beta, nll_batch = 0.25, 1.37  # TRL: one token-mean NLL for the batch
  stub = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
  tc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
  tr = torch.tensor(r, dtype=torch.float64, requires_grad=True)
  t_losses, t_cr, t_rr, t_ratio, t_lo = orpo.ORPOTrainer.odds_ratio_loss(stub, tc, tr)
  trl_loss = nll_batch - t_losses.mean()  # get_batch_loss_metrics
  trl_loss.backward()
  f = lambda a, b: L.orpo_loss(a, b, jnp.full((B,), nll_batch), beta=beta)
  losses, out = f(c, r)
  np.testing.assert_allclose(losses.mean(), float(trl_loss.detach()), rtol=1e-5)
  np.testing.assert_allclose(nll_batch - losses, t_losses.detach().numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.log_odds_ratio.mean(), float(t_ratio.detach()), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.log_odds_chosen.mean(), float(t_lo.detach()), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.chosen_rewards, t_cr.numpy(), rtol=1e-6)
  g_c, g_r = jax.grad(lambda a, b: f(a, b)[0].mean(), argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
  np.testing.assert_allclose(g_c, tc.grad.numpy(), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(g_r, tr.grad.numpy(), rtol=1e-3, atol=1e-6)


def test_log1mexp_accuracy_and_grad():
  x = np.array([-1e-6, -1e-3, -0.5, -0.6931, -0.6932, -2.0, -30.0, -200.0])
  want = np.array([math.log(-math.expm1(v)) for v in x])
  np.testing.assert_allclose(L.log1mexp(x.astype(np.float32)), want, rtol=2e-5, atol=1e-7)
  g = jax.grad(lambda v: L.log1mexp(v).sum())(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(g, -1.0 / np.expm1(-x), rtol=2e-3, atol=1e-6)  # d/dx log(1-e^x)


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_genarm_matches_numpy_and_authors_trainer_identity(rng, beta):
  c = (rng.normal(size=B) * 5 - 30).astype(np.float32)
  r = (rng.normal(size=B) * 5 - 30).astype(np.float32)
  losses, out = L.genarm_loss(c, r, beta=beta)
  want = np.array([-ref.log_sigmoid(beta * (float(c[i]) - float(r[i]))) for i in range(B)])
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.margins, beta * (c.astype(np.float64) - r), rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda a: L.genarm_loss(a, r, beta=beta)[0].sum())(jnp.asarray(c))
  s = np.array([1 / (1 + math.exp(-beta * (float(c[i]) - float(r[i])))) for i in range(B)])
  np.testing.assert_allclose(g, -beta * (1 - s), rtol=1e-4, atol=1e-7)
  # The authors' TRL ARMTrainer with gamma = eps = 0 is the same loss as SimPO on summed logps.
  np.testing.assert_allclose(L.simpo_loss(c, r, beta=beta, gamma=0.0)[0], losses, rtol=1e-6)


def test_errors():
  a = np.zeros(3, np.float32) - 1
  with pytest.raises(ValueError, match="simpo_loss: `beta`"):
    L.simpo_loss(a, a, beta=0.0, gamma=0.5)
  with pytest.raises(ValueError, match="simpo_loss: `label_smoothing`"):
    L.simpo_loss(a, a, beta=2.0, gamma=0.5, label_smoothing=0.7)
  with pytest.raises(ValueError, match="share one shape"):
    L.orpo_loss(a, a, a[:2], beta=0.1)
  with pytest.raises(ValueError, match="genarm_loss: `chosen_logps` must have rank 1"):
    L.genarm_loss(a[None], a[None], beta=0.1)
