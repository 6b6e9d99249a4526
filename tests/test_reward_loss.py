"""bradley_terry_loss against float64 NumPy of the equation and against TRL's own
``RewardTrainer.compute_loss`` (called on a stand-in model that returns fixed scores)."""

import collections
import types

import jax
import numpy as np
import pytest

from alignjax import losses as L


def _scores(seed, B=12):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=B) * 2).astype(np.float32), (rng.normal(size=B) * 2).astype(np.float32)


def _numpy_bt(c, r, margin, coef):
  c, r = c.astype(np.float64), r.astype(np.float64)
  x = c - r - (0.0 if margin is None else np.asarray(margin, np.float64))
  loss = np.log1p(np.exp(-x))  # -log sigmoid(x)
  if coef is not None:
    loss = loss + coef * (c + r) ** 2
  return loss


@pytest.mark.parametrize("margin", [None, 0.5, "per_row"])
@pytest.mark.parametrize("coef", [None, 0.01, 0.3])
def test_bradley_terry_matches_numpy_float64(margin, coef):
  c, r = _scores(0)
  if margin == "per_row":
    margin = np.linspace(-1.0, 2.0, c.shape[0]).astype(np.float32)
  losses, out = L.bradley_terry_loss(c, r, margin=margin, center_rewards_coefficient=coef)
  assert losses.shape == (12,) and losses.dtype == np.float32
  np.testing.assert_allclose(losses, _numpy_bt(c, r, margin, coef), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.margins, c.astype(np.float64) - r, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out.accuracies, (c > r).astype(np.float32))


def test_bradley_terry_gradient_matches_numpy():
  c, r = _scores(1, B=5)
  grad = jax.grad(lambda c, r: L.bradley_terry_loss(c, r, margin=0.2, center_rewards_coefficient=0.1)[0].sum(),
                  argnums=(0, 1))(c, r)
  c64, r64 = c.astype(np.float64), r.astype(np.float64)
  s = 1.0 / (1.0 + np.exp(-(c64 - r64 - 0.2)))
  np.testing.assert_allclose(grad[0], -(1 - s) + 0.2 * (c64 + r64), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad[1], (1 - s) + 0.2 * (c64 + r64), rtol=1e-5, atol=1e-6)


def _trl_compute_loss(chosen, rejected, margin, coef):
  """TRL's RewardTrainer.compute_loss, run unbound on a stand-in trainer and model."""
  torch = pytest.importorskip("torch")
  trl = pytest.importorskip("trl")
  logits = torch.tensor(np.concatenate([chosen, rejected]), dtype=torch.float32)[:, None]

  class Model(torch.nn.Module):
    def forward(self, **kwargs):
      del kwargs
      return types.SimpleNamespace(logits=logits)

  model = Model().eval()
  accelerator = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
  fake = types.SimpleNamespace(
      model=model, args=types.SimpleNamespace(center_rewards_coefficient=coef),
      accelerator=accelerator, _metrics={"train": collections.defaultdict(list),
                                          "eval": collections.defaultdict(list)},
      _total_train_tokens=0, _tp_size=1)
  inputs = {"input_ids": torch.zeros((2 * len(chosen), 3), dtype=torch.long),
            "attention_mask": torch.ones((2 * len(chosen), 3), dtype=torch.long)}
  if margin is not None:
    inputs["margin"] = torch.tensor(np.broadcast_to(margin, chosen.shape).copy(), dtype=torch.float32)
  with torch.no_grad():
    loss = trl.RewardTrainer.compute_loss(fake, model, inputs)
  return float(loss), fake._metrics["eval"]


@pytest.mark.parametrize("margin, coef", [(None, None), ("per_row", None), (None, 0.01), ("per_row", 0.2)])
def test_bradley_terry_mean_equals_trl_reward_trainer(margin, coef):
  c, r = _scores(2, B=8)
  if margin == "per_row":
    margin = np.linspace(0.0, 1.5, 8).astype(np.float32)
  want, metrics = _trl_compute_loss(c, r, margin, coef)
  losses, out = L.bradley_terry_loss(c, r, margin=margin, center_rewards_coefficient=coef)
  np.testing.assert_allclose(float(losses.mean()), want, rtol=1e-5)
  np.testing.assert_allclose(float(out.accuracies.mean()), metrics["accuracy"][0], rtol=1e-6)
  np.testing.assert_allclose(float(out.margins.mean()), metrics["margin"][0], rtol=1e-5, atol=1e-6)


def test_bradley_terry_bad_inputs_raise_one_line_errors():
  c, r = _scores(3, B=4)
  for kwargs, match in [
      (dict(chosen_scores=c[:, None], rejected_scores=r), "chosen_scores"),
      (dict(chosen_scores=c, rejected_scores=r[:3]), "share one shape"),
      (dict(chosen_scores=c, rejected_scores=r, margin=np.zeros(3)), "margin"),
      (dict(chosen_scores=c, rejected_scores=r, center_rewards_coefficient=-1.0), "center_rewards"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      L.bradley_terry_loss(**kwargs)
    assert "\n" not in str(e.value)
