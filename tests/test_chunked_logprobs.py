"""chunked_token_logprobs vs full-logits log-probs (float64 NumPy and token_logprobs).

The memory tests inspect the jaxpr of ``value_and_grad`` and the compiled
program's temporary buffer size to show no float32 ``[B, T, V]`` array exists.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from tests import numpy_reference as ref


def _problem(rng, B=3, T=13, D=8, V=37, scale=1.0):
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (rng.normal(size=(D, V)) * scale).astype(np.float32)
  labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
  weights = rng.normal(size=(B, T)).astype(np.float32)  # arbitrary cotangent
  return hidden, w, labels, weights


def _numpy_reference(hidden, w, labels, weights, cap=None):
  """float64 log p(label), entropy and grads of sum(weights * logp) by hand."""
  h = hidden.astype(np.float64)
  W = w.astype(np.float64)
  pre = h @ W
  z = cap * np.tanh(pre / cap) if cap else pre
  logp_all = ref.log_softmax(z)
  p = np.exp(logp_all)
  safe = np.where(labels < 0, 0, labels)
  onehot = np.eye(W.shape[1])[safe]
  logp = np.sum(onehot * logp_all, axis=-1)
  entropy = -np.sum(p * logp_all, axis=-1)
  dz = weights[..., None].astype(np.float64) * (onehot - p)
  dpre = dz * (1.0 - np.tanh(pre / cap) ** 2) if cap else dz
  dh = dpre @ W.T
  dW = np.einsum("btd,btv->dv", h, dpre)
  return logp, entropy, dh, dW


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_values_and_grads_match_numpy_float64(rng, chunk_size):
  hidden, w, labels, weights = _problem(rng)
  labels[0, :3] = -100  # ignore markers at (to-be-masked) positions are scored as id 0
  want_lp, want_ent, want_dh, want_dw = _numpy_reference(hidden, w, labels, weights)

  def f(h, W):
    return L.chunked_token_logprobs(h, labels, lambda x: x @ W, chunk_size=chunk_size,
                                    return_entropy=True)

  lp, ent = f(hidden, w)
  assert lp.shape == ent.shape == labels.shape and lp.dtype == ent.dtype == jnp.float32
  np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
  dh, dw = jax.grad(lambda h, W: jnp.sum(weights * f(h, W)[0]), argnums=(0, 1))(hidden, w)
  np.testing.assert_allclose(dh, want_dh, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 6, 64])
def test_needed_positions_match_numpy_and_the_rest_is_skipped(rng, chunk_size):
  """``needed`` (a response mask): float64 NumPy values and grads of sum(weights * logp) there, 0 before
  the first needed position, and the unembedding never runs on a chunk no row needs."""
  hidden, w, labels, weights = _problem(rng, B=4, T=23)
  needed = np.zeros(labels.shape, bool)
  needed[0, 9:15] = True     # a response in the middle, one reaching the end, a row with none,
  needed[1, 12:] = True      # one that starts last
  needed[3, 20:] = True
  weights = np.where(needed, weights, 0).astype(np.float32)   # what a masked sum differentiates
  want_lp, want_ent, want_dh, want_dw = _numpy_reference(hidden, w, labels, weights)
  seen = []

  def unembed(x, W):
    seen.append(x.shape)
    return x @ W

  def f(h, W):
    return L.chunked_token_logprobs(h, labels, lambda x: unembed(x, W), chunk_size=chunk_size,
                                    return_entropy=True, needed=needed)

  lp, ent = jax.jit(f)(hidden, w)
  np.testing.assert_allclose(np.where(needed, lp, 0), np.where(needed, want_lp, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.where(needed, ent, 0), np.where(needed, want_ent, 0), rtol=1e-5, atol=1e-5)
  assert not np.asarray(lp)[:, :9].any() and not np.asarray(ent)[:, :9].any()   # before the first needed one
  dh, dw = jax.grad(lambda h, W: jnp.sum(weights * f(h, W)[0]), argnums=(0, 1))(hidden, w)
  np.testing.assert_allclose(dh, want_dh, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-5)
  # The unembedding's chunks: min(chunk_size, T) positions each (traced once per program).
  assert {s[1] for s in seen} == {min(chunk_size, 23)}
  # Which chunks run: with chunks of 4 from the first needed position (9), one needing nothing (13-16) is
  # skipped; 17-20 and 21-24 hold needed positions (20, 21, 22).
  if chunk_size == 4:
    gap = np.zeros_like(needed)
    gap[0, 9:11] = gap[2, 20:] = True
    ran = jax.jit(lambda h: L.chunked_map(lambda x: {"ran": jnp.ones(x.shape[:2])}, [h], chunk_size=4,
                                            needed=gap)["ran"])(hidden)
    pos = np.arange(23)
    np.testing.assert_array_equal(ran, np.broadcast_to(((pos >= 9) & (pos < 13)) | (pos >= 17), (4, 23)))
  nothing = L.chunked_token_logprobs(hidden, labels, lambda x: x @ w, chunk_size=chunk_size,
                                     needed=np.zeros_like(needed))
  assert not np.asarray(nothing).any()
  with pytest.raises(ValueError, match="needed"):
    L.chunked_token_logprobs(hidden, labels, lambda x: x @ w, chunk_size=chunk_size, needed=needed[:, :5])


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_chunked_scan_of_masked_sums_with_needed_matches_numpy(rng, chunk_size):
  """chunked_scan(needed=): per-row masked sums (AlignDistil's shape of output) equal float64 NumPy, values
  and grads, although the chunks start at the first needed position and one needing nothing is not run."""
  hidden, w, labels, weights = _problem(rng, B=3, T=17)
  needed = np.zeros(labels.shape, bool)
  needed[0, 5:8] = needed[1, 14:] = True     # a gap 8..13 that no row needs; row 2 needs nothing
  weights = np.where(needed, weights, 0).astype(np.float32)
  want_lp, _, want_dh, want_dw = _numpy_reference(hidden, w, labels, weights)
  ran = []

  def chunk_sums(h, lab, wt, W):
    ran.append(h.shape)
    logits = h @ W
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), lab[..., None], -1)[..., 0]
    return jnp.sum(wt * lp, axis=-1), jnp.sum(wt != 0, axis=-1)

  def f(h, W):
    sums, counts = L.chunked_scan(lambda *xs: chunk_sums(*xs, W), (h, labels, weights), chunk_size=chunk_size,
                                  needed=needed)
    return jnp.sum(sums), (jnp.sum(sums, axis=0), sums, counts)

  (_, (total, sums, counts)), (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden, w)
  k = -(-17 // min(chunk_size, 17))
  assert sums.shape == (k, 3) and {s[1] for s in ran} == {min(chunk_size, 17)}
  np.testing.assert_allclose(total, np.sum(weights * want_lp, axis=-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.sum(counts, axis=0), np.sum(weights != 0, axis=-1))
  np.testing.assert_allclose(dh, want_dh, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-5)
  if chunk_size == 3:  # chunks from position 5: 5-7, 8-10 and 11-13 (nothing needed: not run, zeros), 14-16, ...
    touched = jax.jit(lambda h: L.chunked_scan(lambda x: jnp.ones(x.shape[:1]), (h,), chunk_size=3,
                                               needed=needed))(hidden)
    np.testing.assert_array_equal(touched[:, 0], [1, 0, 0, 1, 0, 0])
  with pytest.raises(ValueError, match="needed"):
    L.chunked_scan(lambda x: x, (hidden,), chunk_size=chunk_size, needed=needed[:2])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_token_logprobs_on_full_logits_with_softcap(rng, dtype):
  """Same values and grads as token_logprobs/token_entropy of the full logits.

  With bf16 logits the values agree exactly (same bf16 logits, float32 math);
  gradients pass through bf16 casts in a different order, so they agree to bf16 precision.
  """
  hidden, w, labels, weights = _problem(rng, T=10, scale=2.0)
  cap = 5.0

  def unembed(x, W):
    return (cap * jnp.tanh((x @ W) / cap)).astype(dtype)

  def chunked(h, W):
    lp, ent = L.chunked_token_logprobs(h, labels, lambda x: unembed(x, W), chunk_size=3,
                                       return_entropy=True)
    return jnp.sum(weights * lp) + jnp.sum(ent), (lp, ent)

  def full(h, W):
    logits = unembed(h, W)
    lp, ent = L.token_logprobs(logits, labels), L.token_entropy(logits)
    return jnp.sum(weights * lp) + jnp.sum(ent), (lp, ent)

  (_, (lp, ent)), g = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, w)
  (_, (lp_f, ent_f)), g_f = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, w)
  assert lp.dtype == jnp.float32
  np.testing.assert_allclose(lp, lp_f, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ent, ent_f, rtol=1e-6, atol=1e-6)
  for a, b in zip(g, g_f):
    if dtype == "float32":
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * float(np.max(np.abs(b))))


def test_without_entropy_returns_array(rng):
  hidden, w, labels, _ = _problem(rng)
  lp = L.chunked_token_logprobs(hidden, labels, lambda x: x @ w, chunk_size=4)
  np.testing.assert_allclose(lp, L.token_logprobs(hidden @ w, labels), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- memory: no [B, T, V] float32

B, T, D, V, CHUNK = 2, 512, 16, 2048, 16


def _memory_problem():
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)) * 0.1, jnp.float32)
  labels = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
  return hidden, w, labels


def _chunked_loss(h, W, labels):
  lp, ent = L.chunked_token_logprobs(h, labels, lambda x: x @ W, chunk_size=CHUNK,
                                     return_entropy=True)
  return jnp.sum(lp) + jnp.sum(ent)


def _full_loss(h, W, labels):
  logits = h @ W
  return jnp.sum(L.token_logprobs(logits, labels)) + jnp.sum(L.token_entropy(logits))


def _large_float_vars(jaxpr, limit):
  """Shapes of every float var (inputs, outputs, sub-jaxprs) with >= ``limit`` elements."""
  found = []

  def visit(jp):
    for v in list(jp.invars) + list(jp.constvars):
      check(v.aval)
    for eqn in jp.eqns:
      for v in eqn.outvars:
        check(v.aval)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)

  def check(aval):
    shape = getattr(aval, "shape", ())
    if jnp.issubdtype(getattr(aval, "dtype", jnp.int32), jnp.floating) and np.prod(shape) >= limit:
      found.append(tuple(shape))

  visit(jaxpr.jaxpr)
  return found


def test_jaxpr_of_value_and_grad_has_no_btv_array():
  hidden, w, labels = _memory_problem()
  vg = jax.value_and_grad(_chunked_loss, argnums=(0, 1))
  assert _large_float_vars(jax.make_jaxpr(vg)(hidden, w, labels), B * T * V // 4) == []
  # The detector does see the full-logits version's [B, T, V] arrays.
  full = jax.make_jaxpr(jax.value_and_grad(_full_loss, argnums=(0, 1)))(hidden, w, labels)
  assert (B, T, V) in _large_float_vars(full, B * T * V // 4)


def test_compiled_temp_memory_far_below_btv():
  hidden, w, labels = _memory_problem()
  btv_bytes = B * T * V * 4
  compiled = jax.jit(jax.value_and_grad(_chunked_loss, argnums=(0, 1))).lower(hidden, w, labels).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    pytest.skip("this backend reports no memory analysis")
  full = jax.jit(jax.value_and_grad(_full_loss, argnums=(0, 1))).lower(hidden, w, labels).compile()
  assert full.memory_analysis().temp_size_in_bytes >= btv_bytes  # the peer does hold [B, T, V]
  assert mem.temp_size_in_bytes < btv_bytes / 4, (mem.temp_size_in_bytes, btv_bytes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=np.zeros((2, 3)), labels=np.zeros((2, 3), np.int32)), "`hidden` must have rank 3"),
        (dict(labels=np.zeros((2, 4), np.int32)), "disagree on"),
        (dict(labels=np.zeros((2, 3), np.float32)), "`labels` must hold integer"),
        (dict(chunk_size=0), "`chunk_size` must be a positive int"),
        (dict(chunk_size=2.0), "`chunk_size` must be a positive int"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
  args = dict(hidden=np.zeros((2, 3, 4), np.float32), labels=np.zeros((2, 3), np.int32), chunk_size=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    L.chunked_token_logprobs(args["hidden"], args["labels"], lambda x: x, chunk_size=args["chunk_size"])


def test_non_callable_unembed_raises_type_error():
  with pytest.raises(TypeError, match="`unembed` must be a callable"):
    L.chunked_token_logprobs(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2), np.int32), None,
                             chunk_size=1)


@pytest.mark.parametrize("tie", [False, True])
def test_with_transformer_unembed_matches_full_logits(tie):
  """Through a real decoder's unembed (tied or untied, final soft-cap): values and all grads."""
  from flax import nnx

  from alignjax.models.config import ModelConfig
  from alignjax.models.transformer import Transformer

  config = ModelConfig.llama_tiny(tie_embeddings=tie, final_logit_softcap=4.0)
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 11)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, size=(2, 10)), jnp.float32)

  def loss(params, chunked):
    model = nnx.merge(graphdef, params)
    if chunked:
      hidden = model(tokens, return_hidden=True)[:, :-1]
      lp = L.chunked_token_logprobs(hidden, tokens[:, 1:], model.unembed, chunk_size=4)
    else:
      lp = L.token_logprobs(model(tokens)[:, :-1], tokens[:, 1:])
    return jnp.sum(lp * mask), lp

  vg = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, lp), grads = vg(params, True)
  (_, lp_f), grads_f = vg(params, False)
  np.testing.assert_allclose(lp, lp_f, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_f)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
