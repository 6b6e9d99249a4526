"""The AlignDistil pipeline end to end (SFT -> DPO, reverse DPO -> off-/on-policy distillation).

References, independent of the code under test:
* the gold reward is recounted here from the sampled words (net sentiment per
  word, from the word lists of alignjax.data.reviews), not with ReviewsTask.gold_reward;
* the distilled student's KL to the DPO teacher on the held-out chosen responses
  is recomputed in float64 NumPy from the saved models' logits;
* the authors' data choices: the reverse-DPO run sees (rejected, chosen) pairs,
  off-policy distillation the chosen responses only.
"""

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from alignjax.data import reviews
from alignjax.data.synthetic import EOS, PAD
from tests import launcher_zygote, notebooks

ROOT = Path(__file__).resolve().parents[1]


def _test_config(**overrides):
  from alignjax.study import aligndistil as pipeline
  from configs import aligndistil
  return pipeline.build(aligndistil.get_config("test"), **overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The test-sized pipeline, run in two calls: up to DPO here, then (after a refused stage) to the end in
  colab/aligndistil_pipeline.ipynb, whose kernel resumes this work directory (the notebook's own test)."""
  from alignjax.study import aligndistil as pipeline
  from alignjax.training import config as config_lib
  from alignjax.training import loop

  cfg = _test_config()
  workdir = str(tmp_path_factory.mktemp("aligndistil"))
  calls = []

  def train(run_cfg, *, workdir):
    calls.append(os.path.basename(workdir))
    return loop.run(run_cfg, workdir=workdir, handle_signals=False)

  first = pipeline.run_pipeline(cfg, workdir=workdir, train_fn=train, stages=("dpo",), progress=False)
  # The off-policy stage refuses to start without its contrast (reverse-DPO) run.
  with pytest.raises(config_lib.ConfigError, match="distill.contrast_checkpoint") as refused:
    pipeline.stage_config(cfg, "offpolicy", workdir)
  # The notebook builds the same config (configs/aligndistil.py "test") and runs the pipeline in its
  # tempfile.mkdtemp(prefix="aligndistil_") directory: this one. Its `result` is the second call's.
  second = notebooks.execute("aligndistil_pipeline.ipynb", tmp_path=tmp_path_factory.mktemp("kernel_tmp"),
                             workdir=("aligndistil_", workdir), save="result")
  return cfg, workdir, first, second, calls, str(refused.value)


def _rows(result):
  return {r["stage"]: r for r in result["rows"]}


def test_stages_run_in_order_each_once_and_a_rerun_skips_finished_stages(run):
  cfg, workdir, first, second, calls, refused = run
  assert first["trained"] == ["sft", "dpo"]
  assert "\n" not in refused and "rdpo" in refused
  assert second["skipped"] == ["sft", "dpo"] and second["trained"] == ["rdpo", "offpolicy", "onpolicy"]
  assert calls == ["sft", "dpo"]  # trained here; the notebook's kernel trained the rest
  assert set(second["evaluated"]) == {"rdpo", "offpolicy", "onpolicy"}  # sft/dpo evaluations reused
  assert list(_rows(second)) == ["sft", "dpo", "rdpo", "offpolicy", "onpolicy"]
  with open(second["results"]) as f:
    assert [json.loads(line)["stage"] for line in f] == list(_rows(second))
  from alignjax.study import aligndistil as pipeline
  again = pipeline.run_pipeline(cfg, workdir=workdir, train_fn=lambda c, *, workdir: calls.append(workdir),
                                progress=False)
  assert len(calls) == 2 and again["trained"] == [] and again["evaluated"] == []
  assert [r["reward"] for r in again["rows"]] == [r["reward"] for r in second["rows"]]


def test_each_stage_reads_its_inputs_checkpoints(run):
  cfg, workdir, _, _, _, _ = run
  config = lambda s: json.load(open(os.path.join(workdir, s, "config.json")))
  for stage in ("dpo", "rdpo", "offpolicy", "onpolicy"):
    assert config(stage)["init.checkpoint"] == os.path.join(workdir, "sft")
  assert config("rdpo")["data.swap_pairs"] and not config("dpo")["data.swap_pairs"]
  for stage, on in (("offpolicy", False), ("onpolicy", True)):
    c = config(stage)
    assert c["distill.dpo_checkpoint"] == os.path.join(workdir, "dpo")
    assert c["distill.contrast_checkpoint"] == os.path.join(workdir, "rdpo")
    assert c["distill.on_policy"] is on and c["loss.name"] == "aligndistil"
  assert config("offpolicy")["loss.beta2"] == cfg.beta2_offpolicy
  assert config("onpolicy")["loss.beta2"] == cfg.beta2_onpolicy
  for stage in ("dpo", "rdpo", "offpolicy", "onpolicy"):
    assert config(stage)["loss.beta"] == cfg.beta


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_student_kl_to_the_dpo_teacher_matches_numpy_on_held_out_chosen(run):
  """eval_after's distil/seq_kl_dpo is KL(student || DPO model) summed over the chosen response."""
  from alignjax.data import arrays_tfds
  from alignjax.training import loop
  _, workdir, _, _, _, _ = run
  src = arrays_tfds.open_arrays(os.path.join(workdir, "data", "preferences"), "eval")
  rows = [src[i] for i in range(len(src))]
  tok = np.stack([r["chosen_tokens"] for r in rows])
  att = np.stack([r["chosen_attention"] for r in rows])
  mask = np.stack([r["chosen_response"] for r in rows])[:, 1:]
  student, dpo = loop.load_policy(os.path.join(workdir, "offpolicy")), loop.load_policy(os.path.join(workdir, "dpo"))
  ls = _np_log_softmax(np.asarray(student(tok, att))[:, :-1])
  ld = _np_log_softmax(np.asarray(dpo(tok, att))[:, :-1])
  kl = (np.exp(ls) * (ls - ld)).sum(-1)
  expected = float(np.mean((kl * mask).sum(-1)))
  final = json.load(open(os.path.join(workdir, "offpolicy", "final_metrics.json")))
  np.testing.assert_allclose(final["eval_after"]["distil/seq_kl_dpo"], expected, rtol=2e-3)


def _net_sentiment(task, tokens, mask):
  """Independent recount: (#positive - #negative words) / #words up to the first EOS."""
  words = task.words
  out = []
  for row, m in zip(np.asarray(tokens), np.asarray(mask)):
    pos = neg = n = 0
    for t, keep in zip(row, m):
      if not keep or t == EOS:
        break
      n += 1
      pos += words[t] in reviews.POSITIVE
      neg += words[t] in reviews.NEGATIVE
    out.append((pos - neg) / max(n, 1))
  return np.asarray(out)


def test_distilled_students_gold_reward_beats_the_sft_model(run):
  cfg, workdir, _, second, _, _ = run
  rows = _rows(second)
  sft = rows["sft"]
  for stage in ("offpolicy", "onpolicy", "dpo"):
    r = rows[stage]
    assert r["reward"] > sft["reward"] + 0.15, (stage, r, sft)
    assert r["reward"] - sft["reward"] > 4 * np.hypot(r["reward_se"], sft["reward_se"])
  assert rows["rdpo"]["reward"] < sft["reward"] - 0.1  # reverse DPO learnt the swapped preference
  assert all(rows[s]["kl"] > 0.5 for s in ("dpo", "rdpo", "offpolicy", "onpolicy"))
  assert abs(sft["kl"]) < 1e-3
  # The same comparison on fresh samples, with the reward recounted here.
  from alignjax import decoding
  from alignjax.training import loop
  task = cfg.task
  prompts, pmask = task.prompts(task.sample_topics(64, 12345))
  prompts, pmask = np.repeat(prompts, 4, 0), np.repeat(pmask, 4, 0)
  rewards = {}
  for stage in ("sft", "offpolicy"):
    out = decoding.generate(loop.load_policy(os.path.join(workdir, stage)), prompts, pmask,
                            max_new_tokens=task.max_len + 1, temperature=1.0, eos_token_ids=(EOS,),
                            pad_token_id=PAD, rng=jax.random.key(7))
    rewards[stage] = _net_sentiment(task, out.tokens, out.mask)
  assert rewards["offpolicy"].mean() > rewards["sft"].mean() + 0.15, rewards


def _offpolicy_fields(workdir, **extra):
  from alignjax.study import aligndistil as pipeline
  fields = pipeline.stage_fields(_test_config(), "offpolicy", workdir)
  fields.update(extra)
  return fields


@pytest.mark.parametrize("extra, match", [
    ({"loss.beta2": 0.0}, "config.loss.beta2"),
    ({"loss.beta2": -1.0}, "config.loss.beta2"),
    ({"loss.mode": "theorem2"}, "config.loss.mode"),
    ({"loss.temperature": 0.0}, "config.loss.temperature"),
])
def test_bad_distillation_hyper_parameters_fail_at_config_build_in_one_line(run, extra, match):
  from alignjax.training import config as config_lib
  _, workdir, _, _, _, _ = run
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.build(None, **_offpolicy_fields(workdir, **extra))
  assert "\n" not in str(e.value)


def test_missing_contrast_and_vocabulary_mismatch_fail_at_config_build(run, tmp_path):
  from alignjax.training import config as config_lib
  from alignjax.training import loop
  _, workdir, _, _, _, _ = run
  with pytest.raises(config_lib.ConfigError, match="distill.contrast_checkpoint") as e:
    config_lib.build(None, **_offpolicy_fields(workdir, **{"distill.contrast_checkpoint": str(tmp_path / "none")}))
  assert "\n" not in str(e.value)
  with pytest.raises(config_lib.ConfigError, match="distill.contrast_checkpoint"):
    config_lib.build(None, **_offpolicy_fields(workdir, **{"distill.contrast_checkpoint": ""}))
  # A finished run on a task with another vocabulary (the sorting task's) as the contrast model.
  other = config_lib.build(None, **{"data.kind": "sorting", "data.train_examples": 16, "data.eval_examples": 16,
                                    "batch_size": 16, "sft.steps": 1, "dpo.steps": 0})
  loop.run(other, workdir=str(tmp_path / "other"), handle_signals=False)
  with pytest.raises(config_lib.ConfigError, match="vocabulary") as e:
    config_lib.build(None, **_offpolicy_fields(workdir, **{"distill.contrast_checkpoint": str(tmp_path / "other")}))
  assert "\n" not in str(e.value) and "distill.contrast_checkpoint" in str(e.value)


def test_pipeline_config_errors_are_one_line():
  from alignjax.study import aligndistil as pipeline
  for kwargs, match in [(dict(beta2_offpolicy=0.0), "beta2_offpolicy"), (dict(beta2_onpolicy=-1.0), "beta2_onpolicy"),
                        (dict(mode="nope"), "mode"), (dict(bogus=1), "unknown field")]:
    with pytest.raises(pipeline.PipelineError, match=match) as e:
      pipeline.build(None, **kwargs)
    assert "\n" not in str(e.value)


def test_launcher_refuses_a_missing_contrast_model_with_exit_2(run, tmp_path):
  _, workdir, _, _, _, _ = run
  args = [sys.executable, "-m", "launch.train", "--config=configs/aligndistil.py:test-offpolicy",
          f"--workdir={tmp_path / 'student'}", f"--config.init.checkpoint={workdir}/sft",
          f"--config.data.path={workdir}/data/preferences", f"--config.distill.dpo_checkpoint={workdir}/dpo",
          f"--config.distill.contrast_checkpoint={tmp_path / 'missing'}"]
  out = launcher_zygote.run(args, cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "distill.contrast_checkpoint" in lines[0], out.stderr[-2000:]
  assert not (tmp_path / "student" / "checkpoints").exists()


@pytest.mark.parametrize("on_policy", [False, True])
def test_aligndistil_objective_distils_chosen_only_and_scales_student_on_policy(on_policy):
  """The objective vs float64 NumPy (tests/numpy_reference.aligndistil) on the chosen rows.

  Off-policy the student's logits are used as given (the authors' off-policy
  trainer); on-policy they are divided by the temperature first (their on-policy
  trainer). Rejected rows are never read: replacing them leaves the loss unchanged.
  """
  from alignjax.training import algorithms, reference
  from tests import numpy_reference as ref_np
  from tests.test_steps import make_batch, plain_logits, tiny_model

  student, dpo, contrast = tiny_model(30), tiny_model(31), tiny_model(32)
  batch = make_batch(np.random.default_rng(1), B=3, T=9)
  cfg = algorithms.loss("aligndistil", beta=0.3, beta2=2.0, temperature=1.7, on_policy=on_policy)
  spec = reference.teachers(dpo=dpo, contrast=contrast)[0]

  @jax.jit
  def loss(b):
    out = cfg.algorithm.objective(cfg.hparams, algorithms.Context(student, {"dpo": dpo, "contrast": contrast}, spec, 4), b)
    return out.losses, out.metrics["distil/seq_kl_dpo"]

  got, kl = loss(batch)
  tok, att = batch["chosen_tokens"], batch["chosen_attention"]
  zs, zd, zc = (np.asarray(plain_logits(m, tok, att), np.float64)[:, :-1] for m in (student, dpo, contrast))
  mask = np.asarray(batch["chosen_response"], bool)[:, 1:]
  want, _, _ = ref_np.aligndistil(zs / 1.7 if on_policy else zs, zd, zc, mask, 0.3, 2.0, "aligndistil", 1.7, True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
  ls, ld = _np_log_softmax(zs / 1.7 if on_policy else zs), _np_log_softmax(zd)
  np.testing.assert_allclose(np.asarray(kl), ((np.exp(ls) * (ls - ld)).sum(-1) * mask).sum(-1), rtol=1e-4, atol=1e-6)
  other = dict(batch)
  rng = np.random.default_rng(5)
  other["rejected_tokens"] = rng.integers(1, 8, size=np.shape(batch["rejected_tokens"])).astype(np.int32)
  np.testing.assert_allclose(np.asarray(loss(other)[0]), np.asarray(got), rtol=1e-6)
