"""The issue-16 methods are found through the registry: config help, the planner, the study.

References: the registry itself is the only list of names (no other module lists
them); the planner's abstract step must lower for every one, and the study's
plan must hold a run of every method that declares study points.
"""

import pytest

from alignjax import aot
from alignjax.study import frontier
from alignjax.training import config as config_lib

NEW = ("kto", "simpo", "orpo", "genarm", "critical_tokens", "sparsepo")


def test_config_help_lists_every_new_method_and_its_fields():
  text = config_lib.field_help()
  for name in NEW:
    assert f"\n  {name} " in text
  for field in ("desirable_weight", "undesirable_weight", "gamma", "cpo_alpha", "nll_tokens", "pairing", "only_neg",
                "mask", "positions"):
    assert f"--config.loss.{field} " in text


@pytest.mark.parametrize("name", NEW)
def test_planner_lowers_every_new_method(name):
  topology = aot.get_topology("v5e:2x2", backend="cpu")
  exp = aot.Experiment(algorithm=name, model="llama_tiny", batch_size=4, prompt_len=8, response_len=8,
                       dtype="float32", frozen_dtype="float32")
  built = aot.build_step(exp, topology, (1, 4, 1))
  assert built.step.lower(*built.args) is not None
  if name == "critical_tokens":
    assert "rejected_weights" in built.args[1]
  if name == "kto":
    assert "kl_tokens" in built.args[1] and "desirable" in built.args[1]


def test_default_study_runs_the_new_methods():
  runs = frontier.plan_runs(frontier.build(None))
  methods = {r.method for r in runs}
  assert {"kto", "simpo", "orpo", "genarm", "sparsepo", "sparsepo_mapo", "critical_tokens",
          "aligndistil_authors", "reward"} <= methods
  # Critical tokens trains on the weighted data set the study builds first (alignjax.study.critical_tokens).
  assert all(r.fields["data.path"] == "data/critical_tokens" for r in runs if r.method == "critical_tokens")
