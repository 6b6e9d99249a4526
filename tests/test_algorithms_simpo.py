"""SimPO / CPO-SimPO in the registry against TRL's CPOTrainer (loss_type="simpo") on plain forwards.

Reference: TRL's ``get_batch_logps`` and ``cpo_loss`` (a stub ``self``) on the
float64 logits of a plain full-logits forward, plus TRL's NLL term transcribed
(``nn.CrossEntropyLoss`` over the chosen labels, prompt masked: one token mean
over the batch). Ours runs as the step accumulates it (2 micro-batches with the
whole batch's statistics).
"""

import types

import numpy as np
import pytest

from alignjax.training import algorithms
from tests.algorithm_helpers import accumulated_loss, tiny_run, trl_labels
from tests.test_steps import make_batch, plain_logits, tiny_model


@pytest.fixture(scope="module")
def setup():
  return tiny_model(40), make_batch(np.random.default_rng(4), B=4, T=12, left_pad=False)


def _trl_loss(policy, batch, beta, gamma, eps, cpo_alpha):
  torch = pytest.importorskip("torch")
  cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
  logits = {s: torch.tensor(plain_logits(policy, batch[f"{s}_tokens"], batch[f"{s}_attention"]))
            for s in ("chosen", "rejected")}
  labels = {s: torch.tensor(trl_labels(batch, s)) for s in ("chosen", "rejected")}
  avg = {s: cpo.CPOTrainer.get_batch_logps(logits[s], labels[s], average_log_prob=True) for s in logits}
  stub = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps,
                               accelerator=types.SimpleNamespace(device="cpu"))
  losses = cpo.CPOTrainer.cpo_loss(stub, avg["chosen"], avg["rejected"])[0]
  # CPOTrainer.concatenated_forward's cross_entropy_loss on the chosen rows.
  nll = torch.nn.CrossEntropyLoss()(logits["chosen"][:, :-1].reshape(-1, logits["chosen"].shape[-1]),
                                    labels["chosen"][:, 1:].reshape(-1))
  return float(losses.mean() + cpo_alpha * nll)


@pytest.mark.parametrize("beta, gamma, eps, cpo_alpha", [(2.0, 0.7, 0.0, 0.0), (0.5, 0.3, 0.2, 1.5)])
def test_matches_trl_cpo_simpo(setup, beta, gamma, eps, cpo_alpha):
  policy, batch = setup
  loss = algorithms.loss("simpo", beta=beta, gamma=gamma, label_smoothing=eps, cpo_alpha=cpo_alpha)
  got, metrics = accumulated_loss(loss, policy, {}, batch)
  np.testing.assert_allclose(got, _trl_loss(policy, batch, beta, gamma, eps, cpo_alpha), rtol=2e-5, atol=2e-6)
  assert ("nll/chosen" in metrics) == (cpo_alpha > 0)


def test_registry_entry_and_errors():
  algo = algorithms.get("simpo")
  assert algo.needs == "none" and algo.frozen == () and algo.schema == "paired"
  for kwargs, field in (({"beta": 0.0}, "beta"), ({"label_smoothing": 0.6}, "label_smoothing"),
                        ({"cpo_alpha": -1.0}, "cpo_alpha"), ({"gamma": float("nan")}, "gamma")):
    with pytest.raises(ValueError, match=field):
      algorithms.loss("simpo", **kwargs)


def test_trains_end_to_end(tmp_path):
  out = tiny_run(tmp_path, "simpo", **{"loss.cpo_alpha": 0.5})
  assert out["steps"] == 3 and np.isfinite(out["eval_after"]["loss"]) and "nll/chosen" in out["eval_after"]
