"""AlignDistil's ``positions`` option against a NumPy construction of both position sets.

Reference: the float64 NumPy AlignDistil of tests/test_algorithms.py (DESIGN.md's
equations) on plain full-logits forwards, evaluated at the positions each option
names: ``next_token`` the distributions predicting the response tokens
(``logits[:, :-1]`` with ``response[:, 1:]``), ``authors`` the distributions at
the response tokens themselves (``logits`` with ``response``: the one after EOS
in, the one predicting the first response token out).
"""

import jax
import numpy as np
import pytest

from alignjax.training import algorithms, reference
from tests.test_algorithms import _numpy_aligndistil
from tests.test_steps import make_batch, plain_logits, tiny_model


@pytest.fixture(scope="module")
def setup():
  models = tiny_model(50), tiny_model(51), tiny_model(52)
  batch = make_batch(np.random.default_rng(8), B=3, T=10)
  return models, batch


def test_positions_match_numpy(setup):
  (student, dpo, contrast), batch = setup
  spec = reference.teachers(dpo=dpo, contrast=contrast)[0]
  losses = {p: algorithms.loss("aligndistil", beta=0.7, beta2=2.0, temperature=1.5, positions=p)
            for p in ("next_token", "authors")}

  def run():
    ctx = algorithms.Context(student, {"dpo": dpo, "contrast": contrast}, spec, 4)
    return {p: loss.algorithm.objective(loss.hparams, ctx, batch).losses for p, loss in losses.items()}
  got = jax.jit(run)()
  logits = [plain_logits(m, batch["chosen_tokens"], batch["chosen_attention"]) for m in (student, dpo, contrast)]
  response = batch["chosen_response"]
  want = {"next_token": _numpy_aligndistil(*[z[:, :-1] for z in logits], response[:, 1:], 0.7, 2.0, 1.5),
          "authors": _numpy_aligndistil(*logits, response, 0.7, 2.0, 1.5)}
  for p in want:
    np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=1e-4, atol=1e-6, err_msg=p)
  assert np.abs(want["authors"] - want["next_token"]).max() > 1e-3


def test_positions_field_is_checked():
  with pytest.raises(ValueError, match="positions"):
    algorithms.loss("aligndistil", positions="shifted")
  assert algorithms.loss("aligndistil").hparams.positions == "next_token"
