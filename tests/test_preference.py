import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from tests import numpy_reference as ref
from tests.conftest import random_mask


def _logps(rng, B=16, scale=5.0):
  return [rng.normal(size=B).astype(np.float32) * scale - 20.0 for _ in range(4)]


@pytest.mark.parametrize(
    "beta, label_smoothing",
    list(itertools.product([0.01, 0.1, 0.5, 2.0], [0.0, 0.1, 0.3, 0.5])),
)
@pytest.mark.parametrize("robust", [False, True])
def test_dpo_matches_numpy(rng, beta, label_smoothing, robust):
  if robust and label_smoothing == 0.5:
    label_smoothing = 0.45
  pc, pr, rc, rr = _logps(rng)
  losses, out = L.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, robust=robust)
  want = ref.dpo(pc, pr, rc, rr, beta, label_smoothing, robust)
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(out.chosen_rewards, beta * (pc.astype(np.float64) - rc), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.rejected_rewards, beta * (pr.astype(np.float64) - rr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.margins, out.chosen_rewards - out.rejected_rewards, rtol=1e-6)
  np.testing.assert_array_equal(out.accuracies, (out.chosen_rewards > out.rejected_rewards).astype(np.float32))
  assert losses.shape == (16,)


@pytest.mark.parametrize(
    "name, beta", list(itertools.product(sorted(L.GPO_FUNCTIONS), [0.05, 0.3, 1.0, 3.0]))
)
def test_gpo_matches_numpy(rng, name, beta):
  pc, pr, rc, rr = [x / 5.0 for x in _logps(rng)]  # keep exp() in range
  losses, out = L.gpo_loss(pc, pr, rc, rr, beta=beta, loss_type=name)
  np.testing.assert_allclose(losses, ref.gpo(pc, pr, rc, rr, beta, name), rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(out.logits, (pc - rc) - (pr - rr), rtol=1e-5, atol=1e-5)


def test_gpo_aliases_and_callable(rng):
  pc, pr, rc, rr = _logps(rng)
  for alias, name in L.GPO_ALIASES.items():
    a, _ = L.gpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=alias)
    b, _ = L.gpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=name)
    np.testing.assert_array_equal(a, b)
  robust0, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.2, robust=True)
  dpo, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.2)
  np.testing.assert_allclose(robust0, dpo, rtol=1e-6)
  logistic, _ = L.gpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="logistic")
  np.testing.assert_allclose(dpo, logistic, rtol=1e-5, atol=1e-6)
  custom, _ = L.gpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=lambda x: jnp.abs(x))
  np.testing.assert_allclose(custom, np.abs(0.2 * ((pc - rc) - (pr - rr))), rtol=1e-5)


def test_gpo_functions_are_surrogates():
  x = jnp.linspace(-3, 3, 61)
  for name, f in L.GPO_FUNCTIONS.items():
    g = jax.vmap(jax.grad(f))(jnp.zeros(1))[0]
    assert g < 0, f"{name}: f'(0) must be negative, got {g}"
    assert bool(jnp.all(jnp.isfinite(f(x))))


@pytest.mark.parametrize("name", ["dpo"] + sorted(L.GPO_FUNCTIONS))
def test_zero_gradient_into_reference_and_policy_grad_matches_fd(rng, name):
  pc, pr, rc, rr = [jnp.asarray(x / 10.0) for x in _logps(rng, B=5)]

  def total(pc, pr, rc, rr):
    if name == "dpo":
      losses, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=0.2)
    else:
      losses, _ = L.gpo_loss(pc, pr, rc, rr, beta=0.7, loss_type=name)
    return losses.sum()

  grads = jax.grad(total, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)
  # Policy gradient against a central finite difference of the NumPy equation.
  f = (lambda a, b: ref.dpo(a, b, rc, rr, 0.7, 0.2)) if name == "dpo" else (
      lambda a, b: ref.gpo(a, b, rc, rr, 0.7, name))
  eps = 1e-3
  pc64, pr64 = np.asarray(pc, np.float64), np.asarray(pr, np.float64)
  for i in range(5):
    if name in ("hinge", "truncated_quadratic") and abs(1 - 0.7 * float((pc[i] - rc[i]) - (pr[i] - rr[i]))) < 1e-2:
      continue  # kink
    d = np.zeros(5); d[i] = eps
    fd = (f(pc64 + d, pr64)[i] - f(pc64 - d, pr64)[i]) / (2 * eps)
    np.testing.assert_allclose(grads[0][i], fd, rtol=2e-3, atol=2e-4)


