"""Tests for alignjax.training.reference: online, precomputed and reference-free modes.

Independent references: float64 NumPy sequence log-probs of a plain full-logits
forward (tests/numpy_reference.py) for the precomputed values and the
reference-free DPO loss; the online mode for the precomputed mode's equivalence.
"""

import numpy as np
import optax
import pytest

from alignjax.training import algorithms, reference, steps
from tests.test_steps import assert_params_close, make_batch, numpy_loss, numpy_seq_logps, tiny_model


@pytest.fixture(scope="module")
def models():
  return tiny_model(10), tiny_model(11)


def test_precomputed_matches_online_and_numpy(models, tmp_path):
  policy, ref_model = models
  rng = np.random.default_rng(0)
  data = [make_batch(rng, B=4) for _ in range(2)]
  # Examples 0..7 in a shuffled order, as a loader would hand them out.
  order = np.array([5, 2, 7, 0, 3, 6, 1, 4])
  batches = [(order[4 * i:4 * i + 4], data[i]) for i in range(2)]
  stored = reference.precompute(ref_model, batches, str(tmp_path / "ref"), num_examples=8, chunk_size=4)
  loaded = reference.load(str(tmp_path / "ref"))
  for indices, batch in batches:
    for side in ("chosen", "rejected"):
      expected = numpy_seq_logps(ref_model, batch, side)
      np.testing.assert_allclose(loaded[f"reference_{side}_logps"][indices], expected, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(stored[f"reference_{side}_mean_logps"][indices],
                                 numpy_seq_logps(ref_model, batch, side, average=True), rtol=1e-5, atol=1e-5)

  cfg = algorithms.loss("dpo", beta=0.5)
  tx = optax.adam(1e-2)
  online_ref, frozen = reference.online(ref_model)
  pre_ref, _ = reference.precomputed()
  online_step = steps.make_train_step(policy, tx, cfg, online_ref)
  pre_step = steps.make_train_step(policy, tx, cfg, pre_ref)
  s_on, s_pre = steps.init_state(policy, tx), steps.init_state(policy, tx)
  for indices, batch in batches:
    s_on, m_on = online_step(s_on, batch, frozen)
    s_pre, m_pre = pre_step(s_pre, reference.attach(batch, loaded, indices), {})
    np.testing.assert_allclose(float(m_pre["loss"]), float(m_on["loss"]), rtol=1e-5, atol=1e-6)
  assert_params_close(s_pre.params, s_on.params, rtol=1e-4, atol=1e-6)


def test_average_log_prob_reads_mean_logps(models, tmp_path):
  policy, ref_model = models
  batch = make_batch(np.random.default_rng(1), B=4)
  idx = np.arange(4)
  store = reference.precompute(ref_model, [(idx, batch)], str(tmp_path / "r"), num_examples=4)
  cfg = algorithms.loss("ipo", beta=0.5, average_log_prob=True)
  evaluate = steps.make_eval_step(policy, cfg, reference.precomputed()[0])
  params = steps.init_state(policy, optax.sgd(0.1)).params
  got = float(evaluate(params, reference.attach(batch, store, idx), {})["loss"])
  pc, pr = (numpy_seq_logps(policy, batch, s, average=True) for s in ("chosen", "rejected"))
  rc, rr = (numpy_seq_logps(ref_model, batch, s, average=True) for s in ("chosen", "rejected"))
  from tests import numpy_reference as ref_np
  np.testing.assert_allclose(got, np.mean(ref_np.gpo(pc, pr, rc, rr, 0.5, "squared")), rtol=1e-4, atol=1e-6)


def test_reference_free_dpo_matches_numpy(models):
  policy, _ = models
  batch = make_batch(np.random.default_rng(2))
  cfg = algorithms.loss("dpo", beta=0.05)
  evaluate = steps.make_eval_step(policy, cfg, reference.free()[0])
  params = steps.init_state(policy, optax.sgd(0.1)).params
  got = float(evaluate(params, batch, {})["loss"])
  np.testing.assert_allclose(got, numpy_loss("dpo", policy, None, batch, beta=0.05), rtol=1e-5, atol=1e-6)


def test_errors(models, tmp_path):
  policy, ref_model = models
  with pytest.raises(ValueError, match="reference_logps.json"):
    reference.load(str(tmp_path / "missing"))
  batch = make_batch(np.random.default_rng(3), B=2)
  store = reference.precompute(ref_model, [(np.array([0, 1]), batch)], str(tmp_path / "p"), num_examples=4)
  with pytest.raises(ValueError, match="never computed"):
    reference.attach(batch, store, np.array([2, 3]))
  with pytest.raises(ValueError, match="mode"):
    reference.Reference("offline")
  with pytest.raises(ValueError, match="needs batch keys"):
    steps.make_eval_step(policy, algorithms.loss("dpo"), reference.precomputed()[0])(
        steps.init_state(policy, optax.sgd(0.1)).params, batch, {})
