"""alignjax.decoding.generate on tiny random Hugging Face models, against independent references.

References: transformers ``generate(do_sample=False)`` and its raw logits (``output_logits``)
for greedy tokens and log-probs; float64 NumPy softmax of the torch model's logits (with
transformers' warpers for temperature/top-k/top-p) for sampling distributions; float64
NumPy mixtures of torch logits for DeRa / proxy tuning; plain Python set membership for
the constraints; ``jax.monitoring`` compile events for recompilation.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alignjax import decoding, models, sharding
from alignjax.decoding import sampler
from flax import nnx
from tests import hf_fixtures
from transformers.generation import logits_process as hf_lp

B, T, N = 4, 7, 8
LENS = (7, 4, 1, 6)  # left-padded prompt lengths; row 2 has one token
PAD = 0


def _prompts(vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
  mask = np.arange(T)[None, :] >= (T - np.asarray(LENS))[:, None]
  return np.where(mask, tokens, PAD).astype(np.int32), mask


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("decoding_hf")
  return {
      "llama": hf_fixtures.make_tiny_hf("llama", str(root / "llama")),
      "llama_ref": hf_fixtures.make_tiny_hf("llama", str(root / "llama_ref"), seed=1),
      "llama_small": hf_fixtures.make_tiny_hf("llama", str(root / "llama_small"), seed=2,
                                              hidden_size=32, intermediate_size=64, num_hidden_layers=1),
      "gpt2": hf_fixtures.make_tiny_hf("gpt2", str(root / "gpt2")),
      "gemma2": hf_fixtures.make_tiny_hf("gemma2", str(root / "gemma2")),
  }


_CACHE = {}


def _load(hf_dirs, name):
  if name not in _CACHE:
    _CACHE[name] = (models.from_hf(hf_dirs[name]), hf_fixtures.load_hf_torch(hf_dirs[name]))
  return _CACHE[name]


def _torch_next_logits(torch_model, rows):
  """float64 next-token logits [len(rows), V] of unpadded token lists (one forward each)."""
  out = []
  with torch.no_grad():
    for row in rows:
      ids = torch.tensor([list(row)], dtype=torch.long)
      out.append(torch_model(ids).logits[0, -1].double().numpy())
  return np.stack(out)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _hf_generate(torch_model, tokens, mask, n, eos):
  torch_model.generation_config.eos_token_id = list(eos) if eos else None  # no fixture default EOS
  with torch.no_grad():
    out = torch_model.generate(
        torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=n, do_sample=False, eos_token_id=list(eos) if eos else None, pad_token_id=PAD,
        output_logits=True, return_dict_in_generate=True)
  seq = out.sequences[:, tokens.shape[1]:].numpy()
  logits = torch.stack(out.logits, 1).double().numpy()  # [B, n', V]
  return seq, logits


@contextlib.contextmanager
def _count_compiles():
  counter = {"n": 0}

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      counter["n"] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# ------------------------------------------------------------------------ greedy parity
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_greedy_matches_transformers_generate_left_padded_with_eos(hf_dirs, family):
  model, tm = _load(hf_dirs, family)
  V = model.config.vocab_size
  tokens, mask = _prompts(V)
  free, _ = _hf_generate(tm, tokens, mask, N, ())
  # EOS ids the model really emits: a token of row 0 and one of row 1, early, and absent
  # from at least one row, so some rows stop early and others run to the end.
  eos = []
  for r in (0, 1):
    for t in free[r, 1:N - 2]:
      t = int(t)
      if t not in eos and not all(t in free[b] for b in range(B)):
        eos.append(t)
        break
  assert eos, "fixture produced no usable EOS candidate"
  seq, logits = _hf_generate(tm, tokens, mask, N, eos)
  out = decoding.generate(model, tokens, mask, max_new_tokens=N, eos_token_ids=tuple(eos),
                          pad_token_id=PAD, return_model_logprobs=True)
  ours, ours_mask, ours_lp = (np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))

  # transformers stops when every row is done; pad its output to N.
  n = seq.shape[1]
  want = np.full((B, N), PAD, np.int64)
  want[:, :n] = seq
  np.testing.assert_array_equal(ours, want)
  want_mask = np.zeros((B, N), bool)
  for b in range(B):
    hits = [i for i in range(n) if int(seq[b, i]) in eos]
    want_mask[b, :(hits[0] + 1 if hits else n)] = True
  assert not want_mask.all(), "no row stopped early"
  assert want_mask[:, -1].any() or n < N, "every row stopped early"
  np.testing.assert_array_equal(ours_mask, want_mask)
  # log-probs equal log_softmax of transformers' raw logits of the emitted tokens.
  lp = _log_softmax(logits)
  want_lp = np.zeros((B, N))
  for b in range(B):
    for i in range(N):
      if want_mask[b, i]:
        want_lp[b, i] = lp[b, i, seq[b, i]]
  np.testing.assert_allclose(ours_lp, want_lp, atol=2e-4)
  np.testing.assert_allclose(np.asarray(out.model_logprobs), want_lp, atol=2e-4)
  assert np.all(ours_lp[~want_mask] == 0) and np.all(ours[~want_mask] == PAD)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # untied head (transposed) / tied head, soft-caps
def test_long_decoding_on_cpu_reads_transposed_weights_and_matches_transformers(hf_dirs, family):
  model, tm = _load(hf_dirs, family)
  tokens, mask = _prompts(model.config.vocab_size, seed=3)
  n = sampler.OUT_MAJOR_MIN_TOKENS + 4
  state = nnx.state(model)
  # The decode loop runs on transposed MLP weights and head here (CPU, B rows, n tokens), not
  # for one row, for few tokens, or on a mesh.
  assert sampler._out_major(state, None, B, n) and sampler._out_major((state, jax.random.key(0)), None, B, n)
  assert not sampler._out_major(state, None, 1, n) and not sampler._out_major(state, None, B, n - 5)
  assert not sampler._out_major(state, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), B, n)
  seq, logits = _hf_generate(tm, tokens, mask, n, ())
  out = decoding.generate(model, tokens, mask, max_new_tokens=n, pad_token_id=PAD, return_model_logprobs=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), seq)
  want_lp = np.take_along_axis(_log_softmax(logits), seq[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.model_logprobs), want_lp, atol=2e-4)


@pytest.mark.parametrize("scan,dtype", [(False, jnp.float32), (True, jnp.float32), (False, jnp.bfloat16)])
def test_out_major_holds_transposed_weights_and_head_and_computes_the_same(hf_dirs, scan, dtype):
  from alignjax.models import transformer
  base = _load(hf_dirs, "llama")[0] if dtype == jnp.float32 else models.from_hf(hf_dirs["llama"], dtype=dtype)
  model = transformer.stack_layers(base) if scan else base
  graphdef, state = nnx.split(model)
  tokens, mask = _prompts(model.config.vocab_size)
  names = {"mlp": ("gate", "up", "down"), "attn": ("q", "k", "v", "o")}

  def forward(state, transposed):
    m = nnx.merge(graphdef, state)
    if transposed:
      transformer.out_major(m)
    h = m(tokens, attention_mask=mask, return_hidden=True)
    layer = m.layers if scan else m.layers[0]
    weights = {(part, k): getattr(getattr(layer, part), k)[...] for part, ks in names.items() for k in ks}
    return m.unembed(h), weights, m.lm_head[...]

  plain, plain_w, plain_head = jax.jit(forward, static_argnums=1)(state, False)
  got, got_w, got_head = jax.jit(forward, static_argnums=1)(state, True)
  lead = 1 if scan else 0
  for (part, k), w in plain_w.items():  # [L.., in..., out...] -> [L.., out, in], in = D or (heads, head_dim)
    w = np.asarray(w)
    n_in = 2 if k == "o" else 1
    w2 = w.reshape(w.shape[:lead] + (math.prod(w.shape[lead:lead + n_in]), -1))
    np.testing.assert_array_equal(np.asarray(got_w[part, k]), np.swapaxes(w2, -1, -2), err_msg=f"{part}.{k}")
  np.testing.assert_array_equal(np.asarray(got_head), np.asarray(plain_head).T)
  scale = np.abs(np.asarray(plain)).max()
  np.testing.assert_allclose(np.asarray(got), np.asarray(plain), atol=(1e-5 if dtype == jnp.float32 else 3e-2) * scale)


def test_right_padded_prompts_equal_left_padded(hf_dirs):
  model, _ = _load(hf_dirs, "llama")
  tokens, mask = _prompts(model.config.vocab_size)
  right_t, right_m = np.zeros_like(tokens), np.zeros_like(mask)
  for b, n in enumerate(LENS):
    right_t[b, :n], right_m[b, :n] = tokens[b, T - n:], True
  a = decoding.generate(model, tokens, mask, max_new_tokens=N)
  c = decoding.generate(model, right_t, right_m.astype(np.int32), max_new_tokens=N)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


# ------------------------------------------------------------------------ sampling
def test_top_k_one_equals_greedy(hf_dirs):
  model, _ = _load(hf_dirs, "llama")
  V = model.config.vocab_size
  tokens, mask = _prompts(V)
  greedy = decoding.generate(model, tokens, mask, max_new_tokens=N)
  # All-permissive masks and DFA: the program the mask tests below use (one compilation).
  sampled = decoding.generate(model, tokens, mask, max_new_tokens=N, temperature=0.7, top_k=1,
                              rng=jax.random.key(3), **_permissive(V))
  want = np.asarray(greedy.tokens).copy()  # greedy, cut after its first EOS2 id
  for b in range(B):
    hits = np.flatnonzero(np.isin(want[b], EOS2))
    if hits.size:
      want[b, hits[0] + 1:] = PAD
  np.testing.assert_array_equal(np.asarray(sampled.tokens), want)
  np.testing.assert_allclose(np.asarray(sampled.logprobs), 0.0, atol=1e-6)  # a one-token support


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.7, 20, 0.8)])
def test_one_token_samples_match_transformers_distribution(hf_dirs, temperature, top_k, top_p):
  model, tm = _load(hf_dirs, "llama")
  tokens, mask = _prompts(model.config.vocab_size)
  prompt = tokens[0:1, T - LENS[0]:]
  rows = 4096
  out = decoding.generate(model, np.repeat(prompt, rows, 0), np.ones((rows, prompt.shape[1]), bool),
                          max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                          rng=jax.random.key(0))
  z = torch.tensor(_torch_next_logits(tm, prompt), dtype=torch.float32)  # [1, V]
  ids = torch.zeros((1, 1), dtype=torch.long)
  z = hf_lp.TemperatureLogitsWarper(temperature)(ids, z)
  if top_k:
    z = hf_lp.TopKLogitsWarper(top_k)(ids, z)
  if top_p < 1:
    z = hf_lp.TopPLogitsWarper(top_p)(ids, z)
  p = np.exp(_log_softmax(z[0].double().numpy()))
  got = np.asarray(out.tokens)[:, 0]
  freq = np.bincount(got, minlength=p.size) / rows
  # Every sample in the support; each frequency within 5 binomial standard deviations.
  assert np.all(p[got] > 0)
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / rows) + 1e-3)
  # The reported log-prob is under the distribution sampled from.
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np.log(p[got]), atol=1e-4)


# ------------------------------------------------------------------------ masks and DFAs
# These tests share one compiled program: sampling, [B, V] masks, an 8-state DFA, two EOS ids.
S_DFA = 8
EOS2 = (2, 3)


def _permissive(V):
  """Masks that allow everything: every token allowed, a one-state accepting DFA."""
  table = np.zeros((S_DFA, V), np.int32)
  return dict(allowed_tokens=np.ones((B, V), bool), eos_token_ids=EOS2,
              constraint=decoding.token_dfa(table, 0, [0]))


def _any_dfa(V):
  return decoding.token_dfa(np.zeros((S_DFA, V), np.int32), 0, [0])


def test_allowed_tokens_never_violated_over_seeds(hf_dirs):
  model, _ = _load(hf_dirs, "llama")
  V = model.config.vocab_size
  tokens, mask = _prompts(V)
  rng = np.random.default_rng(1)
  for seed in range(6):
    allowed = rng.random((B, V)) < 0.1
    allowed[:, 2] = True  # an EOS id rows may use
    out = decoding.generate(model, tokens, mask, max_new_tokens=N, temperature=1.3, top_p=0.95,
                            eos_token_ids=EOS2, allowed_tokens=allowed, constraint=_any_dfa(V),
                            rng=jax.random.key(seed))
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    for b in range(B):
      assert allowed[b, toks[b, m[b]]].all(), (seed, b)
  shared = np.zeros(V, bool)  # one [V] mask for every row, 0/1 integers
  shared[[7, 11, 13]] = True
  out = decoding.generate(model, tokens, mask, max_new_tokens=N, temperature=1.0, eos_token_ids=EOS2,
                          allowed_tokens=shared.astype(np.int32), constraint=_any_dfa(V))
  assert set(np.asarray(out.tokens).ravel()) <= {7, 11, 13}


def test_dfa_emits_only_members_of_a_finite_set(hf_dirs):
  model, _ = _load(hf_dirs, "llama")
  V = model.config.vocab_size
  tokens, mask = _prompts(V)
  words = [(10, 11, 12), (10, 13), (14,), (15, 16)]
  dfa = decoding.dfa_from_sequences(words, V, num_states=S_DFA)
  seen = set()
  for seed in range(6):
    out = decoding.generate(model, tokens, mask, max_new_tokens=N, temperature=2.0,
                            eos_token_ids=EOS2, allowed_tokens=np.ones((B, V), bool), constraint=dfa,
                            rng=jax.random.key(seed))
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    for b in range(B):
      row = [int(t) for t in toks[b, m[b]]]
      assert row and row[-1] in EOS2, row  # every word fits in N tokens, so every row finishes
      assert tuple(row[:-1]) in words, row
      seen.add(tuple(row[:-1]))
  assert len(seen) >= 2  # the constraint does not collapse sampling to one answer


def test_dfa_digits_then_eos_with_per_row_start(hf_dirs):
  model, _ = _load(hf_dirs, "llama")
  V = model.config.vocab_size
  tokens, mask = _prompts(V)
  digits = list(range(20, 30))
  # state 0: needs a digit; state 1 (accepting): more digits or EOS; state 2: a "-" (token 31) first.
  table = np.full((S_DFA, V), -1, np.int32)
  table[0, digits] = 1
  table[1, digits] = 1
  table[2, 31] = 0
  dfa = decoding.token_dfa(table, start=np.array([0, 2, 0, 2]), accepting=[1])
  allowed = np.ones((B, V), bool)
  allowed[:, 3] = False  # only EOS id 2 may end a row
  for seed in range(3):
    out = decoding.generate(model, tokens, mask, max_new_tokens=N, temperature=1.0, eos_token_ids=EOS2,
                            allowed_tokens=allowed, constraint=dfa, rng=jax.random.key(seed))
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    for b in range(B):
      row = [int(t) for t in toks[b, m[b]]]
      if b % 2:
        assert row[0] == 31, row
        row = row[1:]
      body = row[:-1] if row[-1] == 2 else row
      assert body and all(t in digits for t in body), row
      assert 2 not in body and 3 not in row


def test_dfa_dead_end_stops_the_row(hf_dirs):
  model, _ = _load(hf_dirs, "llama")
  V = model.config.vocab_size
  tokens, mask = _prompts(V)
  table = np.full((S_DFA, V), -1, np.int32)
  table[0, 40], table[1, 41] = 1, 2  # state 2 has no transition and does not accept
  out = decoding.generate(model, tokens, mask, max_new_tokens=N, temperature=1.0, eos_token_ids=EOS2,
                          allowed_tokens=np.ones((B, V), bool), constraint=decoding.token_dfa(table, 0, []))
  np.testing.assert_array_equal(np.asarray(out.mask), np.arange(N)[None].repeat(B, 0) < 2)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, :3], [[40, 41, PAD]] * B)


# ------------------------------------------------------------------------ model combination
def test_dera_endpoints_equal_the_single_models(hf_dirs):
  aligned, _ = _load(hf_dirs, "llama")
  ref, _ = _load(hf_dirs, "llama_ref")
  tokens, mask = _prompts(aligned.config.vocab_size)
  lam = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  mixed = decoding.generate(decoding.dera(aligned, ref, lam), tokens, mask, max_new_tokens=N)
  a = decoding.generate(aligned, tokens, mask, max_new_tokens=N)
  r = decoding.generate(ref, tokens, mask, max_new_tokens=N)
  want = np.where((lam == 1)[:, None], np.asarray(a.tokens), np.asarray(r.tokens))
  np.testing.assert_array_equal(np.asarray(mixed.tokens), want)
  want_lp = np.where((lam == 1)[:, None], np.asarray(a.logprobs), np.asarray(r.logprobs))
  np.testing.assert_allclose(np.asarray(mixed.logprobs), want_lp, atol=1e-5)


def test_dera_intermediate_lambda_matches_closed_form_mixture(hf_dirs):
  aligned, ta = _load(hf_dirs, "llama")
  ref, tr = _load(hf_dirs, "llama_ref")
  tokens, mask = _prompts(aligned.config.vocab_size)
  lam = np.array([0.25, 0.5, 0.9, 1.6], np.float32)
  rows = [tokens[b, T - LENS[b]:] for b in range(B)]
  # DeRa (arXiv:2402.02992, Eq. 9): softmax(lam z_aligned + (1 - lam) z_ref), float64.
  z = lam[:, None] * _torch_next_logits(ta, rows) + (1 - lam[:, None]) * _torch_next_logits(tr, rows)
  lp = _log_softmax(z)
  greedy = decoding.generate(decoding.dera(aligned, ref, lam), tokens, mask, max_new_tokens=1)
  np.testing.assert_array_equal(np.asarray(greedy.tokens)[:, 0], lp.argmax(-1))
  np.testing.assert_allclose(np.asarray(greedy.logprobs)[:, 0], lp.max(-1), atol=1e-4)
  sampled = decoding.generate(decoding.dera(aligned, ref, lam), tokens, mask, max_new_tokens=1,
                              temperature=1.0, rng=jax.random.key(5))
  tok = np.asarray(sampled.tokens)[:, 0]
  np.testing.assert_allclose(np.asarray(sampled.logprobs)[:, 0], lp[np.arange(B), tok], atol=1e-4)


def test_proxy_tuning_greedy_matches_torch_loop_with_models_of_different_sizes(hf_dirs):
  strong, ts = _load(hf_dirs, "llama")
  small_a, ta = _load(hf_dirs, "llama_ref")
  small_r, tr = _load(hf_dirs, "llama_small")
  tokens, mask = _prompts(strong.config.vocab_size)
  alpha = np.array([0.0, 0.5, 1.0, 2.0], np.float32)
  n = 5
  out = decoding.generate(decoding.proxy_tuning(strong, small_a, small_r, alpha), tokens, mask,
                          max_new_tokens=n)
  # Reference: Liu et al. 2024 (arXiv:2401.08565, Eq. 1), z_s + alpha (z_a - z_r), re-running
  # the torch models on the whole prefix at every step (no cache), in float64.
  rows = [list(tokens[b, T - LENS[b]:]) for b in range(B)]
  for _ in range(n):
    z = (_log_softmax(_torch_next_logits(ts, rows)) + alpha[:, None] * (
        _log_softmax(_torch_next_logits(ta, rows)) - _log_softmax(_torch_next_logits(tr, rows))))
    for b in range(B):
      rows[b].append(int(z[b].argmax()))
  want = np.array([r[-n:] for r in rows])
  np.testing.assert_array_equal(np.asarray(out.tokens), want)


# ------------------------------------------------------------------------ compilation
def test_changing_traced_values_never_recompiles(hf_dirs):
  aligned, _ = _load(hf_dirs, "llama")
  ref, _ = _load(hf_dirs, "llama_ref")
  V = aligned.config.vocab_size
  tokens, mask = _prompts(V, seed=3)
  dfa_words = [(10, 11), (12,)]

  def call(i, lam, temperature, top_k, top_p, allowed_frac, words):
    rng = np.random.default_rng(i)
    allowed = rng.random((B, V)) < allowed_frac
    allowed[:, [2, 10, 11, 12, 13]] = True
    return decoding.generate(
        decoding.dera(aligned, ref, lam), tokens, mask, max_new_tokens=N, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_ids=(2, 3), pad_token_id=1 + i % 2,
        allowed_tokens=allowed, constraint=decoding.dfa_from_sequences(words, V, num_states=8),
        rng=jax.random.key(i))

  call(0, 0.5, 1.0, 0, 1.0, 0.5, dfa_words + [(13,)])  # warm-up: compiles the program
  with _count_compiles() as compiles:
    call(1, np.array([0.1, 0.9, 1.5, -0.2], np.float32), 0.6, 5, 0.9, 0.3, [(13, 12), (11,), (10,)])
    call(2, 0.8, np.array([0.5, 1.0, 2.0, 0.9], np.float32), np.array([0, 3, 7, 1]), 0.5, 0.8,
         [(12, 12), (10, 13), (11,)])
  assert compiles["n"] == 0
  with _count_compiles() as compiles:  # greedy is its own program, compiled once
    decoding.generate(aligned, tokens, mask, max_new_tokens=3, eos_token_ids=(9,), pad_token_id=4,
                      allowed_tokens=np.ones(V, bool))
    decoding.generate(aligned, tokens, mask, max_new_tokens=3, eos_token_ids=(7,),
                      allowed_tokens=np.arange(V) % 3 > 0)
  assert compiles["n"] == 1


# ------------------------------------------------------------------------ sharding
def test_sharded_decoding_on_a_2x2x2_mesh_equals_unsharded(hf_dirs):
  from alignjax import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model, _ = _load(hf_dirs, "llama")
  sharded = models.from_hf(hf_dirs["llama"], mesh=mesh)
  tokens, mask = _prompts(model.config.vocab_size)
  want = decoding.generate(model, tokens, mask, max_new_tokens=N, eos_token_ids=(5,))
  got = decoding.generate(sharded, tokens, mask, max_new_tokens=N, eos_token_ids=(5,), mesh=mesh)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
  assert len(got.tokens.sharding.device_set) == 8 or got.tokens.is_fully_replicated is not None


# ------------------------------------------------------------------------ bad input
def _bad_inputs(V):
  tokens, mask = _prompts(V)
  empty = mask.copy()
  empty[2] = False
  return [
      (dict(cache_len=T + N - 1), "exceeds `cache_len`"),
      (dict(prompt_mask=empty), "`prompt_mask` row 2 has no prompt token"),
      (dict(max_new_tokens=0), "`max_new_tokens` must be > 0"),
      (dict(max_new_tokens=-3), "`max_new_tokens` must be > 0"),
      (dict(max_new_tokens=2.0), "`max_new_tokens` must be an int"),
      (dict(prompt_mask=mask[:, 1:]), "`prompt_mask` shape"),
      (dict(prompt_tokens=tokens[0]), "`prompt_tokens` must be \\[B, T\\]"),
      (dict(prompt_tokens=tokens.astype(np.float32)), "`prompt_tokens` must be integer"),
      (dict(prompt_tokens=tokens + V), "`prompt_tokens` must be in"),
      (dict(allowed_tokens=np.ones(V + 1, bool)), "`allowed_tokens` must be"),
      (dict(allowed_tokens=np.ones((B + 1, V), bool)), "`allowed_tokens` must be"),
      (dict(allowed_tokens=np.zeros((B, V), bool)), "`allowed_tokens` allows no token"),
      (dict(temperature=-1.0), "`temperature` must be"),
      (dict(temperature=np.ones(B + 1)), "`temperature` must be a scalar or"),
      (dict(top_k=-2), "`top_k` must be >= 0"),
      (dict(top_k=2.5), "`top_k` must be an integer"),
      (dict(top_p=0.0), "`top_p` must be in"),
      (dict(top_p=1.5), "`top_p` must be in"),
      (dict(eos_token_ids=(V,)), "`eos_token_ids` must be in"),
      (dict(pad_token_id=-1), "`pad_token_id` must be in"),
      (dict(constraint=decoding.dfa_from_sequences([(1,)], V + 3)), "`constraint.transitions`"),
      (dict(constraint=np.zeros((2, V), np.int32)), "`constraint` must be a TokenDFA"),
  ]


def test_bad_inputs_raise_one_line_errors(hf_dirs):
  model, _ = _load(hf_dirs, "llama")
  V = model.config.vocab_size
  tokens, mask = _prompts(V)
  for kwargs, match in _bad_inputs(V):
    args = dict(prompt_tokens=tokens, prompt_mask=mask, max_new_tokens=N)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match) as info:
      decoding.generate(model, args.pop("prompt_tokens"), args.pop("prompt_mask"), **args)
    msg = str(info.value)
    assert msg.startswith("generate: ") and "\n" not in msg, msg
  with pytest.raises(TypeError, match="`model` must be an alignjax.models model"):
    decoding.generate(object(), tokens, mask, max_new_tokens=N)
  ref, _ = _load(hf_dirs, "llama_ref")
  with pytest.raises(ValueError, match="mixture `weights` must be"):
    decoding.generate(decoding.dera(model, ref, np.ones(B + 1)), tokens, mask, max_new_tokens=N)


def test_gpt2_prompt_beyond_learned_positions_is_refused(hf_dirs):
  model, _ = _load(hf_dirs, "gpt2")
  P = model.config.max_position_embeddings
  tokens = np.ones((1, P), np.int32)
  with pytest.raises(ValueError, match="exceeds the model's maximum sequence length"):
    decoding.generate(model, tokens, np.ones((1, P), bool), max_new_tokens=1)
