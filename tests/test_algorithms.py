"""Tests for alignjax.training.algorithms: the registry, hyper-parameters and objectives.

Independent references: float64 NumPy equations (tests/numpy_reference.py for
DPO/cDPO/robust/GPO/TDPO1; an inline float64 NumPy of DESIGN.md's AlignDistil
equations; token-mean NLL for SFT) applied to plain full-logits forwards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax import losses as L
from alignjax.training import algorithms, reference, steps
from tests import numpy_reference as ref_np
from tests.test_steps import make_batch, numpy_loss, plain_logits, tiny_model

SEQUENCE_NAMES = sorted(set(L.GPO_FUNCTIONS) | set(L.GPO_ALIASES))


@pytest.fixture(scope="module")
def models():
  return tiny_model(20), tiny_model(21), tiny_model(22)


@pytest.fixture(scope="module")
def batch():
  return make_batch(np.random.default_rng(0), B=3, T=10)


def _params(model):
  return steps.init_state(model, optax.sgd(0.1)).params


def test_every_name_builds_and_declares_needs():
  expected = set(SEQUENCE_NAMES) | {"tdpo1", "tdpo2", "aligndistil", "sft"}
  assert expected <= set(algorithms.names())
  for name in algorithms.names():
    algo = algorithms.get(name)
    loss = algorithms.loss(name)
    assert loss.algorithm is algo and algo.name == name and isinstance(loss.hparams, algo.hparams)
    assert algo.needs in algorithms.NEEDS and algo.schema in algorithms.SCHEMAS


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as err:
    algorithms.loss("no_such_method")
  message = str(err.value)
  assert "\n" not in message and "`name`" in message
  for name in algorithms.names():
    assert repr(name) in message
  with pytest.raises(ValueError, match="'tdpo1'"):
    algorithms.get("kto_v9")


@pytest.mark.parametrize("name, kwargs, field", [
    ("dpo", {"beta": 0.0}, "beta"),
    ("ipo", {"label_smoothing": 0.1}, "label_smoothing"),
    ("dpo", {"robust": True, "label_smoothing": 0.5}, "label_smoothing"),
    ("dpo", {"label_smoothing": -0.1}, "label_smoothing"),
    ("tdpo2", {"alpha": -1.0}, "alpha"),
    ("aligndistil", {"beta2": 0.0}, "beta2"),
    ("aligndistil", {"mode": "theorem2"}, "mode"),
    ("aligndistil", {"temperature": 0.0}, "temperature"),
])
def test_invalid_fields_raise_naming_the_field(name, kwargs, field):
  with pytest.raises(ValueError, match=field) as err:
    algorithms.loss(name, **kwargs)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="betta"):
    algorithms.loss("dpo", betta=0.1)


CASES = [(n, {}) for n in SEQUENCE_NAMES] + [
    ("dpo", {"label_smoothing": 0.2}), ("dpo", {"label_smoothing": 0.2, "robust": True}),
    ("tdpo1", {}), ("tdpo2", {"alpha": 0.3}), ("sft", {}),
    ("aligndistil", {"beta2": 2.0, "temperature": 1.5})]
BETA = 0.7


def _case_id(name, extra):
  return name + "".join(f"-{k}={v}" for k, v in extra.items())


@pytest.fixture(scope="module")
def table_losses(models, batch):
  """Every table entry's mean loss, computed by the objectives in ONE jitted program."""
  policy, m1, m2 = models
  ref_spec = reference.online(m1)[0]
  teacher_spec = reference.teachers(dpo=m1, contrast=m2)[0]

  def run():
    out = {}
    for name, extra in CASES:
      loss = algorithms.loss(name, **({} if name == "sft" else {"beta": BETA}), **extra)
      spec, frozen = ((teacher_spec, {"dpo": m1, "contrast": m2}) if name == "aligndistil"
                      else (ref_spec, {"reference": m1}))
      ctx = algorithms.Context(policy, frozen, spec, 4)
      o = loss.algorithm.objective(loss.hparams, ctx, batch)
      out[_case_id(name, extra)] = jnp.sum(o.losses * o.weights) / jnp.sum(o.weights)
    return out
  return {k: float(v) for k, v in jax.jit(run)().items()}


@pytest.mark.parametrize("name, extra", [c for c in CASES if c[0] not in ("sft", "aligndistil")],
                         ids=lambda c: str(c))
def test_preference_objectives_match_numpy(models, batch, table_losses, name, extra):
  policy, ref_model, _ = models
  got = table_losses[_case_id(name, extra)]
  expected = numpy_loss(name, policy, ref_model, batch, beta=BETA, alpha=extra.get("alpha", 0.5),
                        label_smoothing=extra.get("label_smoothing", 0.0), robust=extra.get("robust", False))
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def test_sft_matches_numpy_token_mean_nll(models, batch, table_losses):
  policy = models[0]
  got = table_losses["sft"]
  logits = plain_logits(policy, batch["chosen_tokens"], batch["chosen_attention"])[:, :-1]
  mask = batch["chosen_response"][:, 1:]
  total = ref_np.seq_logprob(logits, batch["chosen_tokens"][:, 1:], mask).sum()
  np.testing.assert_allclose(got, -total / mask.sum(), rtol=2e-5)


def _numpy_aligndistil(student, dpo, contrast, mask, beta, beta2, temperature):
  """DESIGN.md AlignDistil, mode "aligndistil", float64, per-example token mean."""
  B, T, _ = student.shape
  out = np.zeros(B)
  for b in range(B):
    total, n = 0.0, 0
    for t in range(T):
      if not mask[b, t]:
        continue
      ld, lc = ref_np.log_softmax(dpo[b, t]), ref_np.log_softmax(contrast[b, t])
      w = beta2 * np.abs(np.exp(ld) - np.exp(lc)).sum() + 1e-3
      target = ref_np.log_softmax((dpo[b, t] + w * (dpo[b, t] - contrast[b, t])) / temperature)
      ls = ref_np.log_softmax(student[b, t])
      total += beta / w * float(np.sum(np.exp(ls) * (ls - target)))
      n += 1
    out[b] = total / max(n, 1)
  return out


def test_aligndistil_matches_numpy(models, batch, table_losses):
  got = table_losses[_case_id("aligndistil", {"beta2": 2.0, "temperature": 1.5})]
  # Off-policy AlignDistil distils the chosen responses only (the authors' off-policy trainer).
  tok, att = batch["chosen_tokens"], batch["chosen_attention"]
  logits = [plain_logits(m, tok, att)[:, :-1] for m in models]
  want = _numpy_aligndistil(*logits, batch["chosen_response"][:, 1:], BETA, 2.0, 1.5)
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-4, atol=1e-6)
