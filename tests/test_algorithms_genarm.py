"""GenARM's reward-model objective in the registry against float64 NumPy on plain forwards.

Reference: the authors' ``arm_loss`` equation, ``-log sigma(beta (sum log pi(y_w) -
sum log pi(y_l)))``, in float64 NumPy on a plain full-logits forward
(tests/numpy_reference.py), with no reference model.
"""

import numpy as np
import pytest

from alignjax.training import algorithms
from tests import numpy_reference as ref_np
from tests.algorithm_helpers import accumulated_loss, tiny_run
from tests.test_steps import make_batch, numpy_seq_logps, tiny_model


def test_matches_numpy():
  policy, batch = tiny_model(41), make_batch(np.random.default_rng(5), B=4, T=12)
  got, _ = accumulated_loss(algorithms.loss("genarm", beta=0.3), policy, {}, batch)
  pc, pr = numpy_seq_logps(policy, batch, "chosen"), numpy_seq_logps(policy, batch, "rejected")
  want = np.mean([-ref_np.log_sigmoid(0.3 * (c - r)) for c, r in zip(pc, pr)])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_registry_entry():
  algo = algorithms.get("genarm")
  assert algo.needs == "none" and algo.frozen == ()
  with pytest.raises(ValueError, match="beta"):
    algorithms.loss("genarm", beta=-1.0)


def test_trains_end_to_end(tmp_path):
  out = tiny_run(tmp_path, "genarm")
  assert out["steps"] == 3 and np.isfinite(out["eval_after"]["loss"])
  assert out["eval_after"]["loss"] != out["eval_before"]["loss"]
