"""ASAp (grammar-aligned sampling) on a tiny random Llama and a small finite grammar.

References: exact enumeration with the torch model (transformers, float64 log-softmax of
full forwards): the model's distribution conditioned on the grammar,
P*(w) ∝ p(w EOS | x) over the words w of the language, and the distribution that plain
masking (grammar-constrained decoding) samples, Q(w) = Π_t p(w_t | ·) / Σ_{allowed} p;
the trie's estimates against the authors' update rule (oracle_trie.TrieNode:
success(u) = Σ_{allowed v} p(v | u) · success(u v), unexplored children 1) recomputed
from the torch probabilities; ``jax.monitoring`` compile events.
"""


import jax
import numpy as np
import pytest

from alignjax import decoding, models
from alignjax.decoding.grammar_aligned import ASAp, Trie
from tests import hf_fixtures

torch = pytest.importorskip("torch")

PROMPT = [5, 17, 33]
EOS = 2
V = 101
N = 3
WORDS = [(10, 20), (10, 21), (10, 22), (11, 30), (12, 40)]  # all of length 2, then EOS
TV_TOL = 0.05  # 2000 samples over 5 words: sampling noise alone gives TV ≈ 0.017 on average


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path = hf_fixtures.make_tiny_hf("llama", str(tmp_path_factory.mktemp("asap") / "llama"))
  torch_model = hf_fixtures.load_hf_torch(path)
  cache = {}

  def logp(prefix):
    """float64 log-softmax of the model's next-token logits after PROMPT + prefix."""
    key = tuple(prefix)
    if key not in cache:
      with torch.no_grad():
        logits = torch_model(torch.tensor([PROMPT + list(prefix)])).logits[0, -1].double()
      cache[key] = torch.log_softmax(logits, -1).numpy()
    return cache[key]

  dfa = decoding.dfa_from_sequences(WORDS, V)

  def allowed(prefix):
    state = 0
    for t in prefix:
      state = int(dfa.transitions[state, t])
    a = np.asarray(dfa.transitions[state]) >= 0
    a[EOS] = bool(dfa.accepting[state])
    return a

  exact = np.array([np.exp(sum(logp(w[:i])[t] for i, t in enumerate(w + (EOS,)))) for w in WORDS])
  masked = []
  for w in WORDS:
    q = 1.0
    for i, t in enumerate(w + (EOS,)):
      p = np.exp(logp(w[:i]))
      q *= p[t] / p[allowed(w[:i])].sum()
    masked.append(q)
  return dict(model=models.from_hf(path), dfa=dfa, logp=logp, allowed=allowed,
              Z=exact.sum(), P=exact / exact.sum(), Q=np.array(masked))


def _words(out):
  toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
  return [tuple(int(x) for x in t[m]) for t, m in zip(toks, mask)]


def _empirical(words):
  return np.array([sum(w == word + (EOS,) for w in words) for word in WORDS]) / len(words)


def _tv(p, q):
  return 0.5 * np.abs(p - q).sum()


from tests.test_decoding import _count_compiles  # noqa: E402 (one compile counter for the decoding tests)


def test_asap_converges_to_the_grammar_conditioned_distribution_where_masking_does_not(setup):
  P, Q = setup["P"], setup["Q"]
  assert _tv(P, Q) > 0.15  # the grammar distorts plain masking on this model
  asap = ASAp(setup["model"], setup["dfa"], max_new_tokens=N, eos_token_ids=(EOS,))
  prompt = np.array(PROMPT)
  first = asap.sample(prompt, jax.random.key(0), num_samples=20)  # the authors' one-at-a-time
  # The first sample comes from the empty trie: plain masking, log Q(w).
  w0 = _words(first)[0]
  assert w0[-1] == EOS
  np.testing.assert_allclose(float(np.sum(first.logprobs[0])), np.log(Q[WORDS.index(w0[:-1])]), atol=1e-4)
  # Every prefix of the finite language is explored by now: the estimates are exact.
  trie = asap.trie(prompt)
  np.testing.assert_allclose(trie.efg(), setup["Z"], rtol=1e-4)
  with _count_compiles() as compiles:
    asap.sample(prompt, jax.random.key(1), num_samples=3)  # same program, new tables
  assert compiles["n"] == 0
  late = asap.sample(prompt, jax.random.key(2), num_samples=2000, batch_size=400)
  words = _words(late)
  # Each sample's log-prob under the distribution it was drawn from is log P*(w).
  idx = np.array([WORDS.index(w[:-1]) for w in words])
  np.testing.assert_allclose(np.asarray(late.logprobs).sum(-1), np.log(P[idx]), atol=1e-4)
  np.testing.assert_allclose(np.asarray(late.model_logprobs).sum(-1),
                             np.log(P[idx] * setup["Z"]), atol=1e-4)  # log p(w EOS | x)
  emp = _empirical(words)
  assert emp.sum() == 1.0
  assert _tv(emp, P) < TV_TOL
  # Plain masking, as many samples: stays at Q, far from P*.
  rows = 2000
  gcd = decoding.generate(setup["model"], np.repeat(prompt[None], rows, 0), np.ones((rows, 3), bool),
                          max_new_tokens=N, temperature=1.0, eos_token_ids=(EOS,), constraint=setup["dfa"],
                          rng=jax.random.key(3))
  emp_gcd = _empirical(_words(gcd))
  assert _tv(emp_gcd, Q) < TV_TOL
  assert _tv(emp_gcd, P) > _tv(P, Q) - TV_TOL > 0.1


