"""AlignDistil loss (arXiv:2503.02832) against float64 NumPy, torch and finite differences."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from alignjax.losses import aligndistil as AD
from tests import numpy_reference as ref
from tests.conftest import random_mask

B, T, V = 4, 6, 9
MODES = ("aligndistil", "theorem1", "theorem1_contrast", "theorem1_adaptive")
DIAG = ("mean_weight", "expected_reward", "dpo_expected_reward", "seq_kl_dpo", "token_kl_dpo",
        "seq_kl_contrast", "token_kl_contrast", "num_tokens")


def _inputs(rng, b=B, t=T, v=V):
  """Student, DPO and reverse-DPO logits around a shared base; row 0 fully masked."""
  base = rng.normal(size=(b, t, v)) * 2
  student = (base + rng.normal(size=base.shape)).astype(np.float32)
  dpo = (base + 0.8 * rng.normal(size=base.shape)).astype(np.float32)
  contrast = (base + 0.8 * rng.normal(size=base.shape)).astype(np.float32)
  mask = random_mask(rng, b, t)
  return student, dpo, contrast, mask


CASES = list(itertools.product(
    MODES,
    [(0.1, 10.0), (0.5, 2.0), (0.05, 15.0)],    # (beta, beta2)
    [1.0, 0.7, 2.0],                              # temperature
    [True, False],                                # length_normalize
))


@pytest.mark.parametrize("mode, betas, temperature, length_normalize", CASES)
def test_matches_numpy_reference(rng, mode, betas, temperature, length_normalize):
  beta, beta2 = betas
  student, dpo, contrast, mask = _inputs(rng)
  losses, out = L.aligndistil_loss(
      student, dpo, contrast, mask, beta=beta, beta2=beta2, mode=mode,
      temperature=temperature, length_normalize=length_normalize)
  want, weights, diag = ref.aligndistil(
      student, dpo, contrast, mask, beta, beta2, mode, temperature, length_normalize)
  assert losses.dtype == jnp.float32 and losses.shape == (B,)
  np.testing.assert_allclose(losses, want, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(out.weights, weights, rtol=1e-5, atol=1e-6)
  for name in DIAG:
    np.testing.assert_allclose(getattr(out, name), diag[name], rtol=2e-4, atol=2e-5, err_msg=name)
  assert losses[0] == 0.0 and np.all(np.isfinite(np.asarray(losses)))   # row 0: nothing distilled
  assert np.all(np.asarray(out.token_losses)[~mask] == 0.0)
  np.testing.assert_allclose(np.asarray(out.token_losses).sum(-1),
                             want * np.maximum(mask.sum(-1), 1) if length_normalize else want,
                             rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_forward_kl_extra_matches_numpy_reference(rng, mode):
  student, dpo, contrast, mask = _inputs(rng)
  losses, _ = L.aligndistil_loss(student, dpo, contrast, mask, beta=0.1, beta2=10.0, mode=mode,
                                 temperature=1.3, divergence="forward_kl")
  want, _, _ = ref.aligndistil(student, dpo, contrast, mask, 0.1, 10.0, mode, 1.3, True,
                               divergence="forward_kl")
  np.testing.assert_allclose(losses, want, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_teacher_matches_numpy_and_ignores_logit_shifts(rng, mode):
  _, dpo, contrast, _ = _inputs(rng)
  teacher = L.aligndistil_teacher(dpo, contrast, beta=0.2, beta2=4.0, mode=mode, temperature=0.8)
  for b, t in itertools.product(range(B), range(T)):
    zd, zc = dpo[b, t].astype(np.float64), contrast[b, t].astype(np.float64)
    pd, pc = np.exp(ref.log_softmax(zd)), np.exp(ref.log_softmax(zc))
    adaptive = mode in ("aligndistil", "theorem1_adaptive")
    w = 4.0 * np.abs(pd - pc).sum() + 1e-3 if adaptive else 0.2 / 4.0
    zs = zd + w * (zd - zc) if mode in ("aligndistil", "theorem1_contrast") else w * zd + (1 - w) * zc
    np.testing.assert_allclose(teacher.log_probs[b, t], ref.log_softmax(zs / 0.8), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(teacher.weights[b, t], w, rtol=1e-5)
    np.testing.assert_allclose(teacher.scale[b, t], 0.2 / w if adaptive else 4.0, rtol=1e-5)
    np.testing.assert_allclose(teacher.l1_distance[b, t], np.abs(pd - pc).sum(), rtol=1e-5, atol=1e-6)
  # The authors combine raw logits; every mode is an affine combination with weights summing to
  # one, so per-position shifts (e.g. passing log-probs instead of logits) leave it unchanged.
  shift = rng.normal(size=(B, T, 1)).astype(np.float32) * 5
  shifted = L.aligndistil_teacher(dpo + shift, contrast - shift, beta=0.2, beta2=4.0, mode=mode,
                                  temperature=0.8)
  np.testing.assert_allclose(shifted.log_probs, teacher.log_probs, rtol=1e-4, atol=1e-4)


def test_theorem1_teacher_is_geometric_mixture_of_reference_and_dpo(rng):
  """Theorem 1: pi* ∝ pi_ref^(1 - beta/beta2) * pi_dpo^(beta/beta2), in probability space."""
  _, dpo, sft, _ = _inputs(rng)
  beta, beta2 = 0.1, 0.4
  w = beta / beta2
  teacher = L.aligndistil_teacher(dpo, sft, beta=beta, beta2=beta2, mode="theorem1")
  p_ref = np.exp(ref.log_softmax(sft))
  p_dpo = np.exp(ref.log_softmax(dpo))
  mix = p_ref ** (1 - w) * p_dpo ** w
  mix /= mix.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(teacher.log_probs), mix, rtol=1e-4, atol=1e-6)


def test_matches_authors_torch_formulation(rng):
  """The authors' trainer computation (raw-logit combination, torch autograd), re-expressed in torch."""
  torch = pytest.importorskip("torch")
  student, dpo, contrast, mask = _inputs(rng, b=3, t=5, v=11)
  mask[0, 1] = True   # every row non-empty: the authors divide by mask.sum without a guard
  beta, beta2, tau = 0.1, 10.0, 1.0
  for mode in MODES:
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    zd, zc = torch.tensor(dpo, dtype=torch.float64), torch.tensor(contrast, dtype=torch.float64)
    m = torch.tensor(mask, dtype=torch.float64)
    ps, lps = torch.softmax(s, -1), torch.log_softmax(s, -1)
    ld, lc = torch.log_softmax(zd, -1), torch.log_softmax(zc, -1)
    if mode in ("theorem1", "theorem1_contrast"):
      w, scale = beta / beta2, beta2
    else:
      w = ((ld.exp() - lc.exp()).abs().sum(-1) * beta2 + 1e-3).unsqueeze(-1)
      scale = beta / w.squeeze(-1)
    zs = w * (zd - zc) + zd if mode in ("aligndistil", "theorem1_contrast") else w * zd + (1 - w) * zc
    per_tok = (ps * (lps - torch.log_softmax(zs / tau, -1))).sum(-1) * scale
    loss = ((per_tok * m).sum(-1) / m.sum(-1)).mean(0)
    loss.backward()

    def jloss(x):
      return L.aligndistil_loss(x, dpo, contrast, mask, beta=beta, beta2=beta2, mode=mode)[0].mean()

    got, grad = jax.value_and_grad(jloss)(jnp.asarray(student))
    np.testing.assert_allclose(got, loss.item(), rtol=1e-4, err_msg=mode)
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=1e-3, atol=1e-6, err_msg=mode)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_matches_finite_differences_float64(rng, mode):
  student, dpo, contrast, mask = _inputs(rng, b=2, t=3, v=5)
  mask[0, 0] = True
  with jax.enable_x64(True):
    args = [jnp.asarray(x, jnp.float64) for x in (student, dpo, contrast)]

    @jax.jit
    def f(x):
      return L.aligndistil_loss(x, args[1], args[2], mask, beta=0.3, beta2=2.0, mode=mode,
                                temperature=1.5)[0].sum()

    grad = np.asarray(jax.grad(f)(args[0]))
    x0, eps = np.asarray(args[0]), 1e-6
    fd = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):
      e = np.zeros_like(x0)
      e[idx] = eps
      fd[idx] = (float(f(jnp.asarray(x0 + e))) - float(f(jnp.asarray(x0 - e)))) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
  assert np.abs(grad).max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_gradient_flows_through_both_student_factors(rng, mode):
  """d/dz [s KL(p||q)] = s * p * (log p - log q - KL): the probabilities are not detached."""
  student, dpo, contrast, mask = _inputs(rng)
  beta, beta2, tau = 0.2, 3.0, 0.9
  grad = jax.grad(lambda x: L.aligndistil_loss(
      x, dpo, contrast, mask, beta=beta, beta2=beta2, mode=mode, temperature=tau,
      length_normalize=False)[0].sum())(jnp.asarray(student))
  _, weights, _ = ref.aligndistil(student, dpo, contrast, mask, beta, beta2, mode, tau, False)
  want = np.zeros(student.shape)
  for b, t in zip(*np.nonzero(mask)):
    zd, zc, w = dpo[b, t].astype(np.float64), contrast[b, t].astype(np.float64), weights[b, t]
    zs = zd + w * (zd - zc) if mode in ("aligndistil", "theorem1_contrast") else w * zd + (1 - w) * zc
    scale = beta / w if mode in ("aligndistil", "theorem1_adaptive") else beta2
    lq, lp = ref.log_softmax(zs / tau), ref.log_softmax(student[b, t])
    p = np.exp(lp)
    want[b, t] = scale * p * (lp - lq - np.sum(p * (lp - lq)))
  np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_no_gradient_into_dpo_or_contrast_logits(rng, mode):
  student, dpo, contrast, mask = _inputs(rng)

  def f(s, d, c):
    losses, out = L.aligndistil_loss(s, d, c, mask, beta=0.1, beta2=10.0, mode=mode, temperature=0.7)
    return losses.sum() + out.mean_weight.sum() + out.expected_reward.sum() + out.seq_kl_dpo.sum()

  gd, gc = jax.grad(f, argnums=(1, 2))(student, dpo, contrast)
  assert np.all(np.asarray(gd) == 0.0) and np.all(np.asarray(gc) == 0.0)
  tg = jax.grad(lambda d, c: L.aligndistil_teacher(d, c, beta=0.1, beta2=10.0, mode=mode)
                .log_probs.sum(), argnums=(0, 1))(dpo, contrast)
  assert all(np.all(np.asarray(g) == 0.0) for g in tg)


