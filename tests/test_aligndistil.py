import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from tests import numpy_reference as ref
from tests.conftest import random_mask

B, T, V = 4, 6, 9


def _inputs(rng):
  base = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  pol = (base + rng.normal(size=base.shape)).astype(np.float32)
  refl = (base + 0.5 * rng.normal(size=base.shape)).astype(np.float32)
  dpo = (refl + rng.normal(size=base.shape)).astype(np.float32)
  rdpo = (refl + rng.normal(size=base.shape)).astype(np.float32)
  mask = random_mask(rng, B, T)
  return pol, refl, dpo, rdpo, mask


CASES = list(itertools.product(
    [0.05, 0.5, 2.0],          # beta
    [1.0, 5.0],                # beta_max
    [True, False],             # adaptive
    [True, False],             # contrastive (reverse DPO given)
    ["reverse_kl", "forward_kl"],
    [True, False],             # average
))


@pytest.mark.parametrize("beta, beta_max, adaptive, contrastive, divergence, average", CASES)
def test_matches_numpy(rng, beta, beta_max, adaptive, contrastive, divergence, average):
  pol, refl, dpo, rdpo, mask = _inputs(rng)
  rdpo = rdpo if contrastive else None
  losses, out = L.aligndistil_loss(
      pol, refl, dpo, rdpo, mask, beta=beta, beta_max=beta_max, adaptive=adaptive,
      divergence=divergence, average=average)
  want, coefs = ref.aligndistil(pol, refl, dpo, rdpo, mask, beta, beta_max, adaptive, divergence, average)
  np.testing.assert_allclose(losses, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.coefficients, coefs, rtol=1e-5, atol=1e-6)
  assert losses[0] == 0.0 and np.all(np.isfinite(losses))  # row 0 fully masked
  assert np.all(np.asarray(out.token_losses)[~mask] == 0.0)
  np.testing.assert_array_equal(out.num_tokens, mask.sum(-1))


def test_teacher_properties(rng):
  pol, refl, dpo, rdpo, _ = _inputs(rng)
  teacher = L.aligndistil_teacher(refl, dpo, rdpo, beta=0.1, beta_max=4.0)
  # A normalised distribution at every position.
  np.testing.assert_allclose(jnp.exp(teacher.logits).sum(-1), 1.0, rtol=1e-5)
  # Adaptive weights fall as the DPO/reverse-DPO disagreement grows, within the cap.
  tv, w = np.asarray(teacher.tv_distance).ravel(), np.asarray(teacher.coefficients).ravel()
  order = np.argsort(tv)
  assert np.all(np.diff(w[order]) <= 1e-6) and np.all(w <= 4.0 + 1e-6) and np.all(w >= 0.1)
  assert np.all((tv >= 0) & (tv <= 1))
  # When DPO and reverse DPO agree there is no reward: teacher == reference.
  same = L.aligndistil_teacher(refl, dpo, dpo, beta=0.1, beta_max=4.0)
  np.testing.assert_allclose(same.logits, ref.log_softmax(refl), rtol=1e-5, atol=1e-5)
  # A fixed weight of w moves the log-probabilities by exactly w * (dpo - rdpo), up to normalisation.
  fixed = L.aligndistil_teacher(refl, dpo, rdpo, beta=0.7, adaptive=False)
  z = ref.log_softmax(refl) + 0.7 * (ref.log_softmax(dpo) - ref.log_softmax(rdpo))
  np.testing.assert_allclose(fixed.logits, ref.log_softmax(z), rtol=1e-5, atol=1e-5)


def test_student_at_teacher_has_zero_loss(rng):
  _, refl, dpo, rdpo, mask = _inputs(rng)
  teacher = L.aligndistil_teacher(refl, dpo, rdpo, beta=0.3, beta_max=3.0)
  for divergence in ("reverse_kl", "forward_kl"):
    losses, _ = L.aligndistil_loss(teacher.logits, refl, dpo, rdpo, mask, beta=0.3, beta_max=3.0,
                                   divergence=divergence)
    np.testing.assert_allclose(losses, 0.0, atol=1e-5)


def test_gradients_only_into_policy(rng):
  pol, refl, dpo, rdpo, mask = map(jnp.asarray, _inputs(rng))
  f = lambda *a: L.aligndistil_loss(*a, mask, beta=0.3, beta_max=3.0)[0].sum()
  g = jax.grad(f, argnums=(0, 1, 2, 3))(pol, refl, dpo, rdpo)
  for frozen in g[1:]:
    np.testing.assert_array_equal(frozen, 0.0)
  assert np.all(np.isfinite(g[0])) and np.any(np.asarray(g[0]) != 0)
  assert np.all(np.asarray(g[0])[~np.asarray(mask)] == 0.0)


def test_jit_parity(rng):
  pol, refl, dpo, rdpo, mask = _inputs(rng)
  f = lambda *a: L.aligndistil_loss(*a, beta=0.3, beta_max=3.0)
  for e, j in zip(jax.tree.leaves(f(pol, refl, dpo, rdpo, mask)),
                  jax.tree.leaves(jax.jit(f)(pol, refl, dpo, rdpo, mask))):
    np.testing.assert_allclose(e, j, rtol=1e-5, atol=1e-6)


def test_errors(rng):
  pol, refl, dpo, rdpo, mask = _inputs(rng)
  with pytest.raises(ValueError, match="beta_max"):
    L.aligndistil_loss(pol, refl, dpo, rdpo, mask, beta=0.3)
  with pytest.raises(ValueError, match="unknown `divergence`"):
    L.aligndistil_loss(pol, refl, dpo, rdpo, mask, beta=0.3, beta_max=1.0, divergence="js")
  with pytest.raises(ValueError, match="share one shape"):
    L.aligndistil_loss(pol, refl, dpo[..., :-1], rdpo, mask, beta=0.3, beta_max=1.0)
  with pytest.raises(ValueError, match="mask"):
    L.aligndistil_loss(pol, refl, dpo, rdpo, mask[:, :-1], beta=0.3, beta_max=1.0)
  with pytest.raises(ValueError, match="beta"):
    L.aligndistil_loss(pol, refl, dpo, rdpo, mask, beta=-1.0, beta_max=1.0)
