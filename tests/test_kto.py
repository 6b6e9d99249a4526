"""KTO against a float64 NumPy transcription of Eq. (7) and against TRL's KTOTrainer."""

import math
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L


def _np_sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _np_kto(pol, ref, des, kl, beta, wd, wu):
  """Loop transcription of Eq. (7) of arXiv:2402.01306 and its derivative wrt pol."""
  losses, grads = np.zeros(len(pol)), np.zeros(len(pol))
  for i in range(len(pol)):
    r = float(pol[i]) - float(ref[i])
    if des[i]:
      s = _np_sigmoid(beta * (r - kl))
      losses[i], grads[i] = wd * (1 - s), -wd * beta * s * (1 - s)
    else:
      s = _np_sigmoid(beta * (kl - r))
      losses[i], grads[i] = wu * (1 - s), wu * beta * s * (1 - s)
  return losses, grads


def _inputs(rng, B=7):
  pol = (rng.normal(size=B) * 3 - 20).astype(np.float32)
  ref = (pol + rng.normal(size=B) * 2).astype(np.float32)
  pkl = (rng.normal(size=B) * 3 - 22).astype(np.float32)
  rkl = (pkl + rng.normal(size=B) * 2 - 0.5).astype(np.float32)
  des = rng.random(B) < 0.5
  des[0], des[1] = True, False
  return pol, ref, des, pkl, rkl


@pytest.mark.parametrize("beta, wd, wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7), (2.0, 0.0, 1.0)])
def test_kto_matches_numpy_values_and_grads(rng, beta, wd, wu):
  pol, ref, des, pkl, rkl = _inputs(rng)
  kl = L.kto_kl_estimate(pkl, rkl)
  kl_np = max(0.0, float(np.mean(pkl.astype(np.float64) - rkl)))
  np.testing.assert_allclose(kl, kl_np, rtol=1e-6, atol=1e-6)
  losses, out = L.kto_loss(pol, ref, des, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
  want, dwant = _np_kto(pol, ref, des, kl_np, beta, wd, wu)
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)
  rewards = beta * (pol.astype(np.float64) - ref)
  np.testing.assert_allclose(out.rewards, rewards, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.chosen_rewards, np.where(des, rewards, 0.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.rejected_rewards, np.where(des, 0.0, rewards), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.desirable, des.astype(np.float32))
  g_pol, g_ref, g_pkl = jax.grad(
      lambda p, r, k: L.kto_loss(p, r, des, L.kto_kl_estimate(k, rkl), beta=beta,
                                 desirable_weight=wd, undesirable_weight=wu)[0].sum(),
      argnums=(0, 1, 2))(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(pkl))
  np.testing.assert_allclose(g_pol, dwant, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(g_ref, 0.0)  # reference: stop-gradient
  np.testing.assert_array_equal(g_pkl, 0.0)  # the KL estimate is detached


def test_kl_clamped_and_all_desirable(rng):
  pol, ref, _, pkl, _ = _inputs(rng)
  kl = L.kto_kl_estimate(pkl, pkl + 3.0)  # negative mean log-ratio -> clamped to 0
  assert float(kl) == 0.0
  des = np.ones(len(pol), bool)
  losses, out = L.kto_loss(pol, ref, des, kl, beta=0.3)
  want, _ = _np_kto(pol, ref, des, 0.0, 0.3, 1.0, 1.0)
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.rejected_rewards, 0.0)
  # Integer 0/1 labels behave like bools.
  np.testing.assert_allclose(L.kto_loss(pol, ref, des.astype(np.int32), kl, beta=0.3)[0], losses)


def test_mismatched_pairs_is_trls_rotation():
  completions = [[4, 5], [9], [6], [10, 11]]
  rotated = [completions[-1]] + completions[:-1]  # TRL's add_kl_completion_ids
  idx = L.kto_mismatched_pairs(4)
  assert [completions[j] for j in idx] == rotated
  np.testing.assert_array_equal(L.kto_mismatched_pairs(1), [0])
  with pytest.raises(ValueError, match="kto_mismatched_pairs: `n`"):
    L.kto_mismatched_pairs(0)


def _trl_kto(pol, ref, des, pkl, rkl, beta, wd, wu):
  """TRL's KTOTrainer._compute_loss on a stand-in trainer and model (float64)."""
  torch = pytest.importorskip("torch")
  trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
  B = len(pol)
  pol_t = torch.tensor(pol, dtype=torch.float64, requires_grad=True)
  pkl_t = torch.tensor(pkl, dtype=torch.float64)
  ids = torch.ones(B, 2, dtype=torch.long)
  kl_ids = torch.ones(B, 2, dtype=torch.long)
  cmask = torch.tensor([[0, 1]] * B)
  batch = {
      "input_ids": ids, "attention_mask": torch.ones(B, 2, dtype=torch.long), "completion_mask": cmask,
      "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(B, 2, dtype=torch.long),
      "KL_completion_mask": cmask, "label": torch.tensor(des),
      "ref_logps": torch.tensor(ref, dtype=torch.float64),
      "ref_KL_logps": torch.tensor(rkl, dtype=torch.float64),
  }

  class Model:  # stand-in LM: per-token log-probs of one completion token per row
    training = True

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head, use_cache):
      lp = (pol_t if input_ids is ids else pkl_t)[:, None]
      zeros = torch.zeros(B, 1, dtype=torch.float64)
      return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros)

  acc = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x)
  stub = types.SimpleNamespace(
      model=Model(), accelerator=acc, calculate_KL=True, precompute_ref_logps=True, ref_model=None,
      aux_loss_enabled=False, loss_type="kto", beta=beta, desirable_weight=wd,
      undesirable_weight=wu, _metrics=defaultdict(lambda: defaultdict(list)),
      _total_train_tokens=0, _tp_size=1,
  )
  stub._compute_kl_logps = types.MethodType(trl_kto.KTOTrainer._compute_kl_logps, stub)
  loss = trl_kto.KTOTrainer._compute_loss(stub, stub.model, batch, return_outputs=False)
  loss.backward()
  return float(loss.detach()), pol_t.grad.numpy(), stub._metrics["train"]["kl"][0]


