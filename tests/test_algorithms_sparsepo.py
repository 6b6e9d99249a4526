"""SparsePO with fixed activation masks (MaPO) against float64 NumPy and transformers hidden states.

References: the authors' ``MAPOTrainer`` written out in float64 NumPy -- the
``zn_rescale`` mapping literally (feature mean, z-normalisation with the
unbiased std, min-max over the response labels), the reference's final hidden
states from transformers (``output_hidden_states[-1]`` of the ``to_hf`` model)
and its logits from a plain forward, per-token log-ratios and ``KL(pi_ref||pi)``
-- and, with uniform masks, TDPO1 of tests/numpy_reference.py (the stated identity).
"""

import numpy as np
import pytest

from alignjax import models
from alignjax.training import algorithms
from tests import numpy_reference as ref_np
from tests.algorithm_helpers import accumulated_loss, tiny_run
from tests.hf_fixtures import load_hf_torch
from tests.test_steps import make_batch, numpy_loss, plain_logits, tiny_model


@pytest.fixture(scope="module")
def setup():
  return tiny_model(80), tiny_model(81), make_batch(np.random.default_rng(12), B=4, T=12)


def test_uniform_masks_equal_tdpo1(setup):
  policy, ref_model, batch = setup
  got, metrics = accumulated_loss(algorithms.loss("sparsepo", beta=0.6, mask="uniform"), policy,
                                  {"reference": ref_model}, batch)
  np.testing.assert_allclose(got, numpy_loss("tdpo1", policy, ref_model, batch, beta=0.6), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(metrics["sparsepo/mask_mean_chosen"], 1.0)


def _zn_rescale(act, mask):
  a = act.mean(-1)
  out = np.zeros_like(a)
  for b in range(a.shape[0]):
    on = mask[b].astype(bool)
    z = (a[b] - a[b][on].mean()) / (a[b][on].std(ddof=1) + 1e-12)
    out[b] = (z - z[on].min()) / (z[on].max() - z[on].min()) * on
  return out


def test_activation_masks_match_numpy_mapo(setup, tmp_path):
  import torch
  policy, ref_model, batch = setup
  got, metrics = accumulated_loss(algorithms.loss("sparsepo", beta=0.6, mask="activations"), policy,
                                  {"reference": ref_model}, batch)
  hf = load_hf_torch(models.to_hf(ref_model, str(tmp_path / "ref")))
  side_terms = {}
  for side in ("chosen", "rejected"):
    tokens, att, resp = (batch[f"{side}_{f}"] for f in ("tokens", "attention", "response"))
    with torch.no_grad():
      # position_ids as the alignjax model counts them on left-padded rows.
      pos = torch.tensor(np.clip(np.cumsum(att, -1) - 1, 0, None))
      hidden = hf(input_ids=torch.tensor(tokens.astype(np.int64)), attention_mask=torch.tensor(att.astype(np.int64)),
                  position_ids=pos, output_hidden_states=True).hidden_states[-1].double().numpy()[:, :-1]
    zp = plain_logits(policy, tokens, att)[:, :-1]
    zr = plain_logits(ref_model, tokens, att)[:, :-1]
    m = resp[:, 1:]
    mask = (_zn_rescale(hidden, m) + _zn_rescale(zr, m)) / 2
    labels = tokens[:, 1:]
    u, k = np.zeros(len(tokens)), np.zeros(len(tokens))
    for b in range(len(tokens)):
      for t in range(labels.shape[1]):
        if m[b, t]:
          lp, lr = ref_np.log_softmax(zp[b, t]), ref_np.log_softmax(zr[b, t])
          u[b] += mask[b, t] * (lp[labels[b, t]] - lr[labels[b, t]])
          k[b] += mask[b, t] * ref_np.kl(zr[b, t], zp[b, t])
    side_terms[side] = (u, k, mask)
  (u_c, k_c, mask_c), (u_r, k_r, _) = side_terms["chosen"], side_terms["rejected"]
  want = np.mean([-ref_np.log_sigmoid(0.6 * x) for x in (u_c - u_r) - (k_r - k_c)])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  m = batch["chosen_response"][:, 1:][0::2]     # micro-batch 0 holds rows 0, 2
  np.testing.assert_allclose(metrics["sparsepo/mask_mean_chosen"], mask_c[0::2].sum(-1) / m.sum(-1),
                             rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(metrics["sparsepo/sparsity_chosen"], ((mask_c[0::2] <= 1e-9) & m).sum(-1) / m.sum(-1))


def test_mask_field_is_checked():
  with pytest.raises(ValueError, match="mask"):
    algorithms.loss("sparsepo", mask="bogus")


def test_trains_end_to_end(tmp_path):
  out = tiny_run(tmp_path, "sparsepo", **{"loss.mask": "activations"})
  assert out["steps"] == 3 and np.isfinite(out["eval_after"]["loss"])
  assert 0 < out["eval_after"]["sparsepo/mask_mean_chosen"] < 1
