"""ORPO in the registry against TRL's ORPOTrainer on plain forwards.

Reference: TRL's ``get_batch_logps`` (average) and ``odds_ratio_loss`` (a stub
``self``) on the float64 logits of a plain full-logits forward, and TRL's NLL
transcribed from ``ORPOTrainer.concatenated_forward`` (decoder-only: labels are
``input_ids`` where attended, so prompt tokens count; one token mean over the
batch's chosen rows). Ours runs as the step accumulates it (2 micro-batches).
"""

import types

import numpy as np
import pytest

from alignjax.training import algorithms
from tests.algorithm_helpers import accumulated_loss, tiny_run, trl_labels
from tests.test_steps import make_batch, plain_logits, tiny_model


@pytest.fixture(scope="module")
def setup():
  return tiny_model(42), make_batch(np.random.default_rng(6), B=4, T=12, left_pad=False)


def _trl_loss(policy, batch, beta, prompt):
  torch = pytest.importorskip("torch")
  orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
  logits = {s: torch.tensor(plain_logits(policy, batch[f"{s}_tokens"], batch[f"{s}_attention"]))
            for s in ("chosen", "rejected")}
  labels = {s: torch.tensor(trl_labels(batch, s)) for s in ("chosen", "rejected")}
  avg = {s: orpo.ORPOTrainer.get_batch_logps(logits[s], labels[s], average_log_prob=True) for s in logits}
  stub = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
  losses = orpo.ORPOTrainer.odds_ratio_loss(stub, avg["chosen"], avg["rejected"])[0]
  nll_labels = torch.tensor(trl_labels(batch, "chosen", prompt=prompt))
  nll = torch.nn.CrossEntropyLoss()(logits["chosen"][:, :-1].reshape(-1, logits["chosen"].shape[-1]),
                                    nll_labels[:, 1:].reshape(-1))
  return float(nll - losses.mean())   # ORPOTrainer.get_batch_loss_metrics


@pytest.mark.parametrize("nll_tokens", ["prompt_and_response", "response"])
def test_matches_trl_orpo(setup, nll_tokens):
  policy, batch = setup
  loss = algorithms.loss("orpo", beta=0.25, nll_tokens=nll_tokens)
  got, _ = accumulated_loss(loss, policy, {}, batch)
  want = _trl_loss(policy, batch, 0.25, prompt=nll_tokens == "prompt_and_response")
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_nll_is_one_token_mean_over_the_whole_batch(setup):
  """Per-micro-batch token means (no whole-batch statistics) would give another value."""
  policy, batch = setup
  loss = algorithms.loss("orpo", beta=0.25)
  whole, _ = accumulated_loss(loss, policy, {}, batch, k=1)
  accumulated, _ = accumulated_loss(loss, policy, {}, batch, k=4)
  np.testing.assert_allclose(accumulated, whole, rtol=1e-6)
  per_row = np.mean([accumulated_loss(loss, policy, {}, {k: v[i:i + 1] for k, v in batch.items()}, k=1)[0]
                     for i in range(4)])
  assert abs(per_row - whole) > 1e-4


def test_registry_entry_and_errors():
  assert algorithms.get("orpo").needs == "none"
  with pytest.raises(ValueError, match="nll_tokens"):
    algorithms.loss("orpo", nll_tokens="prompt")


def test_trains_end_to_end(tmp_path):
  out = tiny_run(tmp_path, "orpo")
  assert out["steps"] == 3 and np.isfinite(out["eval_after"]["loss"]) and "orpo/log_odds_ratio" in out["eval_after"]