def test_jit_parity_with_traced_hyperparameters(rng):
  student, dpo, contrast, mask = _inputs(rng)
  for mode, ln in zip(MODES, (True, False, True, False)):
    @functools.partial(jax.jit, static_argnames=("length_normalize",))
    def f(s, d, c, m, beta, beta2, tau, length_normalize):
      return L.aligndistil_loss(s, d, c, m, beta=beta, beta2=beta2, mode=mode, temperature=tau,
                                length_normalize=length_normalize)

    eager = L.aligndistil_loss(student, dpo, contrast, mask, beta=0.3, beta2=5.0, mode=mode,
                               temperature=1.2, length_normalize=ln)
    jitted = f(student, dpo, contrast, mask.astype(np.int32), 0.3, 5.0, 1.2, ln)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_low_precision_inputs_compute_in_float32(rng):
  student, dpo, contrast, mask = _inputs(rng)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  losses, out = L.aligndistil_loss(bf(student), bf(dpo), bf(contrast), mask, beta=0.1, beta2=10.0)
  want, _, _ = ref.aligndistil(np.asarray(bf(student), np.float64), np.asarray(bf(dpo), np.float64),
                               np.asarray(bf(contrast), np.float64), mask, 0.1, 10.0, "aligndistil",
                               1.0, True)
  assert losses.dtype == jnp.float32 and out.weights.dtype == jnp.float32
  np.testing.assert_allclose(losses, want, rtol=1e-4, atol=1e-5)