def test_end_to_end_from_padded_logits(rng):
  """Masked/padded rows: padding content never changes the loss; empty rows stay finite."""
  B, T, V = 6, 9, 13
  logits = [rng.normal(size=(B, T, V)).astype(np.float32) for _ in range(4)]
  labels = [rng.integers(0, V, size=(B, T)).astype(np.int32) for _ in range(2)]
  masks = [random_mask(rng, B, T) for _ in range(2)]
  masks[1][0] = True  # only the chosen row 0 is empty

  def loss(lg, lb, ms):
    pc = L.sequence_logprobs(lg[0], lb[0], ms[0])
    pr = L.sequence_logprobs(lg[1], lb[1], ms[1])
    rc = L.sequence_logprobs(lg[2], lb[0], ms[0])
    rr = L.sequence_logprobs(lg[3], lb[1], ms[1])
    return L.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)[0]

  base = loss(logits, labels, masks)
  assert np.all(np.isfinite(base))
  want = ref.dpo(
      ref.seq_logprob(logits[0], labels[0], masks[0]), ref.seq_logprob(logits[1], labels[1], masks[1]),
      ref.seq_logprob(logits[2], labels[0], masks[0]), ref.seq_logprob(logits[3], labels[1], masks[1]),
      0.1, 0.1)
  np.testing.assert_allclose(base, want, rtol=1e-5, atol=1e-6)
  junk = [np.where(masks[i % 2][..., None], lg, 50 * rng.normal(size=lg.shape)).astype(np.float32)
          for i, lg in enumerate(logits)]
  np.testing.assert_allclose(loss(junk, labels, masks), base, rtol=1e-5)
  # Gradients through a fully masked chosen row are finite.
  g = jax.grad(lambda x: loss([x] + logits[1:], labels, masks).sum())(jnp.asarray(logits[0]))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[0] == 0.0)


def test_jit_parity(rng):
  pc, pr, rc, rr = _logps(rng)
  f = lambda *a: (L.dpo_loss(*a, beta=0.3, label_smoothing=0.1), L.gpo_loss(*a, beta=0.3, loss_type="savage"))
  eager, jitted = f(pc, pr, rc, rr), jax.jit(f)(pc, pr, rc, rr)
  for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(e, j, rtol=1e-6, atol=1e-6)


def test_traced_beta_under_vmap(rng):
  pc, pr, rc, rr = _logps(rng)
  betas = jnp.array([0.1, 0.5])
  out = jax.vmap(lambda b: L.dpo_loss(pc, pr, rc, rr, beta=b)[0])(betas)
  np.testing.assert_allclose(out[1], ref.dpo(pc, pr, rc, rr, 0.5, 0.0), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(label_smoothing=0.7), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(label_smoothing=0.5, robust=True), r"label_smoothing.*0.5\)"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
  x = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=match):
    L.dpo_loss(x, x, x, x, **kwargs)


def test_bad_shapes_and_names():
  x = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="rank 1"):
    L.dpo_loss(np.zeros((3, 2)), x, x, x)
  with pytest.raises(ValueError, match="share one shape"):
    L.gpo_loss(x, np.zeros(4), x, x)
  with pytest.raises(ValueError, match="unknown `loss_type` 'cubic'"):
    L.gpo_loss(x, x, x, x, loss_type="cubic")