def test_trie_estimates_follow_the_authors_update_rule(setup):
  """After a few samples, every expanded prefix's estimate is Σ_{allowed v} p(v) · success(child)."""
  asap = ASAp(setup["model"], setup["dfa"], max_new_tokens=N, eos_token_ids=(EOS,))
  prompt = np.array(PROMPT)
  out = asap.sample(prompt, jax.random.key(11), num_samples=3)
  trie = asap.trie(prompt)
  explored = set()
  for w in _words(out):
    for i in range(len(w)):
      explored.add(w[:i])  # prefixes at which a token was chosen

  def success(prefix):
    if prefix not in explored:
      return 1.0  # the authors' default for a node never expanded (and EOS children)
    p = np.exp(setup["logp"](prefix))
    a = setup["allowed"](prefix)
    return sum(p[v] * (success(prefix + (v,)) if v != EOS else 1.0) for v in np.flatnonzero(a))

  for prefix in explored:
    np.testing.assert_allclose(trie.efg(prefix), success(prefix), rtol=1e-4)
  assert len(explored) < 9 and trie.efg() > setup["Z"]  # still an over-approximation


def test_trie_capacity_grows_and_dead_ends_count_zero():
  """Host-side Trie bookkeeping on synthetic paths: rows, doubling tables, propagation."""
  trie = Trie(vocab_size=6, capacity=1)
  lm = np.log
  # Path 3, 4, EOS(5): masses at the three visited prefixes; model probs of tokens taken.
  trie.update(np.array([3, 4, 5]), np.array([True, True, True]), lm([0.5, 0.4, 0.9]),
              lm([0.2, 0.3, 0.1]), (5,))
  assert len(trie) == 3 and trie.child_row.shape == (4, 6)
  e2 = 0.9
  e1 = 0.4 + 0.3 * (e2 - 1)
  e0 = 0.5 + 0.2 * (e1 - 1)
  np.testing.assert_allclose([trie.efg((3, 4)), trie.efg((3,)), trie.efg()], [e2, e1, e0])
  # A dead end after token 1: no allowed token there (log-mass -inf), the row stopped.
  trie.update(np.array([1, 0, 0]), np.array([True, False, False]), np.array([lm(0.5), -np.inf, 0.0]),
              lm([0.25, 1.0, 1.0]), (5,))
  np.testing.assert_allclose(trie.efg((1,)), 0.0)
  np.testing.assert_allclose(trie.efg(), e0 + 0.25 * (0.0 - 1))
  assert trie.log_efg[trie.find((1,))] == -np.inf
  np.testing.assert_array_equal(trie.child_row[0, [1, 3]], [trie.find((1,)), trie.find((3,))])


def test_trie_with_the_dfa_sums_complete_nodes_over_their_children():
  """A node whose allowed tokens are all expanded gets Σ p_c EFG_c, as the authors' TrieNode sums
  its allowed children: the sampler's float32 log-mass of the allowed tokens (1e-7 off their
  p_c here) must not enter it, or a tiny EFG (1e-6) comes out several percent off."""
  eos = 5
  dfa = decoding.dfa_from_sequences([(3, 4), (1,)], 6)  # root allows 1 and 3; (3,) allows 4 only
  trie = Trie(vocab_size=6, capacity=4, constraint=dfa, eos_token_ids=(eos,))
  p3, p4, p_eos = 0.2, 0.3, 1e-6
  lm = np.log
  trie.update(np.array([3, 4, eos]), np.ones(3, bool), lm([0.45, p4 * (1 + 1e-7), p_eos]), lm([p3, p4, p_eos]),
              (eos,))
  np.testing.assert_allclose(trie.efg((3, 4)), p_eos, rtol=1e-12)  # only EOS allowed: its mass
  np.testing.assert_allclose(trie.efg((3,)), p4 * p_eos, rtol=1e-12)  # complete: 4 is its only token
  # The root is not complete (token 1 unexplored): its 0.45 - p3 counts 1 per unit of mass.
  np.testing.assert_allclose(trie.efg(), (0.45 - p3) + p3 * p4 * p_eos, rtol=1e-12)
  trie.update(np.array([1, eos, 0]), np.array([True, True, False]), lm([0.45, 0.25, 1.0]), lm([0.25, 0.25, 1.0]),
              (eos,))
  np.testing.assert_allclose(trie.efg(), p3 * p4 * p_eos + 0.25 * 0.25, rtol=1e-12)  # complete now
  np.testing.assert_allclose(trie.log_efg[0], np.log(p3 * p4 * p_eos + 0.25 * 0.25), rtol=1e-6)


def test_bad_inputs_raise_one_line_errors(setup):
  dfa = setup["dfa"]
  cases = [
      (lambda: ASAp(setup["model"], "dfa", max_new_tokens=3, eos_token_ids=(EOS,)), TypeError, "constraint"),
      (lambda: ASAp(setup["model"], dfa, max_new_tokens=3, eos_token_ids=()), ValueError, "eos_token_ids"),
      (lambda: ASAp(setup["model"], dfa._replace(start=np.zeros(2, np.int32)), max_new_tokens=3,
                    eos_token_ids=(EOS,)), ValueError, "start"),
      (lambda: ASAp(setup["model"], dfa, max_new_tokens=3, eos_token_ids=(EOS,)).sample(
          np.zeros((2, 3), np.int32), jax.random.key(0)), ValueError, "prompt_tokens"),
      (lambda: ASAp(setup["model"], dfa, max_new_tokens=3, eos_token_ids=(EOS,)).sample(
          np.array(PROMPT), jax.random.key(0), num_samples=0), ValueError, "num_samples"),
  ]
  for fn, exc, match in cases:
    with pytest.raises(exc, match=match) as e:
      fn()
    assert "\n" not in str(e.value)