def test_weight_is_uncapped_l1_distance_times_beta2():
  """Disjoint one-hot-like teachers: L1 -> 2, so w -> 2 * beta2 + 1e-3 (no cap, no 1/2 factor)."""
  dpo = np.full((1, 1, 4), -50.0, np.float32)
  contrast = dpo.copy()
  dpo[..., 0], contrast[..., 1] = 50.0, 50.0
  teacher = L.aligndistil_teacher(dpo, contrast, beta=0.1, beta2=15.0)
  np.testing.assert_allclose(teacher.weights, [[30.001]], rtol=1e-6)
  np.testing.assert_allclose(teacher.scale, [[0.1 / 30.001]], rtol=1e-6)
  same = L.aligndistil_teacher(dpo, dpo, beta=0.1, beta2=15.0)
  np.testing.assert_allclose(same.weights, [[1e-3]], rtol=1e-6)   # identical models: w = 1e-3


def _bad_cases():
  s = np.zeros((2, 3, 5), np.float32)
  m = np.ones((2, 3), bool)
  ok = dict(student_logits=s, dpo_logits=s, contrast_logits=s, mask=m, beta=0.1, beta2=10.0)
  return [
      (dict(ok, beta2=0.0), "beta2"),
      (dict(ok, beta2=-1.0), "beta2"),
      (dict(ok, beta=0.0), "beta"),
      (dict(ok, temperature=0.0), "temperature"),
      (dict(ok, mode="theorem2"), "mode"),
      (dict(ok, divergence="js"), "divergence"),
      (dict(ok, contrast_logits=None), "missing contrast model"),
      (dict(ok, dpo_logits=np.zeros((2, 3, 6), np.float32)), "vocabulary mismatch"),
      (dict(ok, contrast_logits=np.zeros((2, 3, 6), np.float32)), "vocabulary mismatch"),
      (dict(ok, dpo_logits=np.zeros((2, 3, 6), np.float32),
            contrast_logits=np.zeros((2, 3, 6), np.float32)), "vocabulary mismatch"),
      (dict(ok, dpo_logits=np.zeros((2, 4, 5), np.float32),
            contrast_logits=np.zeros((2, 4, 5), np.float32)), "dpo_logits"),
      (dict(ok, student_logits=np.zeros((2, 5), np.float32)), "student_logits"),
      (dict(ok, mask=np.ones((2, 4), bool)), "mask"),
  ]


