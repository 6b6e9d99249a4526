"""``loop.evaluate_run`` and ``launch/evaluate.py``: any saved step of a run, evaluated as the run evaluates.

References: the run's own ``eval_before.json`` / ``final_metrics.json`` (written by
``loop.run``), DPO's reward identities (the reward is beta times the policy-minus-reference
log-prob, so a step's mean reward follows from two steps' mean log-probs), and the final
policy's log-probs recomputed in float64 NumPy from its logits.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from alignjax.training import config as config_lib
from alignjax.training import loop
from tests import launcher_zygote
from tests import numpy_reference as ref
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SFT, DPO, BETA = 2, 4, 0.1
RUN = {
    "data.train_examples": 32, "data.eval_examples": 8, "model.hidden_size": 16, "model.intermediate_size": 32,
    "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 8,
    "sft.steps": SFT, "dpo.steps": DPO, "dpo.warmup_steps": 1, "batch_size": 4, "eval_batch_size": 8,
    "log_every": 1, "checkpoint_every": 1, "max_checkpoints": 10, "loss.beta": BETA,
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
  result = loop.run(config_lib.build(None, **RUN), workdir=workdir, handle_signals=False)
  return workdir, result


@pytest.fixture(scope="module")
def evaluations(finished):
  workdir, _ = finished
  return {e["step"]: e for e in loop.evaluate_run(workdir, steps=range(SFT, SFT + DPO + 1))}


def _close(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_start_and_final_steps_are_the_runs_own_evaluations(finished, evaluations):
  workdir, result = finished
  with open(os.path.join(workdir, "eval_before.json")) as f:
    before = json.load(f)
  assert evaluations[SFT]["phase"] == "start" and evaluations[SFT + DPO]["phase"] == "preference"
  assert {e["loss"] for e in evaluations.values()} == {"dpo"}
  _close(evaluations[SFT]["metrics"], before)
  _close(evaluations[SFT + DPO]["metrics"], result["eval_after"])
  # The default is the newest checkpoint.
  (newest,) = loop.evaluate_run(workdir)
  assert newest["step"] == SFT + DPO
  _close(newest["metrics"], result["eval_after"])


def test_every_step_is_scored_against_the_policy_after_sft(evaluations):
  """DPO's reward is beta (log pi - log pi_ref): the mean reward at step s is beta times the
  difference of the mean log-probs at s and at the SFT step, whose policy is the reference."""
  start = evaluations[SFT]["metrics"]
  assert start["rewards/margins"] == 0 and start["rewards/chosen"] == 0
  for step in range(SFT + 1, SFT + DPO + 1):
    m = evaluations[step]["metrics"]
    for side in ("chosen", "rejected"):
      np.testing.assert_allclose(m[f"rewards/{side}"], BETA * (m[f"logps/{side}"] - start[f"logps/{side}"]),
                                 rtol=1e-3, atol=1e-6, err_msg=f"step {step} {side}")
    np.testing.assert_allclose(m["rewards/margins"], m["rewards/chosen"] - m["rewards/rejected"], atol=1e-6)
  # The policy moved: the steps are not all the same evaluation.
  assert len({round(evaluations[s]["metrics"]["logps/chosen"], 6) for s in evaluations}) > 2


def test_final_step_matches_float64_log_probs_of_the_saved_policy(finished, evaluations):
  from alignjax.data import to_arrays
  workdir, _ = finished
  policy = loop.load_policy(workdir)
  _, eval_source, _, _ = loop.open_data(loop.stored_config(workdir), workdir)
  data = to_arrays(eval_source)
  logps = {}
  for side in ("chosen", "rejected"):
    tokens, attention = data[f"{side}_tokens"], data[f"{side}_attention"]
    logits = np.asarray(policy(tokens, attention_mask=attention), np.float64)
    # logits[:, t] scores tokens[:, t + 1]; the response tokens are scored.
    logps[side] = ref.seq_logprob(logits[:, :-1], tokens[:, 1:], np.asarray(data[f"{side}_response"], bool)[:, 1:])
  m = evaluations[SFT + DPO]["metrics"]
  np.testing.assert_allclose(m["logps/chosen"], logps["chosen"].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["logps/rejected"], logps["rejected"].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["policy/preference_accuracy"], np.mean(logps["chosen"] > logps["rejected"]))


def test_bad_steps_are_one_line_errors(finished):
  workdir, _ = finished
  with pytest.raises(config_lib.ConfigError, match=r"^steps: 1 is inside the SFT warm-up \(steps 1\.\.2\)"):
    loop.evaluate_run(workdir, steps=[1])
  with pytest.raises(config_lib.ConfigError, match=r"^steps: 99 is not a checkpointed step .*available: 2, 3, 4, 5, 6\)"):
    loop.evaluate_run(workdir, steps=[99])
  with pytest.raises(config_lib.ConfigError, match=r"^workdir: .* holds no run"):
    loop.evaluate_run(os.path.join(workdir, "missing"))


def _tree(workdir):
  return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in Path(workdir).rglob("*")
          if "evaluation" not in p.name}


def _launch(*args):
  env = subprocess_env(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return launcher_zygote.run([sys.executable, "-m", "launch.evaluate", *args], cwd=ROOT, env=env, timeout=300)


def test_launcher_writes_every_step_and_leaves_the_run_untouched(finished, evaluations, tmp_path):
  workdir, _ = finished
  files = _tree(workdir)
  out = tmp_path / "eval.json"
  proc = _launch(f"--workdir={workdir}", "--steps=all", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(out.read_text())
  assert [e["step"] for e in got] == list(range(SFT, SFT + DPO + 1))
  for e in got:
    _close(e["metrics"], evaluations[e["step"]]["metrics"])
  lines = [l for l in proc.stdout.splitlines() if l.startswith("[eval @ ")]
  assert len(lines) == len(got) and lines[0].startswith(f"[eval @ {SFT}] dpo start (policy = reference): ")
  assert _tree(workdir) == files   # nothing in the run's directory was written

  bad = _launch(f"--workdir={workdir}", "--steps=1")
  errors = [l for l in bad.stderr.splitlines() if l.strip() and not l.startswith(("W1", "I1"))]
  assert bad.returncode == 2 and errors == [errors[0]] and errors[0].startswith("error: steps: 1 is inside the SFT")


@pytest.mark.parametrize("fields", [{"reference.mode": "precomputed", "sft.steps": 1},
                                    {"loss.name": "kto", "lora.rank": 2, "lora.alpha": 4.0}],
                         ids=["precomputed", "kto_lora"])
def test_other_reference_modes_and_schemas_evaluate_as_the_run(tmp_path, fields):
  """The precomputed reference log-probs read back from the run's files; LoRA adapters on the
  base weights with an unpaired (KTO) schema."""
  cfg = config_lib.build(None, **{**RUN, "sft.steps": 0, "dpo.steps": 2, "checkpoint_every": 2, **fields})
  result = loop.run(cfg, workdir=str(tmp_path), handle_signals=False)
  start, final = loop.evaluate_run(str(tmp_path), steps=[cfg.sft.steps, cfg.sft.steps + cfg.dpo.steps])
  _close(start["metrics"], result["eval_before"])
  _close(final["metrics"], result["eval_after"])
