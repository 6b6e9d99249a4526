"""ARGS, best-of-N and GenARM on tiny random Hugging Face models, against independent references.

References: the policy's greedy decoding (``decoding.generate``, itself checked against
transformers ``generate``); brute-force recomputation with the torch models -- the
policy's next-token logits of every prefix and transformers' sequence-classification
score of every full candidate sequence ``[prompt, generated, v]`` (no caches), combined
in float64 as the authors' ``generate_step`` does (``rewards * weight + logits``, argmax
or ``softmax(· / temperature)``); ``jax.monitoring`` compile events for recompilation.
"""


import jax
import numpy as np
import pytest

from alignjax import decoding, models
from tests import hf_fixtures
from tests.test_reward_model import load_torch_rm, make_tiny_rm, torch_scores

torch = pytest.importorskip("torch")

B, T, N, K = 3, 6, 5, 5  # one compiled ARGS program (k = K) serves the greedy tests
LENS = (6, 3, 1)
PAD = 0
V = 101
NO_EOS = (V - 1,)  # an EOS id the tiny policy never picks: same program as a real one


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (B, T)).astype(np.int32)
  mask = np.arange(T)[None, :] >= (T - np.asarray(LENS))[:, None]
  return np.where(mask, tokens, PAD).astype(np.int32), mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("reward_decoding")
  policy_dir = hf_fixtures.make_tiny_hf("llama", str(root / "policy"))
  rm_dir = make_tiny_rm("llama", str(root / "rm"), seed=3)
  return dict(policy=models.from_hf(policy_dir), rm=models.from_hf(rm_dir),
              torch_policy=hf_fixtures.load_hf_torch(policy_dir), torch_rm=load_torch_rm(rm_dir),
              rm_dir=rm_dir, policy_dir=policy_dir)


from tests.test_decoding import _count_compiles  # noqa: E402 (one compile counter for the decoding tests)


def _torch_next_logits(torch_model, row):
  with torch.no_grad():
    return torch_model(torch.tensor([list(row)], dtype=torch.long)).logits[0, -1].double().numpy()


def _torch_rewards(torch_rm, rows):
  """transformers' scores of unpadded rows at their last token.

  Candidates may be the pad id (0); transformers would then read the score before it
  (the last non-pad token), the mask-based reward model at it. With rows of real tokens
  only, a pad id that never occurs (-1) makes transformers read the last token too.
  """
  rows = np.asarray(rows)
  pad = torch_rm.config.pad_token_id
  torch_rm.config.pad_token_id = -1
  try:
    return torch_scores(torch_rm, rows, np.ones_like(rows, bool))
  finally:
    torch_rm.config.pad_token_id = pad


# ------------------------------------------------------------------------ ARGS
def test_args_with_zero_weight_equals_policy_greedy(setup):
  tokens, mask = _prompts()
  ref = decoding.generate(setup["policy"], tokens, mask, max_new_tokens=N, eos_token_ids=NO_EOS)
  assert np.asarray(ref.mask).all()
  eos = int(np.asarray(ref.tokens)[0, 2])  # row 0 then stops after 3 tokens
  ref = decoding.generate(setup["policy"], tokens, mask, max_new_tokens=N, eos_token_ids=(eos,))
  out = decoding.args_generate(setup["policy"], setup["rm"], tokens, mask, max_new_tokens=N, k=K, w=0.0,
                               eos_token_ids=(eos,))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.mask, ref.mask)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
  assert not np.asarray(out.mask)[0, 3:].any() and (np.asarray(out.tokens)[0, 3:] == PAD).all()


