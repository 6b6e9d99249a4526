"""The reward--KL frontier study: estimators against exact enumeration, data sets, the whole study.

References:
* the KL/reward estimators against float64 NumPy sums over every possible response
  (a 3-token vocabulary and 3-token responses: 27 sequences per prompt), with each
  sequence's probability from the chain rule over the model's full next-token
  distributions (``log_softmax`` in NumPy of the model's logits);
* DeRa samples against the exact mixture ``softmax(lam*log p_a + (1-lam)*log p_b)``
  (Liu et al. 2024, arXiv:2402.02992, Eq. 9) computed in NumPy;
* the cluster standard error against its textbook formula;
* the best-of-n log-ratio estimate against the best-of-n distribution of a
  score pool enumerated over every n-tuple of draws;
* the test-sized study against properties that must hold (not tuned numbers).
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import decoding
from alignjax.data import arrays_tfds, reviews
from alignjax.data.synthetic import EOS, PAD
from alignjax.models import ModelConfig, Transformer
from alignjax.study import evaluation
from tests import launcher_zygote, notebooks

V, L = 3, 3  # vocabulary and response length of the enumerable toy


def _toy_model(seed: int, scale: float = 12.0) -> Transformer:
  """A tiny Llama over 3 tokens with a sharpened head (far from uniform next-token distributions)."""
  m = Transformer(ModelConfig.llama_tiny(vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=2,
                                         num_kv_heads=1, num_layers=1), rngs=nnx.Rngs(seed))
  m.lm_head.value = m.lm_head.value * scale
  return m


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _exact_sequence_logps(model, prompt, lam_mix=None):
  """{response tuple: log p(response | prompt)} for all V**L responses, float64 chain rule.

  ``lam_mix=(lam, other)``: the DeRa mixture of ``model`` (aligned) and ``other`` (reference).
  """
  seqs = list(itertools.product(range(V), repeat=L))
  full = np.array([list(prompt) + list(s) for s in seqs], np.int32)
  logp = _np_log_softmax(model(jnp.asarray(full)))
  if lam_mix is not None:
    lam, other = lam_mix
    logp = _np_log_softmax(lam * logp + (1 - lam) * _np_log_softmax(other(jnp.asarray(full))))
  P = len(prompt)
  out = {}
  for i, s in enumerate(seqs):
    out[s] = sum(logp[i, P - 1 + t, s[t]] for t in range(L))
  return out


def _toy_reward(tokens, mask):
  """Fraction of response tokens equal to 1."""
  return ((np.asarray(tokens) == 1) & mask).sum(1) / np.maximum(mask.sum(1), 1)


def _exact_moments(exact_pi, exact_ref):
  """Exact mean and std of the reward and of ``log pi - log ref`` (mean = KL(pi || ref)), under pi."""
  er = er2 = ekl = ekl2 = 0.0
  for s, lp in exact_pi.items():
    p = np.exp(lp)
    r = np.mean(np.array(s) == 1)
    d = lp - exact_ref[s]
    er, er2 = er + p * r, er2 + p * r * r
    ekl, ekl2 = ekl + p * d, ekl2 + p * d * d
  return er, np.sqrt(er2 - er ** 2), ekl, np.sqrt(ekl2 - ekl ** 2)


@pytest.fixture(scope="module")
def toy():
  pi, ref = _toy_model(1), _toy_model(2)
  return pi, ref, evaluation.make_scorer(ref)


def test_sample_logprobs_and_scores_match_exact_enumeration(toy):
  pi, ref, scorer = toy
  prompts = np.array([[0, 2], [1, 1]], np.int32)
  scores = evaluation.sample_and_score(
      pi, ref, prompts, np.ones_like(prompts, bool), num_samples=64, max_new_tokens=L,
      rng=jax.random.key(0), reward_fn=_toy_reward, scorer=scorer)
  assert scores.tokens.shape == (128, L) and scores.mask.all()
  for row in range(128):
    prompt = tuple(prompts[row // 64])
    s = tuple(int(t) for t in scores.tokens[row])
    if row % 64 == 0:
      exact_pi, exact_ref = _exact_sequence_logps(pi, prompt), _exact_sequence_logps(ref, prompt)
    np.testing.assert_allclose(scores.logps[row], exact_pi[s], atol=2e-4)
    np.testing.assert_allclose(scores.reference_logps[row], exact_ref[s], atol=2e-4)
    np.testing.assert_allclose(scores.rewards[row], np.mean(np.array(s) == 1))


def test_kl_and_reward_estimates_match_closed_form(toy):
  pi, ref, scorer = toy
  prompt = (0, 2)
  k = 512
  scores = evaluation.sample_and_score(
      pi, ref, np.array([prompt] * 32, np.int32), np.ones((32, 2), bool), num_samples=k // 32,
      max_new_tokens=L, rng=jax.random.key(1), reward_fn=_toy_reward, scorer=scorer)
  er, r_sd, ekl, kl_sd = _exact_moments(_exact_sequence_logps(pi, prompt), _exact_sequence_logps(ref, prompt))
  assert ekl > 0.1  # the toy models differ
  summary = evaluation.summarize(scores)
  # Monte Carlo estimates within 4 standard errors (sd / sqrt(k)) of the exact values.
  assert abs(summary["kl"] - ekl) < 4 * kl_sd / np.sqrt(k)
  assert abs(summary["reward"] - er) < 4 * r_sd / np.sqrt(k)
  # The cluster standard error (32 clusters of one prompt: iid samples) is close to the exact one.
  np.testing.assert_allclose(summary["kl_se"], kl_sd / np.sqrt(k), rtol=0.4)
  # The per-sample KL terms' spread matches the exact one.
  np.testing.assert_allclose(scores.log_ratios.std(), kl_sd, rtol=0.15)


def test_dera_samples_follow_the_exact_mixture(toy):
  pi, ref, scorer = toy
  prompt, lam = (1, 1), 0.5
  scores = evaluation.sample_and_score(
      decoding.dera(pi, ref, lam), ref, np.array([prompt] * 2, np.int32), np.ones((2, 2), bool),
      num_samples=64, max_new_tokens=L, rng=jax.random.key(2), reward_fn=_toy_reward, scorer=scorer)
  exact_mix = _exact_sequence_logps(pi, prompt, lam_mix=(lam, ref))
  for row in range(128):
    s = tuple(int(t) for t in scores.tokens[row])
    np.testing.assert_allclose(scores.logps[row], exact_mix[s], atol=2e-4)


def test_dera_at_lambda_zero_samples_the_reference_exactly(toy):
  pi, ref, _ = toy
  prompts = np.repeat(np.array([[0, 2], [1, 0], [2, 2], [1, 1]], np.int32), 32, axis=0)  # 128 rows: shapes of above
  mask = np.ones_like(prompts, bool)
  key = jax.random.key(3)
  a = decoding.generate(ref, prompts, mask, max_new_tokens=L, temperature=1.0, rng=key)
  b = decoding.generate(decoding.dera(pi, ref, 0.0), prompts, mask, max_new_tokens=L, temperature=1.0, rng=key)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_cluster_mean_matches_formula():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(10, 4)) + rng.normal(size=(10, 1))
  est = evaluation.cluster_mean(v.reshape(-1), 10)
  means = v.mean(1)
  np.testing.assert_allclose(est.mean, v.mean())
  np.testing.assert_allclose(est.se, np.sqrt(((means - means.mean()) ** 2).sum() / 9 / 10))
  with pytest.raises(ValueError, match="num_prompts"):
    evaluation.cluster_mean(np.ones(7), 2)


def test_sequence_batch_left_padded_prompt_scores_like_unpadded(toy):
  _, ref, scorer = toy
  resp = np.array([[1, 0, 2], [1, 0, 2]], np.int32)
  a = scorer(ref, np.array([[0, 2], [0, 2]]), np.ones((2, 2), bool), resp, np.array([[1, 1, 1], [1, 1, 0]], bool))
  b = scorer(ref, np.array([[0, 0, 2], [0, 0, 2]]), np.array([[0, 1, 1], [0, 1, 1]], bool), resp,
             np.array([[1, 1, 1], [1, 1, 0]], bool))
  np.testing.assert_allclose(a, b, atol=1e-5)
  exact = _exact_sequence_logps(ref, (0, 2))[(1, 0, 2)]
  np.testing.assert_allclose(a[0], exact, atol=2e-4)


# ----------------------------------------------------------------------------- data


def test_arrays_tfds_round_trip_keeps_order_and_metadata(tmp_path):
  task = reviews.ReviewsTask()
  train, ev = task.sft_data(40, seed=0), task.sft_data(8, seed=1)
  path = arrays_tfds.write_arrays(str(tmp_path / "ds"), {"train": train, "eval": ev}, metadata={"vocab_size": 44})
  src = arrays_tfds.open_arrays(path, "train")
  assert len(src) == 40 and len(arrays_tfds.open_arrays(path, "eval")) == 8
  for i in (0, 17, 39):
    for k, v in train.items():
      np.testing.assert_array_equal(np.asarray(src[i][k]), v[i])
  assert arrays_tfds.read_metadata(path) == {"vocab_size": 44, "splits": {"eval": 8, "train": 40}}
  # grain reads it directly.
  import grain
  batch = grain.MapDataset.source(src).batch(8)[1]
  np.testing.assert_array_equal(batch["chosen_tokens"], train["chosen_tokens"][8:16])
  # A second write is a no-op (resumable pipelines call it every run).
  mtime = os.path.getmtime(os.path.join(path, "alignjax_arrays.json"))
  arrays_tfds.write_arrays(path, {"train": ev})
  assert os.path.getmtime(os.path.join(path, "alignjax_arrays.json")) == mtime
  with pytest.raises(ValueError, match="split"):
    arrays_tfds.open_arrays(path, "test")
  with pytest.raises(ValueError, match="leading length"):
    arrays_tfds.write_arrays(str(tmp_path / "bad"), {"train": {"a": np.zeros(3), "b": np.zeros(4)}})


# ----------------------------------------------------------------------------- the whole study (test-sized)


class _Stopped(Exception):
  """Raised by the study fixture's ``train_fn`` at the last run: the study stops there, as if killed."""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """The test-sized study of configs/study_test.py, run once for the module: stopped at its last run
  here, then resumed to the end by colab/frontier_study.ipynb in a fresh kernel (the notebook's own test).

  Returns ``(cfg, result, calls)``: ``result`` is the notebook's ``run_study`` result (JSON round trip),
  ``calls`` the run directories trained in this process.
  """
  from alignjax.study import frontier
  from alignjax.training import loop
  from configs import study_test

  cfg = frontier.build(study_test.get_config())
  workdir = str(tmp_path_factory.mktemp("study"))
  last = os.path.join(workdir, "runs", frontier.plan_runs(cfg)[-1].name)
  calls = []

  def train(run_cfg, *, workdir):
    if workdir == last:
      raise _Stopped(workdir)
    calls.append(workdir)
    return loop.run(run_cfg, workdir=workdir, handle_signals=False)

  with pytest.raises(_Stopped):
    frontier.run_study(cfg, workdir=workdir, train_fn=train, progress=False)
  # The notebook builds the same config and runs the study in its tempfile.mkdtemp(prefix="frontier_")
  # directory: this one.
  result = notebooks.execute("frontier_study.ipynb", tmp_path=tmp_path_factory.mktemp("kernel_tmp"),
                             workdir=("frontier_", workdir), save="result")
  return cfg, result, calls


def _rows(result, method):
  return sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r.get("beta") or 0)


def test_study_trains_every_run_once_and_writes_outputs(study):
  from alignjax.study import frontier
  cfg, result, calls = study
  specs = frontier.plan_runs(cfg)
  # Every run trained once: all but the last here (+ SFT, + critical tokens' two contrast models), the
  # last in the notebook's kernel, which skipped the others.
  assert len(calls) == len(set(calls)) == len(specs) + 2 == len(result["skipped"])
  assert result["trained"] == [specs[-1].name]
  assert sum(s.name.startswith("reverse_dpo") for s in specs) == 1  # shared by both AlignDistil variants
  methods = {r["method"] for r in result["rows"]}
  assert methods == set(cfg.methods) | {"sft", "dera", "best_of_n", "args"}
  assert not [r for r in result["rows"] if r["name"].startswith("genarm_b")]  # the ARM is not a policy point
  lines = open(result["results"]).read().splitlines()
  assert len(lines) == len(result["rows"]) and all(json.loads(l)["kl"] is not None for l in lines)
  table = open(result["table"]).read()
  assert table.startswith("| method |") and all(m in table for m in cfg.methods)


def test_every_method_reward_at_largest_beta_is_within_sampled_range(study):
  cfg, result, _ = study
  for method in cfg.methods:
    top = _rows(result, method)[-1]
    assert top["beta"] == max(cfg.betas)
    assert top["sampled_reward_min"] <= top["reward"] <= top["sampled_reward_max"], top


def test_dpo_beats_the_sft_model_and_kl_grows_as_beta_falls(study):
  _, result, _ = study
  sft = _rows(result, "sft")[0]
  dpo = _rows(result, "dpo")  # ascending beta
  for r in dpo:
    assert r["reward"] > sft["reward"] + 2 * np.hypot(r["reward_se"], sft["reward_se"]), (r, sft)
  kls = [r["kl"] for r in dpo]
  assert all(a > b for a, b in zip(kls, kls[1:])), kls  # smaller beta, larger KL


def test_kl_is_nonnegative_up_to_estimator_noise(study):
  _, result, _ = study
  for r in result["rows"]:
    assert r["kl"] >= -3 * r["kl_se"] - 1e-6, r
  sft = _rows(result, "sft")[0]
  assert abs(sft["kl"]) < 1e-4  # the SFT model against itself


def test_dera_at_lambda_zero_equals_the_sft_samples(study):
  from alignjax.training import loop
  cfg, result, _ = study
  dera = sorted(_rows(result, "dera"), key=lambda r: r["lambda"])
  sft = _rows(result, "sft")[0]
  assert dera[0]["lambda"] == 0.0 and dera[0]["reward"] == sft["reward"]
  # Same rng, same prompts -> identical tokens.
  task = cfg.task
  sft_model = loop.load_policy(os.path.join(result["workdir"], "runs", "sft"))
  dpo_model = loop.load_policy(os.path.join(result["workdir"], "runs", f"dpo_b{cfg.dera_model_beta:g}"))
  prompts, mask = task.prompts(task.sample_topics(16, 5))
  key = jax.random.key(7)
  a = decoding.generate(sft_model, prompts, mask, max_new_tokens=task.max_len + 1, temperature=1.0,
                        eos_token_ids=(EOS,), pad_token_id=PAD, rng=key)
  b = decoding.generate(decoding.dera(dpo_model, sft_model, 0.0), prompts, mask, max_new_tokens=task.max_len + 1,
                        temperature=1.0, eos_token_ids=(EOS,), pad_token_id=PAD, rng=key)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  # lambda = 1 is the DPO model itself.
  dpo_row = [r for r in _rows(result, "dpo") if r["beta"] == cfg.dera_model_beta][0]
  assert dera[-1]["lambda"] > 1 or np.isclose(
      [r for r in dera if r["lambda"] == 1.0][0]["reward"], dpo_row["reward"])


def test_decoding_points(study):
  cfg, result, _ = study
  sft = _rows(result, "sft")[0]
  genarm = {r["alpha"]: r for r in _rows(result, "genarm")}
  assert sorted(genarm) == sorted(cfg.genarm_alphas)
  # alpha = 0 is the SFT model itself: the same samples (common random numbers), KL 0.
  assert genarm[0.0]["reward"] == sft["reward"] and abs(genarm[0.0]["kl"]) < 1e-4
  bon = sorted(_rows(result, "best_of_n"), key=lambda r: r["n"])
  assert [r["n"] for r in bon] == sorted(cfg.best_of_n)
  for r in bon:  # 0 <= KL <= log n - (n-1)/n (Beirami et al. 2024), up to estimator noise
    assert -3 * r["kl_se"] <= r["kl"] <= r["kl_bound"] + 3 * r["kl_se"], r
  args = sorted(_rows(result, "args"), key=lambda r: r["w"])
  assert [r["w"] for r in args] == sorted(cfg.args_weights) and all(r["kl"] > 0 for r in args)


def test_every_default_study_run_builds_a_valid_training_config(tmp_path, monkeypatch):
  """The full default study (every registry method) plans runs the training config accepts."""
  from alignjax.study import frontier
  from alignjax.training import algorithms, config
  from alignjax.training.algorithms import aligndistil
  # The teachers' runs do not exist here; their vocabulary check reads them.
  monkeypatch.setattr(aligndistil, "run_vocab", lambda field, workdir, student_vocab=None: student_vocab or 64)
  cfg = frontier.build(None)
  specs = frontier.plan_runs(cfg)
  names = {config.build(None, **frontier.run_config(cfg, s, str(tmp_path))).loss.name for s in specs}
  studied = {n for n in algorithms.names(preference=True) if algorithms.get(n).study.get("methods", {n: {}})}
  assert names == studied | {"reward"} and "critical_tokens" in names
  assert {s.method for s in specs if s.plotted} == {m for m in frontier.METHODS if frontier.methods()[m]["plotted"]}


def test_best_of_n_kl_matches_enumeration_and_the_bound():
  rng = np.random.default_rng(0)
  for n in (2, 3):
    scores = rng.integers(0, 4, size=(3 * 2, n)).astype(float)  # 3 prompts x 2 draws of n, with ties
    got = evaluation.best_of_n_kl(scores, 3)
    for prompt in range(3):
      pool = scores[2 * prompt:2 * prompt + 2].reshape(-1)  # this prompt's K * n scores
      # Best-of-n from the pool's distribution: every n-tuple of pool draws, its highest score.
      picks = np.asarray([max(pool[list(t)]) for t in itertools.product(range(len(pool)), repeat=n)])
      want = sum(np.mean(picks == v) * np.log(np.mean(picks == v) / np.mean(pool == v)) for v in set(pool))
      np.testing.assert_allclose(got[prompt], want, rtol=1e-12)
  # Scores without ties: log n - (n-1)/n (Beirami et al. 2024, Thm. 1) from below, closer as the draws grow.
  for n in (2, 8):
    bound = np.log(n) - (n - 1) / n
    few, many = (evaluation.best_of_n_kl(rng.standard_normal((k, n)), 1)[0] for k in (8, 512))
    assert few < many < bound and bound - many < (bound - few) / 10, (n, few, many, bound)
  assert evaluation.best_of_n_kl(np.ones((4, 3)), 2).tolist() == [0.0, 0.0]  # all tied: best-of-n is pi
  with pytest.raises(ValueError, match="best_of_n_kl: `scores`"):
    evaluation.best_of_n_kl(np.zeros((5, 2)), 2)


def test_plot_is_a_readable_png(study):
  import matplotlib.image
  _, result, _ = study
  with open(result["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  img = matplotlib.image.imread(result["plot"])
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
  assert img[..., :3].std() > 0.05  # not a blank canvas


def test_rerun_skips_finished_runs_and_evaluations(study):
  from alignjax.study import frontier
  cfg, result, _ = study
  calls = []
  again = frontier.run_study(cfg, workdir=result["workdir"], train_fn=lambda c, *, workdir: calls.append(workdir),
                             progress=False)
  assert calls == [] and again["trained"] == [] and again["evaluated"] == []
  assert sorted(again["skipped"]) == sorted(result["trained"] + result["skipped"])
  assert [r["reward"] for r in again["rows"]] == [r["reward"] for r in result["rows"]]
  # The launcher on the same workdir: skips everything, says so, prints where the files are.
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = launcher_zygote.run([sys.executable, "-m", "launch.study", "--config=configs/study_test.py",
                             f"--workdir={result['workdir']}"], cwd=root, timeout=300,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
  assert "finished earlier, skipped" in out.stdout and "trained 0" in out.stdout
  assert f"plot: {result['plot']}" in out.stdout


def test_study_config_errors_are_one_line():
  from alignjax.study import frontier
  for kwargs, match in [(dict(methods=("dpo", "nope")), "methods"), (dict(betas=(0.1, -1.0)), "betas"),
                        (dict(eval_prompts=1), "eval_prompts"), (dict(bogus=1), "unknown field"),
                        (dict(model_preset="gpt5"), "model_preset"), (dict(dera_beta=0.7), "dera_beta"),
                        (dict(best_of_n=(1,)), "best_of_n"), (dict(args_weights=(-1.0,)), "args_weights"),
                        (dict(methods=("dpo",)), "genarm_alphas")]:
    with pytest.raises(frontier.StudyError, match=match) as e:
      frontier.build(None, **kwargs)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- loop.run additions


def test_run_config_fields_of_the_study_are_validated_in_one_line():
  from alignjax.training import config
  for fields, match in [({"data.kind": "parquet"}, "data.kind"), ({"data.kind": "arrays"}, "data.path"),
                        ({"data.kind": "file", "data.path": "x.jsonl"}, "data.tokenizer"),
                        ({"data.seq_len": 1}, "data.seq_len"), ({"init": {"bogus": 1}}, "unknown field")]:
    with pytest.raises(config.ConfigError, match=match) as e:
      config.build(None, **fields) if "init" not in fields else config.build(fields)
    assert "\n" not in str(e.value)
  identity = config.identity(config.build(None, **{"data.kind": "reviews", "init.checkpoint": "/x"}))
  assert identity["data.kind"] == "reviews" and identity["init.checkpoint"] == "/x"


def test_load_policy_refuses_a_directory_without_a_model(tmp_path):
  from alignjax.training import config, loop
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(config.ConfigError, match="neither a finished run"):
    loop.load_policy(str(tmp_path))


def test_reviews_sft_run_saves_a_policy_that_init_checkpoint_restores(tmp_path):
  """data.kind='reviews' SFT; the final policy loads, and a run from it starts at its parameters."""
  from alignjax.models import checkpoint_io
  from alignjax.training import config, loop
  common = {"data.kind": "reviews", "data.train_examples": 64, "data.eval_examples": 16, "batch_size": 16,
            "log_every": 10, "checkpoint_every": 10}
  sft = config.build(None, **common, **{"sft.steps": 3, "dpo.steps": 0})
  sft_result = loop.run(sft, workdir=str(tmp_path / "sft"), handle_signals=False)
  policy = loop.load_policy(str(tmp_path / "sft"))
  assert policy.config.vocab_size == reviews.ReviewsTask().vocab_size
  # An Orbax model checkpoint written elsewhere loads the same parameters.
  checkpoint_io.save_model(policy, str(tmp_path / "model"))
  again = loop.load_policy(str(tmp_path / "model"))
  for a, b in zip(jax.tree.leaves(nnx.state(policy, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # init.checkpoint: a preference run starts from the SFT policy: before its first step it scores the
  # (same, regenerated) eval set exactly as the finished SFT run did.
  dpo = config.build(None, **common, **{"sft.steps": 0, "dpo.steps": 1, "init.checkpoint": str(tmp_path / "sft")})
  result = loop.run(dpo, workdir=str(tmp_path / "dpo"), handle_signals=False)
  np.testing.assert_allclose(result["eval_before"]["logps/chosen"], sft_result["eval_after"]["logps/chosen"],
                             rtol=1e-5)
  assert result["eval_before"]["rewards/chosen"] == 0.0  # the reference is that policy too
