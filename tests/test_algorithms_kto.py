"""KTO in the registry: TRL's KL rotation, the objective vs float64 NumPy, the whole-batch KL point.

References: TRL's ``DataCollatorForUnpairedPreference`` on examples rotated as
TRL's ``KTOTrainer`` rotates them; Eq. 7 of arXiv:2402.01306 in float64 NumPy on
plain full-logits forwards (tests/test_steps.py); the NumPy reference point over
the whole batch, which differs from the per-micro-batch one (so the
accumulation and mesh tests can fail).
"""

import math

import numpy as np
import optax
import pytest

from alignjax.data import batch as batch_lib
from alignjax.losses import kto_mismatched_pairs
from alignjax.training import algorithms, config as config_lib, loop, reference, steps
from tests.test_steps import make_batch, numpy_seq_logps, tiny_model

BETA, WD, WU = 0.7, 1.3, 0.8


def _unpaired(seed, pairs=4, T=12):
  batch = batch_lib.unpair(make_batch(np.random.default_rng(seed), B=pairs, T=T, left_pad=False))
  return dict(batch, **batch_lib.mismatched_rows(batch))


def test_mismatched_rows_equal_trls_rotation():
  torch = pytest.importorskip("torch")
  from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference
  rng = np.random.default_rng(3)
  examples, rows = [], []
  for _ in range(5):
    prompt = rng.integers(1, 40, int(rng.integers(1, 4))).tolist()
    completion = rng.integers(1, 40, int(rng.integers(1, 4))).tolist()
    examples.append({"prompt_ids": prompt, "completion_ids": completion, "label": True})
    rows.append(prompt + completion)
  # TRL's KTOTrainer: examples["KL_completion_ids"] = [completions[-1]] + completions[:-1] per batch.
  completions = [e["completion_ids"] for e in examples]
  for e, c in zip(examples, [completions[-1]] + completions[:-1]):
    e["KL_completion_ids"] = c
  want = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
  T = max(len(r) for r in rows) + 3      # ours keep the batch's length; the rotated rows fit in it
  batch = {"completion_tokens": np.zeros((5, T), np.int32), "completion_attention": np.zeros((5, T), bool),
           "completion_response": np.zeros((5, T), bool)}
  for i, e in enumerate(examples):
    n, p = len(rows[i]), len(e["prompt_ids"])
    batch["completion_tokens"][i, :n] = rows[i]
    batch["completion_attention"][i, :n] = True
    batch["completion_response"][i, p:n] = True
  got = batch_lib.mismatched_rows(batch)
  t = want["KL_input_ids"].shape[1]
  np.testing.assert_array_equal(got["kl_tokens"][:, :t], want["KL_input_ids"].numpy())
  np.testing.assert_array_equal(got["kl_attention"][:, :t], want["KL_attention_mask"].numpy().astype(bool))
  np.testing.assert_array_equal(got["kl_response"][:, :t], want["KL_completion_mask"].numpy().astype(bool))
  assert not got["kl_attention"][:, t:].any()
  # The loss module's index map is the same rotation.
  for i, j in enumerate(kto_mismatched_pairs(5)):
    np.testing.assert_array_equal(got["kl_tokens"][i][got["kl_response"][i]], completions[j])
  del torch


def _numpy_kto(policy, ref_model, batch, rows=None):
  """Eq. 7 with the reference point over ``rows`` (default all) of the batch, float64."""
  pol = numpy_seq_logps(policy, batch, "completion")
  ref = numpy_seq_logps(ref_model, batch, "completion")
  diff = numpy_seq_logps(policy, batch, "kl") - numpy_seq_logps(ref_model, batch, "kl")
  z0 = max(0.0, float(np.mean(diff if rows is None else diff[rows])))
  sig = lambda x: 1.0 / (1.0 + math.exp(-x))
  losses = [WD * (1 - sig(BETA * (r - z0))) if d else WU * (1 - sig(BETA * (z0 - r)))
            for r, d in zip(pol - ref, batch["desirable"])]
  return np.asarray(losses), z0