def test_args_candidates_and_choices_equal_brute_force_full_sequences(setup):
  """Every step's top-k, their logits and rewards, and the choice, recomputed without caches."""
  tokens, mask = _prompts(seed=1)
  k, w = K, 2.5
  out = decoding.args_generate(setup["policy"], setup["rm"], tokens, mask, max_new_tokens=N, k=k, w=w,
                               eos_token_ids=NO_EOS)
  gen, cand = np.asarray(out.tokens), np.asarray(out.candidate_tokens)
  cand_logits, cand_rewards = np.asarray(out.candidate_logits), np.asarray(out.candidate_rewards)
  for b in range(B):
    prompt = list(tokens[b][mask[b]])
    for t in range(N):
      prefix = prompt + list(gen[b, :t])
      z = _torch_next_logits(setup["torch_policy"], prefix)
      top = np.argsort(-z, kind="stable")[:k]
      np.testing.assert_array_equal(cand[b, t], top)
      np.testing.assert_allclose(cand_logits[b, t], z[top], atol=1e-4, rtol=1e-4)
      r = _torch_rewards(setup["torch_rm"], [prefix + [int(v)] for v in top])
      np.testing.assert_allclose(cand_rewards[b, t], r, atol=1e-4, rtol=1e-4)
      assert gen[b, t] == top[np.argmax(z[top] + w * r)]  # the authors' rewards * weight + logits


def test_args_picks_the_token_a_reward_model_prefers(setup):
  """A reward model whose score peaks at one token (its residual stream is the token's
  embedding) makes ARGS pick that token whenever it is a candidate; greedy does not."""
  rm = models.from_hf(setup["rm_dir"])
  for layer in rm.backbone.layers:  # blocks add nothing: hidden = final_norm(embedding)
    layer.attn.o[...] = 0 * layer.attn.o[...]
    layer.mlp.down[...] = 0 * layer.mlp.down[...]
  tokens, mask = _prompts()
  tokens, mask = np.repeat(tokens[:1], B, 0), np.repeat(mask[:1], B, 0)
  z = _torch_next_logits(setup["torch_policy"], list(tokens[0]))
  target = int(np.argsort(-z, kind="stable")[2])  # the policy's third choice
  h = np.asarray(rm.backbone(np.array([[target]], np.int32), return_hidden=True))[0, 0]
  rm.score[...] = (20.0 * h / np.linalg.norm(h))[:, None]
  all_tokens = np.arange(V, dtype=np.int32)[:, None]
  r_all = np.asarray(rm(all_tokens))
  assert r_all.argmax() == target
  out = decoding.args_generate(setup["policy"], rm, tokens, mask, max_new_tokens=N, k=K, w=50.0,
                               eos_token_ids=NO_EOS)
  gen, cand = np.asarray(out.tokens), np.asarray(out.candidate_tokens)
  np.testing.assert_array_equal(gen[:, 0], target)
  is_cand = (cand == target).any(-1)
  np.testing.assert_array_equal(gen[is_cand], target)
  greedy = decoding.generate(setup["policy"], tokens, mask, max_new_tokens=N, eos_token_ids=NO_EOS)
  assert (np.asarray(greedy.tokens)[:, 0] != target).all()


def test_args_sampling_follows_softmax_of_scores_over_candidates(setup):
  rows = 4000  # the program of test_args_never_recompiles_... too
  tokens, mask = _prompts(seed=2)
  prompt = np.repeat(tokens[1:2], rows, 0)
  pmask = np.repeat(mask[1:2], rows, 0)
  k, w, temp = 5, 1.5, 0.7
  out = decoding.args_generate(setup["policy"], setup["rm"], prompt, pmask, max_new_tokens=1, k=k, w=w,
                               temperature=temp, eos_token_ids=NO_EOS, rng=jax.random.key(3))
  bare = list(tokens[1][mask[1]])
  z = _torch_next_logits(setup["torch_policy"], bare)
  top = np.argsort(-z, kind="stable")[:k]
  r = _torch_rewards(setup["torch_rm"], [bare + [int(v)] for v in top])
  s = (z[top] + w * r) / temp
  p = np.exp(s - s.max())
  p /= p.sum()
  first = np.asarray(out.tokens)[:, 0]
  freq = np.array([(first == v).mean() for v in top])
  assert freq.sum() == 1.0
  # 4 standard errors per candidate (binomial), 4000 draws.
  np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / rows) + 1e-3)
  want_lp = np.log(np.array([p[list(top).index(v)] for v in first]))
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], want_lp, atol=1e-4)


