"""The real recipe (alignjax.study.real) end to end at test size, and its config checks.

The end-to-end test is marked ``real`` (assets, and four 135M-parameter runs: minutes on a CPU).
"""

import json
import os

import numpy as np
import pytest

from alignjax.study import real
from alignjax.training.config import ConfigError
from tests import real_fixtures as rf


def test_config_checks_are_one_line():
  with pytest.raises(ConfigError, match="max_prompt_len"):
    real.build(None, seq_len=64, max_prompt_len=64)
  with pytest.raises(ConfigError, match="methods"):
    real.build(None, methods=("dpo", "ppo"))
  with pytest.raises(ConfigError, match="unknown field"):
    real.build(None, stepz=3)
  assert real.build(None, **real.TEST).steps == 2


@pytest.mark.real
def test_recipe_runs_end_to_end_at_test_size_and_resumes(tmp_path):
  assets = rf.get_assets()
  cfg = real.build(None, **real.TEST)
  result = real.run_real(cfg, workdir=str(tmp_path), log=lambda line: None)
  rows = {r["model"]: r for r in result["rows"]}
  assert list(rows) == ["base", "dpo", "tdpo2", "aligndistil"]
  held_out = result["data"]["held_out"]
  assert held_out >= 1 and result["data"]["pairs"] == cfg.max_pairs >= result["data"]["usable"]
  assert held_out == max(1, result["data"]["usable"] // 10)  # the loop's split: the last tenth of the usable pairs
  for name, r in rows.items():
    assert r["held_out"] == held_out and 0.0 <= r["accuracy"] <= 1.0
    assert np.isfinite(r["kl"]) and np.isfinite(r["margin"]) and 1 <= r["mean_length"] <= cfg.max_new_tokens
    assert len(r["answers"]) == cfg.show_prompts and all(isinstance(a, str) for a in r["answers"])
  base = rows["base"]
  assert base["margin"] == 0.0 and abs(base["kl"]) < 1e-2  # the base model against itself
  assert result["table"].count("\n") == 2 + 4
  for name in ("results.md", "results.jsonl", "samples.md", "real.png"):
    assert os.path.getsize(tmp_path / name) > 0
  with open(tmp_path / "results.jsonl") as f:
    assert [json.loads(line)["model"] for line in f] == list(rows)
  for run in ("dpo", "rdpo", "tdpo2", "aligndistil"):
    assert (tmp_path / "runs" / run / "final_metrics.json").exists()
  # A second call trains and evaluates nothing: the same rows come back.
  lines = []
  again = real.run_real(cfg, workdir=str(tmp_path), log=lines.append)
  assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in result["rows"]]
  assert not any(line.endswith(" trained") for line in lines), lines
  del assets
