import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from tests import numpy_reference as ref
from tests.conftest import random_mask


def _batch(rng, B=4, T=7, V=11):
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
  mask = random_mask(rng, B, T)
  return logits, labels, mask


def test_token_logprobs_matches_numpy(rng):
  logits, labels, _ = _batch(rng)
  got = np.asarray(L.token_logprobs(logits, labels))
  want = np.array([[ref.log_softmax(logits[b, t])[labels[b, t]] for t in range(7)] for b in range(4)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got.dtype == np.float32


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_masked(rng, average):
  logits, labels, mask = _batch(rng)
  labels = np.where(mask, labels, -100)  # ignore ids at padded positions are fine
  got = np.asarray(L.sequence_logprobs(logits, labels, mask, average=average))
  want = ref.seq_logprob(logits, labels, mask, average=average)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got[0] == 0.0 and np.all(np.isfinite(got))  # fully masked row


def test_sequence_logprobs_ignores_padded_content(rng):
  logits, labels, mask = _batch(rng)
  noisy_logits = np.where(mask[..., None], logits, 1e4 * rng.normal(size=logits.shape)).astype(np.float32)
  noisy_labels = np.where(mask, labels, rng.integers(0, 11, size=labels.shape)).astype(np.int32)
  a = L.sequence_logprobs(logits, labels, mask)
  b = L.sequence_logprobs(noisy_logits, noisy_labels, mask)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bf16_logits_computed_in_f32(rng):
  logits, labels, mask = _batch(rng)
  got = L.sequence_logprobs(jnp.asarray(logits, jnp.bfloat16), labels, mask)
  assert got.dtype == jnp.float32
  want = ref.seq_logprob(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), labels, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_token_kl_matches_numpy_and_properties(rng):
  p = rng.normal(size=(3, 5, 9)).astype(np.float32)
  q = rng.normal(size=(3, 5, 9)).astype(np.float32)
  got = np.asarray(L.token_kl(p, q))
  want = np.array([[ref.kl(p[b, t], q[b, t]) for t in range(5)] for b in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got >= -1e-6)
  np.testing.assert_allclose(L.token_kl(p, p), 0.0, atol=1e-6)
  # Shift-invariance of logits.
  np.testing.assert_allclose(L.token_kl(p + 5.0, q - 2.0), got, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_kl(rng, average):
  p = rng.normal(size=(4, 6, 5)).astype(np.float32)
  q = rng.normal(size=(4, 6, 5)).astype(np.float32)
  mask = random_mask(rng, 4, 6)
  got = np.asarray(L.sequence_kl(p, q, mask, average=average))
  np.testing.assert_allclose(got, ref.seq_kl(p, q, mask, average=average), rtol=1e-5, atol=1e-6)


def test_token_entropy(rng):
  z = rng.normal(size=(2, 3, 6))
  lp = ref.log_softmax(z)
  np.testing.assert_allclose(L.token_entropy(z), -(np.exp(lp) * lp).sum(-1), rtol=1e-5)


def test_shift_for_next_token(rng):
  logits, labels, mask = _batch(rng)
  sl, st, sm = L.shift_for_next_token(logits, labels, mask)
  assert sl.shape == (4, 6, 11) and st.shape == (4, 6) and sm.shape == (4, 6)
  np.testing.assert_array_equal(st, labels[:, 1:])
  np.testing.assert_array_equal(sm, mask[:, 1:])
  np.testing.assert_array_equal(sl, logits[:, :-1])
  sl2, st2 = L.shift_for_next_token(logits, labels)
  np.testing.assert_array_equal(st2, st)


def test_masked_mean_empty_row_is_zero():
  x = jnp.ones((2, 3))
  m = jnp.array([[0, 0, 0], [1, 1, 0]])
  np.testing.assert_allclose(L.masked_mean(x, m), [0.0, 1.0])
  np.testing.assert_allclose(L.masked_sum(x, m), [0.0, 2.0])


def test_jit_parity(rng):
  logits, labels, mask = _batch(rng)
  f = lambda a, b, c: (L.sequence_logprobs(a, b, c), L.sequence_kl(a, a[::-1], c))
  eager = f(logits, labels, mask)
  jitted = jax.jit(f)(logits, labels, mask)
  for e, j in zip(eager, jitted):
    np.testing.assert_allclose(e, j, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.token_logprobs(np.zeros((2, 3)), np.zeros((2, 3), np.int32)), "rank 3"),
        (lambda: L.token_logprobs(np.zeros((2, 3, 4)), np.zeros((2,), np.int32)), "rank 2"),
        (lambda: L.token_logprobs(np.zeros((2, 3, 4)), np.zeros((2, 4), np.int32)), "disagree on"),
        (lambda: L.token_logprobs(np.zeros((2, 3, 4)), np.zeros((2, 3), np.float32)), "integer token ids"),
        (lambda: L.sequence_logprobs(np.zeros((2, 3, 4)), np.zeros((2, 3), np.int32), np.ones((2, 4))), "mask"),
        (lambda: L.token_kl(np.zeros((2, 3)), np.zeros((2, 4))), "share one shape"),
        (lambda: L.sequence_kl(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), np.ones((2, 3))), "share one shape"),
        (lambda: L.shift_for_next_token(np.zeros((2, 3, 4)), np.zeros((2, 3), np.int32), np.ones((3, 3))), "mask"),
    ],
)
def test_bad_shapes_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