@pytest.mark.parametrize("all_desirable", [False, True])
def test_kto_matches_trl(rng, all_desirable):
  pol, ref, des, pkl, rkl = _inputs(rng)
  rkl = rkl - 1.0  # positive KL estimate so the clamp is not the whole story
  if all_desirable:
    des[:] = True
  beta, wd, wu = 0.4, 1.2, 0.8
  trl_loss, trl_grad, trl_kl = _trl_kto(pol, ref, des, pkl, rkl, beta, wd, wu)
  kl = L.kto_kl_estimate(pkl, rkl)
  assert float(kl) > 0
  np.testing.assert_allclose(kl, trl_kl, rtol=1e-5)
  f = lambda p: L.kto_loss(p, ref, des, kl, beta=beta, desirable_weight=wd,
                           undesirable_weight=wu)[0].mean()
  np.testing.assert_allclose(f(jnp.asarray(pol)), trl_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(pol)), trl_grad, rtol=1e-4, atol=1e-8)


def test_errors(rng):
  pol, ref, des, pkl, rkl = _inputs(rng)
  with pytest.raises(ValueError, match="kto_loss: `beta`"):
    L.kto_loss(pol, ref, des, 0.0, beta=0.0)
  with pytest.raises(ValueError, match="kto_loss: `kl` must be a scalar"):
    L.kto_loss(pol, ref, des, pkl)
  with pytest.raises(TypeError, match="kto_loss: `desirable`"):
    L.kto_loss(pol, ref, des.astype(np.float32), 0.0)
  with pytest.raises(ValueError, match="share one shape"):
    L.kto_loss(pol, ref[:-1], des, 0.0)
  with pytest.raises(ValueError, match="undesirable_weight"):
    L.kto_loss(pol, ref, des, 0.0, undesirable_weight=-1.0)
  with pytest.raises(ValueError, match="kto_kl_estimate"):
    L.kto_kl_estimate(pkl, rkl[:-1])