def test_args_never_recompiles_when_w_or_temperature_change(setup):
  rows = 4000  # the program of the sampling test above
  tokens, mask = _prompts(seed=5)
  prompt, pmask = np.repeat(tokens, rows // B + 1, 0)[:rows], np.repeat(mask, rows // B + 1, 0)[:rows]
  call = lambda w, t, seed: decoding.args_generate(setup["policy"], setup["rm"], prompt, pmask,
                                                   max_new_tokens=1, k=5, w=w, temperature=t,
                                                   eos_token_ids=NO_EOS, rng=jax.random.key(seed))
  call(0.5, 0.0, 0)  # compiled already by the sampling test (or here, once)
  with _count_compiles() as compiles:
    call(2.0, 0.0, 0)
    call(-1.0, 0.8, 1)
    call(np.linspace(0.0, 3.0, rows), np.linspace(0.0, 2.0, rows), 2)
  assert compiles["n"] == 0


# ------------------------------------------------------------------------ best-of-N
def test_best_of_n_returns_the_argmax_of_brute_force_rewards(setup):
  tokens, mask = _prompts(seed=4)
  n, key = 4, jax.random.key(7)
  out = decoding.best_of_n(setup["policy"], setup["rm"], tokens, mask, n=n, max_new_tokens=N,
                           temperature=1.0, eos_token_ids=(5, 6, 7, 8), rng=key)
  # The samples are the sampler's: generate on the repeated rows with the same key.
  rep = decoding.generate(setup["policy"], np.repeat(tokens, n, 0), np.repeat(mask, n, 0),
                          max_new_tokens=N, temperature=1.0, eos_token_ids=(5, 6, 7, 8), rng=key)
  np.testing.assert_array_equal(out.samples.tokens, rep.tokens)
  gen, gmask = np.asarray(rep.tokens), np.asarray(rep.mask)
  want = np.zeros((B, n))
  for b in range(B):
    for j in range(n):
      row = list(tokens[b][mask[b]]) + list(gen[b * n + j][gmask[b * n + j]])
      want[b, j] = _torch_rewards(setup["torch_rm"], [row])[0]
  np.testing.assert_allclose(out.scores, want, atol=1e-4, rtol=1e-4)
  best = want.argmax(-1)
  np.testing.assert_array_equal(out.index, best)
  np.testing.assert_array_equal(out.tokens, gen[np.arange(B) * n + best])
  np.testing.assert_array_equal(out.mask, gmask[np.arange(B) * n + best])

  # Any scoring function: the number of tokens > 50 in prompt + completion.
  score = lambda toks, m: np.sum((np.asarray(toks) > 50) & np.asarray(m), -1).astype(np.float32)
  out2 = decoding.best_of_n(setup["policy"], score, tokens, mask, n=n, max_new_tokens=N,
                            eos_token_ids=(5, 6, 7, 8), rng=key)
  full = np.concatenate([np.repeat(tokens, n, 0), gen], 1)
  full_mask = np.concatenate([np.repeat(mask, n, 0), gmask], 1)
  counts = score(full, full_mask).reshape(B, n)
  np.testing.assert_array_equal(out2.scores, counts)
  np.testing.assert_array_equal(out2.index, counts.argmax(-1))


def test_best_of_n_and_args_on_a_2x2x2_mesh_equal_unsharded(setup):
  """The rows split over the mesh's batch axes (policy and reward model sharded) give the same outputs."""
  from alignjax import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  policy = models.from_hf(setup["policy_dir"], mesh=mesh)
  rm = models.from_hf(setup["rm_dir"], mesh=mesh)
  tokens, mask = _prompts(seed=4)
  key = jax.random.key(7)
  kw = dict(n=4, max_new_tokens=N, temperature=1.0, eos_token_ids=(5, 6, 7, 8), rng=key)  # 12 rows
  want = decoding.best_of_n(setup["policy"], setup["rm"], tokens, mask, **kw)
  got = decoding.best_of_n(policy, rm, tokens, mask, mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(got.samples.tokens), np.asarray(want.samples.tokens))
  np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.index), np.asarray(want.index))
  assert len(got.samples.tokens.sharding.device_set) == 8

  tokens4 = np.concatenate([tokens, tokens[:1]])  # 4 rows: one per (data, fsdp) shard
  mask4 = np.concatenate([mask, mask[:1]])
  kw = dict(max_new_tokens=N, k=K, w=2.0, eos_token_ids=NO_EOS)
  want = decoding.args_generate(setup["policy"], setup["rm"], tokens4, mask4, **kw)
  got = decoding.args_generate(policy, rm, tokens4, mask4, mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.candidate_tokens), np.asarray(want.candidate_tokens))
  np.testing.assert_allclose(np.asarray(got.candidate_rewards), np.asarray(want.candidate_rewards),
                             atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ GenARM
def test_genarm_samples_from_base_times_arm_to_the_alpha_at_temperature(setup, tmp_path):
  """Every sampled token's log-prob is log softmax((log p_base + α log p_ARM) / T), from torch."""
  arm_dir = hf_fixtures.make_tiny_hf("llama", str(tmp_path / "arm"), seed=5)
  arm, torch_arm = models.from_hf(arm_dir), hf_fixtures.load_hf_torch(arm_dir)
  tokens, mask = _prompts(seed=6)
  alpha, temp = np.array([0.5, 1.0, 2.0], np.float32), 0.5
  out = decoding.generate(decoding.genarm(setup["policy"], arm, alpha), tokens, mask, max_new_tokens=3,
                          temperature=temp, rng=jax.random.key(9))
  gen = np.asarray(out.tokens)
  lsm = lambda z: z - np.log(np.exp(z - z.max()).sum()) - z.max()
  for b in range(B):
    prefix = list(tokens[b][mask[b]])
    for t in range(3):
      z = (lsm(_torch_next_logits(setup["torch_policy"], prefix))
           + alpha[b] * lsm(_torch_next_logits(torch_arm, prefix))) / temp
      np.testing.assert_allclose(float(out.logprobs[b, t]), lsm(z)[gen[b, t]], atol=1e-4)
      prefix.append(int(gen[b, t]))


def test_bad_inputs_raise_one_line_errors(setup):
  tokens, mask = _prompts()
  cases = [
      (lambda: decoding.args_generate(setup["policy"], setup["rm"], tokens, mask, max_new_tokens=2, k=0, w=1.0),
       ValueError, "`k`"),
      (lambda: decoding.args_generate(setup["policy"], setup["rm"], tokens, mask, max_new_tokens=2, k=V + 1,
                                      w=1.0), ValueError, "`k`"),
      (lambda: decoding.args_generate(setup["policy"], object(), tokens, mask, max_new_tokens=2, k=2, w=1.0),
       TypeError, "`rm`"),
      (lambda: decoding.args_generate(setup["policy"], setup["rm"], tokens, mask, max_new_tokens=2, k=2,
                                      w=np.ones(5)), ValueError, "`w`"),
      (lambda: decoding.args_generate(setup["policy"], setup["rm"], tokens, mask, max_new_tokens=2, k=2, w=1.0,
                                      temperature=-1.0), ValueError, "`temperature`"),
      (lambda: decoding.best_of_n(setup["policy"], setup["rm"], tokens, mask, n=0, max_new_tokens=2,
                                  rng=jax.random.key(0)), ValueError, "`n`"),
      (lambda: decoding.genarm(setup["policy"], setup["policy"], np.ones((2, 2))), ValueError, "`alpha`"),
  ]
  for fn, exc, match in cases:
    with pytest.raises(exc, match=match) as e:
      fn()
    assert "\n" not in str(e.value)
