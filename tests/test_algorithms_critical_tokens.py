"""Critical-token cDPO: weights vs transformers, the objective vs float64 NumPy, the pipeline end to end.

References:
* the contrastive-estimation formula ``softmax(2 z_pos - z_neg)[token]`` in
  float64 NumPy on the logits of transformers models holding the same weights
  as the two alignjax models (``to_hf`` then ``AutoModelForCausalLM``);
* the authors' per-position loss (``CDPOTrainer``: TRL's sigmoid loss on
  per-token log-ratios, mean over batch and positions) in float64 NumPy on
  plain full-logits forwards.
"""

import numpy as np
import pytest

from alignjax import models
from alignjax.data import arrays_tfds
from alignjax.study import critical_tokens as ct
from alignjax.training import algorithms, reference
from tests import numpy_reference as ref_np
from tests.algorithm_helpers import TINY_RUN, accumulated_loss, tiny_run
from tests.hf_fixtures import load_hf_torch, torch_logits
from tests.test_steps import VOCAB, make_batch, plain_logits, tiny_model


@pytest.fixture(scope="module")
def setup():
  pos, neg = tiny_model(60), tiny_model(61)
  batch = make_batch(np.random.default_rng(9), B=4, T=12)
  return pos, neg, batch


def test_weights_match_transformers_contrastive_estimation(setup, tmp_path):
  pos, neg, batch = setup
  got = ct.token_weights(pos, neg, batch, batch_size=3)
  hf = {name: load_hf_torch(models.to_hf(m, str(tmp_path / name))) for name, m in (("pos", pos), ("neg", neg))}
  for side in ("chosen", "rejected"):
    tokens, att, resp = (batch[f"{side}_{f}"] for f in ("tokens", "attention", "response"))
    z = {k: torch_logits(m, tokens, att).astype(np.float64) for k, m in hf.items()}
    want = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
      for t in range(1, tokens.shape[1]):
        if resp[b, t]:
          p = np.exp(ref_np.log_softmax(2 * z["pos"][b, t - 1] - z["neg"][b, t - 1]))[tokens[b, t]]
          want[b, t] = p if side == "chosen" else 1 - p
    np.testing.assert_allclose(got[f"{side}_weights"], want, rtol=2e-4, atol=2e-5, err_msg=side)
  assert got["rejected_weights"][batch["rejected_response"]].std() > 1e-3      # weights vary across tokens
  # One batch of all 4 rows (3 + 1 padded above), and a split with no rows.
  whole = ct.token_weights(pos, neg, batch)
  for k, v in got.items():
    np.testing.assert_allclose(whole[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  empty = ct.token_weights(pos, neg, {k: v[:0] for k, v in batch.items()})
  assert all(v.shape == (0, batch["chosen_tokens"].shape[1]) for v in empty.values())


def _numpy_position_loss(policy, ref_model, batch, beta, eps):
  """Authors' cDPO: per position t, l(beta (c_t - w_t r_t)), mean over every label position."""
  def token_ratios(side):
    out = []
    for m in (policy, ref_model):
      logits = plain_logits(m, batch[f"{side}_tokens"], batch[f"{side}_attention"])[:, :-1]
      lp = np.stack([[ref_np.log_softmax(logits[b, t])[batch[f"{side}_tokens"][b, t + 1]]
                      for t in range(logits.shape[1])] for b in range(logits.shape[0])])
      out.append(lp)
    return (out[0] - out[1]) * batch[f"{side}_response"][:, 1:]
  c, r = token_ratios("chosen"), token_ratios("rejected")
  w = batch["rejected_weights"][:, 1:]
  z = beta * (c - w * r)
  per = np.vectorize(lambda x: -(1 - eps) * ref_np.log_sigmoid(x) - eps * ref_np.log_sigmoid(-x))(z)
  return per.mean()


@pytest.mark.parametrize("pairing", ["position", "sequence"])
def test_objective_matches_numpy(setup, pairing):
  pos, neg, batch = setup
  policy, ref_model = tiny_model(62), tiny_model(63)
  batch = dict(batch, **ct.token_weights(pos, neg, batch))
  loss = algorithms.loss("critical_tokens", beta=0.5, label_smoothing=0.1, pairing=pairing)
  got, _ = accumulated_loss(loss, policy, {"reference": ref_model}, batch, k=2)
  if pairing == "position":
    want = _numpy_position_loss(policy, ref_model, batch, 0.5, 0.1)
  else:
    # Token-weighted sequence margin: sum_t c_t - sum_t w_t r_t.
    def weighted(m, side, w):
      logits = plain_logits(m, batch[f"{side}_tokens"], batch[f"{side}_attention"])[:, :-1]
      labels, mask = batch[f"{side}_tokens"][:, 1:], batch[f"{side}_response"][:, 1:]
      return np.array([sum(w[b, t] * ref_np.log_softmax(logits[b, t])[labels[b, t]]
                           for t in range(labels.shape[1]) if mask[b, t]) for b in range(labels.shape[0])])
    ones = np.ones_like(batch["rejected_weights"][:, 1:])
    wr = batch["rejected_weights"][:, 1:]
    h = (weighted(policy, "chosen", ones) - weighted(ref_model, "chosen", ones)
         - weighted(policy, "rejected", wr) + weighted(ref_model, "rejected", wr))
    want = np.mean([-(0.9) * ref_np.log_sigmoid(0.5 * x) - 0.1 * ref_np.log_sigmoid(-0.5 * x) for x in h])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_missing_weights_name_the_pipeline(setup):
  pos, _, batch = setup
  loss = algorithms.loss("critical_tokens")
  ctx = algorithms.Context(pos, {"reference": pos}, reference.online(pos)[0], 4)
  with pytest.raises(ValueError, match="rejected_weights.*weight_pairs"):
    loss.algorithm.objective(loss.hparams, ctx, batch)
  with pytest.raises(ValueError, match="pairing"):
    algorithms.loss("critical_tokens", pairing="token")


def test_pipeline_trains_contrast_models_and_critical_tokens_end_to_end(tmp_path):
  rng = np.random.default_rng(10)
  data = arrays_tfds.write_arrays(str(tmp_path / "pairs"), {"train": make_batch(rng, B=16, T=10),
                                                            "eval": make_batch(rng, B=8, T=10)},
                                  metadata={"vocab_size": VOCAB})
  small = {k: v for k, v in TINY_RUN.items() if k.startswith("model.") or k in ("batch_size", "eval_batch_size")}
  weighted = ct.critical_token_data(data, str(tmp_path / "ct"), fields={**small, "sft.steps": 2, "log_every": 1})
  meta = arrays_tfds.read_metadata(weighted)
  assert meta["critical_token_weights"] and meta["splits"] == {"train": 16, "eval": 8}
  out = tiny_run(tmp_path / "run", "critical_tokens", **{"data.kind": "arrays", "data.path": weighted,
                                                           "data.train_examples": 16})
  assert out["steps"] == 3 and np.isfinite(out["eval_after"]["loss"])
  assert 0 < out["eval_after"]["critical/mean_rejected_weight"] < 1