@pytest.mark.parametrize("kwargs, match", _bad_cases())
def test_bad_inputs_raise_one_line_value_error(kwargs, match):
  args = [kwargs.pop(k) for k in ("student_logits", "dpo_logits", "contrast_logits", "mask")]
  with pytest.raises(ValueError, match=match) as e:
    L.aligndistil_loss(*args, **kwargs)
  assert "\n" not in str(e.value) and str(e.value).startswith("aligndistil_loss:")


def test_teacher_bad_inputs():
  z = np.zeros((2, 5), np.float32)
  for kwargs, match in ((dict(beta=0.1, beta2=0.0), "beta2"), (dict(beta=0.1, beta2=1.0, mode="x"),
                        "aligndistil.*theorem1"), (dict(beta=0.1, beta2=1.0, temperature=-1.0),
                        "temperature")):
    with pytest.raises(ValueError, match=match):
      L.aligndistil_teacher(z, z, **kwargs)
  with pytest.raises(ValueError, match="missing contrast model"):
    L.aligndistil_teacher(z, None, beta=0.1, beta2=1.0)
  with pytest.raises(ValueError, match="vocabulary mismatch"):
    L.aligndistil_teacher(z, np.zeros((2, 4), np.float32), beta=0.1, beta2=1.0)
  assert AD.MODES == MODES
