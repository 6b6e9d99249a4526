import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import dpo_tiny
from launch import train as launcher

ROOT = Path(__file__).resolve().parents[1]


def small_config(**overrides):
  c = dpo_tiny.get_config()
  c.data.train_examples, c.data.eval_examples = 256, 64
  c.model.d_model, c.model.d_ff = 32, 64
  c.sft.steps, c.dpo.steps = 10, 30
  c.batch_size, c.eval_batch_size = 16, 32
  c.log_every, c.checkpoint_every = 10, 10
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_dpo_run_learns_and_checkpoints(tmp_path):
  result = launcher.train(small_config(**{"dpo.steps": 60, "dpo.learning_rate": 1e-3}), str(tmp_path))
  before, after = result["eval_before"], result["eval_after"]
  assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
  assert after["rewards/margins"] > 0.1
  assert after["rewards/accuracy"] > 0.7
  assert after["loss"] < before["loss"]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == list(range(10, 71, 10))
  assert {l["phase"] for l in lines} == {"sft", "dpo"}
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [60, 70]  # max_to_keep=2, written atomically (no tmp dirs left)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
  assert json.loads((tmp_path / "final_metrics.json").read_text())["steps"] == 70


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
  cfg = small_config()
  full = launcher.train(cfg, str(tmp_path / "full"))

  from alignjax import training
  real = training.make_preference_step

  def crashing(loss_cfg):
    step, calls = real(loss_cfg), {"n": 0}

    def wrapped(*args):
      calls["n"] += 1
      if calls["n"] > 15:
        raise KeyboardInterrupt("simulated preemption")
      return step(*args)
    return wrapped

  monkeypatch.setattr(training, "make_preference_step", crashing)
  with pytest.raises(KeyboardInterrupt):
    launcher.train(cfg, str(tmp_path / "resumed"))
  monkeypatch.setattr(training, "make_preference_step", real)
  resumed = launcher.train(cfg, str(tmp_path / "resumed"))  # resumes at step 20
  for key, value in full["eval_after"].items():
    np.testing.assert_allclose(resumed["eval_after"][key], value, rtol=1e-4, atol=1e-5, err_msg=key)
  np.testing.assert_allclose(resumed["eval_before"]["loss"], full["eval_before"]["loss"], rtol=1e-6)


@pytest.mark.parametrize("name, extra", [
    ("tdpo2", {}), ("tdpo1", {}), ("ipo", {"loss.average_log_prob": True, "loss.beta": 0.5}),
    ("dpo", {"loss.label_smoothing": 0.1, "loss.robust": True}), ("savage", {}),
])
def test_other_losses_run(tmp_path, name, extra):
  cfg = small_config(**{"loss.name": name, "sft.steps": 5, "dpo.steps": 10, **extra})
  result = launcher.train(cfg, str(tmp_path))
  assert np.isfinite(result["eval_after"]["loss"])
  if name.startswith("tdpo"):
    assert result["eval_after"]["chosen_seq_kl"] > 0


def test_bad_config_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown loss `name` 'dpoo'"):
    launcher.train(small_config(**{"loss.name": "dpoo"}), str(tmp_path))
  with pytest.raises(ValueError, match="nothing to train"):
    launcher.train(small_config(**{"sft.steps": 0, "dpo.steps": 0}), str(tmp_path))
  with pytest.raises(ValueError, match="label_smoothing"):
    launcher.train(small_config(**{"loss.name": "ipo", "loss.label_smoothing": 0.1}), str(tmp_path))


def test_checkpoint_from_other_config_is_refused(tmp_path):
  launcher.train(small_config(**{"sft.steps": 2, "dpo.steps": 2}), str(tmp_path))
  with pytest.raises(ValueError, match="does not match"):
    launcher.train(small_config(**{"sft.steps": 2, "dpo.steps": 4, "model.d_model": 64}), str(tmp_path))


def test_cli_main_job(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "launch.train", f"--workdir={tmp_path}",
         "--config.sft.steps=5", "--config.dpo.steps=5", "--config.data.train_examples=128",
         "--config.data.eval_examples=32", "--config.log_every=5"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "held-out preference accuracy" in proc.stdout
  assert (tmp_path / "final_metrics.json").exists()
  bad = subprocess.run(cmd[:3] + ["--config.batch_size=0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "config.batch_size must be positive" in bad.stderr
