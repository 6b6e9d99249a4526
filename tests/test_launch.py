"""The training loop as a library function (``alignjax.training.loop.run``).

The launcher's main job (progress lines, the closing summary, final_metrics.json) is checked by the
train.sh run of tests/test_run.py::test_signals_checkpoint_and_resume_with_the_stored_budget.

References: an untrained policy equals its reference (margins exactly 0); an
uninterrupted run is the reference for a preempted-and-resumed one.
"""

import json
import signal

import numpy as np
import pytest

from alignjax.training import config as config_lib
from alignjax.training import loop
from alignjax.training import runtime as run_lib


def small_config(**overrides):
  base = {
      "data.train_examples": 256, "data.eval_examples": 64, "model.hidden_size": 32,
      "model.intermediate_size": 64, "model.head_dim": 8,
      "sft.steps": 10, "dpo.steps": 30, "batch_size": 16, "eval_batch_size": 32,
      "log_every": 10, "checkpoint_every": 10,
  }
  base.update(overrides)
  return config_lib.build(None, **base)


def test_embedded_default_matches_configs_file():
  from configs import dpo_tiny
  assert config_lib.build(dpo_tiny.get_config()) == config_lib.RunConfig()


def test_dpo_run_learns_and_checkpoints(tmp_path):
  result = loop.run(small_config(**{"dpo.steps": 60, "dpo.learning_rate": 1e-3, "checkpoint_every": 20}),
                    workdir=str(tmp_path))
  before, after = result["eval_before"], result["eval_after"]
  assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
  assert after["rewards/margins"] > 0.1
  assert after["rewards/accuracy"] > 0.7
  assert after["loss"] < before["loss"]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == list(range(10, 71, 10))
  assert {l["phase"] for l in lines} == {"sft", "dpo"}
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [60, 70]  # saved at 20, 40, 60, 70; max_checkpoints=2, written atomically (no tmp dirs left)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
  assert json.loads((tmp_path / "final_metrics.json").read_text())["steps"] == 70
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0


def test_resume_after_preemption_reproduces_uninterrupted_run(tmp_path, monkeypatch):
  cfg = small_config(checkpoint_every=100)  # the only checkpoints: the one written on preemption, the final ones
  full = loop.run(cfg, workdir=str(tmp_path / "full"))

  real = run_lib.PreemptionGuard.should_stop
  monkeypatch.setattr(run_lib.PreemptionGuard, "should_stop",
                      lambda self, step: int(signal.SIGTERM) if step == 23 else real(self, step))
  with pytest.raises(run_lib.Preempted) as info:
    loop.run(cfg, workdir=str(tmp_path / "resumed"))
  assert info.value.step == 23 and info.value.exit_code == 143
  monkeypatch.setattr(run_lib.PreemptionGuard, "should_stop", real)
  resumed = loop.run(cfg, workdir=str(tmp_path / "resumed"))
  assert resumed["resumed_from"] == 23  # the checkpoint written on the way out
  for key, value in full["eval_after"].items():
    np.testing.assert_allclose(resumed["eval_after"][key], value, rtol=1e-4, atol=1e-5, err_msg=key)
  np.testing.assert_allclose(resumed["eval_before"]["loss"], full["eval_before"]["loss"], rtol=1e-6)
  rows = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  full_rows = [json.loads(l)["step"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert rows == full_rows


@pytest.mark.parametrize("name, extra", [
    ("tdpo2", {}), ("tdpo1", {}), ("ipo", {"loss.average_log_prob": True, "loss.beta": 0.5}),
    ("dpo", {"loss.label_smoothing": 0.1, "loss.robust": True}), ("savage", {}),
])
def test_other_losses_run(tmp_path, name, extra):
  cfg = small_config(**{"loss.name": name, "sft.steps": 0, "dpo.steps": 4, "model.hidden_size": 16,
                        "model.intermediate_size": 32, "model.num_layers": 1, "data.train_examples": 64, **extra})
  result = loop.run(cfg, workdir=str(tmp_path))
  assert np.isfinite(result["eval_after"]["loss"])
  if name.startswith("tdpo"):
    assert result["eval_after"]["kl/chosen_seq"] > 0


def test_checkpoint_of_another_model_is_refused(tmp_path):
  loop.run(small_config(**{"sft.steps": 0, "dpo.steps": 2}), workdir=str(tmp_path))
  with pytest.raises(loop.IdentityMismatch, match=r"config.model.hidden_size: stored 32, given 64"):
    loop.run(small_config(**{"sft.steps": 0, "dpo.steps": 4, "model.hidden_size": 64}), workdir=str(tmp_path))