@pytest.fixture(scope="module")
def setup():
  policy, ref_model = tiny_model(31), tiny_model(30)
  batch = _unpaired(5)
  loss = algorithms.loss("kto", beta=BETA, desirable_weight=WD, undesirable_weight=WU)
  return policy, ref_model, batch, loss


@pytest.fixture(scope="module")
def one_step(setup):
  policy, ref_model, batch, loss = setup
  ref, frozen = reference.online(ref_model)
  tx = optax.sgd(0.1)
  step = steps.make_train_step(policy, tx, loss, ref)
  state, metrics = step(steps.init_state(policy, tx), batch, frozen)
  return tx, state, metrics


def test_registry_entry():
  algo = algorithms.get("kto")
  assert algo.schema == "unpaired" and algo.kl_rows and algo.needs == "reference_logps"
  with pytest.raises(ValueError, match="undesirable_weight"):
    algorithms.loss("kto", undesirable_weight=-1.0)


def test_step_loss_matches_numpy(setup, one_step):
  policy, ref_model, batch, _ = setup
  _, _, metrics = one_step
  losses, z0 = _numpy_kto(policy, ref_model, batch)
  assert z0 > 0.05          # the clamp is not what makes the estimates agree
  np.testing.assert_allclose(float(metrics["loss"]), losses.mean(), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(float(metrics["kto/kl"]), z0, rtol=2e-5, atol=2e-6)


def test_kl_point_is_over_the_whole_batch_with_accumulation_and_on_8_devices(setup, one_step):
  from alignjax import sharding
  policy, ref_model, batch, loss = setup
  tx, state1, m1 = one_step
  B = batch["desirable"].shape[0]
  # Micro-batch 0 of grad_accum=2 holds rows 0, 2, 4, ...: its own estimate differs from the batch's.
  _, z0 = _numpy_kto(policy, ref_model, batch)
  _, z_micro = _numpy_kto(policy, ref_model, batch, rows=np.arange(0, B, 2))
  assert abs(z_micro - z0) > 1e-3
  ref, frozen = reference.online(ref_model)
  step2 = steps.make_train_step(policy, tx, loss, ref, grad_accum=2)
  state2, m2 = step2(steps.init_state(policy, tx), batch, frozen)
  mesh = sharding.make_mesh(8, 1, 1)
  sref, sfrozen = reference.online(ref_model, mesh=mesh)
  step8 = steps.make_train_step(policy, tx, loss, sref, mesh=mesh, grad_accum=1)
  state8, m8 = step8(steps.init_state(policy, tx, mesh=mesh), batch, sfrozen)
  for m in (m2, m8):
    np.testing.assert_allclose(float(m["kto/kl"]), z0, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  eval_step = steps.make_eval_step(policy, loss, ref)
  ev = eval_step(state1.params, batch, frozen)
  trained = steps.update_model(tiny_model(31), state1)
  np.testing.assert_allclose(float(ev["kto/kl"]), _numpy_kto(trained, ref_model, batch)[1], rtol=2e-5, atol=2e-6)


def test_objective_without_kl_rows_says_how_to_add_them(setup):
  policy, ref_model, batch, loss = setup
  ref, frozen = reference.online(ref_model)
  step = steps.make_eval_step(policy, loss, ref)
  with pytest.raises(ValueError, match="mismatched_rows"):
    step(steps.init_state(policy, optax.sgd(0.1)).params,
         {k: v for k, v in batch.items() if not k.startswith("kl_")}, frozen)


def test_trains_end_to_end_on_paired_data(tmp_path):
  cfg = config_lib.build(None, **{
      "data.train_examples": 32, "data.eval_examples": 8, "model.hidden_size": 16, "model.intermediate_size": 32,
      "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 8,
      "sft.steps": 2, "dpo.steps": 3, "batch_size": 4, "eval_batch_size": 8, "log_every": 1,
      "loss.name": "kto", "loss.desirable_weight": 1.2})
  out = loop.run(cfg, workdir=str(tmp_path), handle_signals=False)
  assert out["steps"] == 5 and np.isfinite(out["eval_after"]["loss"])
  assert out["eval_after"]["kto/desirable"] == pytest.approx(0.5)       # unpaired: chosen rows desirable
  assert out["eval_after"]["loss"] != out["eval_before"]["loss"]
