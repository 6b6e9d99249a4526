"""Gradient entanglement and CHES against transformers models holding the same weights.

References: per-pair gradients of ``log pi(y|x)`` by torch autograd on the
transformers model written by ``to_hf`` (inner products and norms summed over
all its parameters), and CHES from ``output_hidden_states[-1]`` of that model
in float64 NumPy (Razin et al. 2024, Definition 2).
"""

import numpy as np
import pytest
from flax import nnx

from alignjax import models
from alignjax.training import diagnostics as displacement
from alignjax.training import diagnostics
from tests.hf_fixtures import load_hf_torch
from tests.test_steps import make_batch, tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  model = tiny_model(70)
  batch = make_batch(np.random.default_rng(11), B=3, T=10, left_pad=False)
  hf = load_hf_torch(models.to_hf(model, str(tmp_path_factory.mktemp("hf") / "m")))
  return model, batch, hf


def _torch_grads(hf, batch, side, b):
  import torch
  tokens = torch.tensor(batch[f"{side}_tokens"][b:b + 1].astype(np.int64))
  att = torch.tensor(batch[f"{side}_attention"][b:b + 1].astype(np.int64))
  hf.zero_grad()
  logits = hf(input_ids=tokens, attention_mask=att).logits[:, :-1].double()
  lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
  (lp * torch.tensor(batch[f"{side}_response"][b:b + 1, 1:].astype(np.float64))).sum().backward()
  return np.concatenate([p.grad.double().numpy().ravel() for p in hf.parameters()])


def test_entanglement_matches_torch_autograd(setup):
  model, batch, hf = setup
  fn = diagnostics.make_entanglement_fn(model, chunk_size=4)
  got = fn(nnx.split(model, nnx.Param, ...)[1], batch)
  inner, cos, nc, neg = [], [], [], []
  for b in range(3):
    gc, gr = _torch_grads(hf, batch, "chosen", b), _torch_grads(hf, batch, "rejected", b)
    inner.append(gc @ gr)
    nc.append(np.linalg.norm(gc))
    cos.append(gc @ gr / (np.linalg.norm(gc) * np.linalg.norm(gr)))
    neg.append(float(gc @ gr > gc @ gc))
  np.testing.assert_allclose(float(got["entanglement/inner_product"]), np.mean(inner), rtol=2e-3)
  np.testing.assert_allclose(float(got["entanglement/cosine"]), np.mean(cos), rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(float(got["entanglement/chosen_grad_norm"]), np.mean(nc), rtol=2e-3)
  assert float(got["entanglement/negative_fraction"]) == pytest.approx(np.mean(neg))


def test_ches_scores_and_filter_match_transformers_hidden_states(setup):
  import torch
  model, batch, hf = setup
  h = {}
  for side in ("chosen", "rejected"):
    with torch.no_grad():
      out = hf(input_ids=torch.tensor(batch[f"{side}_tokens"].astype(np.int64)),
               attention_mask=torch.tensor(batch[f"{side}_attention"].astype(np.int64)), output_hidden_states=True)
    h[side] = out.hidden_states[-1].double().numpy()
  want = []
  for b in range(3):
    # The states that predict response tokens: positions t with response[t + 1].
    s = {side: h[side][b, :-1][batch[f"{side}_response"][b, 1:]] for side in h}
    sp, sn = s["chosen"].sum(0), s["rejected"].sum(0)
    npos, nneg = len(s["chosen"]), len(s["rejected"])
    want.append(sp @ sn / (npos * nneg) - sp @ sp / npos ** 2)
  got = displacement.ches_scores(model, batch, batch_size=2)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
  kept, scores = displacement.ches_filter(model, dict(batch, ids=np.arange(3)), keep_fraction=0.5)
  lowest = sorted(np.argsort(want)[:2])
  np.testing.assert_array_equal(kept["ids"], lowest)
  np.testing.assert_array_equal(kept["chosen_tokens"], batch["chosen_tokens"][lowest])
  with pytest.raises(ValueError, match="keep_fraction"):
    displacement.ches_filter(model, batch, keep_fraction=0.0)
