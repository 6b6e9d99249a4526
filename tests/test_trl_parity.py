"""Parity with TRL's DPOTrainer on a tiny random Llama built locally.

TRL computes the loss from a real forward pass over a collated preference
batch; we take the same models' logits, and recompute everything else
(next-token shift, completion masks, sequence log-probs, loss, rewards) with
alignjax.
"""

import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from alignjax import losses as L

LETTERS = string.ascii_lowercase


def _tokenizer():
  specials = ["<pad>", "<unk>", "</s>"]
  vocab = {tok: i for i, tok in enumerate(specials + list(LETTERS))}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  hf_tok = _tokenizer()
  cfg = transformers.LlamaConfig(
      vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      pad_token_id=0, eos_token_id=2, bos_token_id=None)
  torch.manual_seed(0)
  policy = transformers.LlamaForCausalLM(cfg).eval()
  torch.manual_seed(1)
  reference = transformers.LlamaForCausalLM(cfg).eval()
  rng = np.random.default_rng(0)
  word = lambda lo, hi: "".join(rng.choice(list(LETTERS), size=rng.integers(lo, hi)))
  rows = [dict(prompt=word(1, 6), chosen=word(1, 8), rejected=word(1, 8)) for _ in range(6)]
  return hf_tok, policy, reference, datasets.Dataset.from_list(rows), tmp_path_factory.mktemp("trl")


def _trl_loss(setup, loss_type, beta, label_smoothing):
  hf_tok, policy, reference, ds, out = setup
  args = trl.DPOConfig(
      output_dir=str(out), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
      report_to=[], per_device_train_batch_size=6, use_cpu=True, bf16=False)
  trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds,
                           processing_class=hf_tok)
  collator = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=0)
  batch = collator([trainer.train_dataset[i] for i in range(len(ds))])
  trainer.model.eval()
  with torch.no_grad():
    loss = trainer.compute_loss(trainer.model, batch).item()
    pol_logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
  metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
  return loss, metrics, batch, pol_logits.numpy(), ref_logits.numpy()


def _ours(batch, pol_logits, ref_logits, average):
  tokens = batch["input_ids"].numpy().astype(np.int32)
  mask = batch["completion_mask"].numpy().astype(bool)
  assert mask.any(axis=1).all()
  out = []
  for logits in (pol_logits, ref_logits):
    lg, lb, m = L.shift_for_next_token(logits, tokens, mask)
    lp = np.asarray(L.sequence_logprobs(lg, lb, m, average=average))
    out.extend(np.split(lp, 2))  # batch is [chosen; rejected]
  pc, pr, rc, rr = out
  return pc, pr, rc, rr


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid(setup, beta):
  loss, metrics, batch, pl, rl = _trl_loss(setup, "sigmoid", beta, 0.0)
  pc, pr, rc, rr = _ours(batch, pl, rl, average=False)
  losses, diag = L.dpo_loss(pc, pr, rc, rr, beta=beta)
  np.testing.assert_allclose(float(losses.mean()), loss, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(pc.mean(), metrics["logps/chosen"], rtol=1e-4)
  np.testing.assert_allclose(pr.mean(), metrics["logps/rejected"], rtol=1e-4)
  np.testing.assert_allclose(diag.chosen_rewards.mean(), metrics["rewards/chosen"], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(diag.rejected_rewards.mean(), metrics["rewards/rejected"], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(diag.margins.mean(), metrics["rewards/margins"], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(diag.accuracies.mean(), metrics["rewards/accuracies"], atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_hinge_is_gpo_hinge(setup, beta):
  loss, _, batch, pl, rl = _trl_loss(setup, "hinge", beta, 0.0)
  losses, _ = L.gpo_loss(*_ours(batch, pl, rl, average=False), beta=beta, loss_type="hinge")
  np.testing.assert_allclose(float(losses.mean()), loss, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_ipo_is_gpo_squared(setup, tau):
  """TRL's IPO, (h - 1/(2 tau))^2 on token-averaged log-probs, is GPO's squared
  loss at beta = 2 tau divided by beta^2."""
  loss, _, batch, pl, rl = _trl_loss(setup, "ipo", tau, 0.0)
  beta = 2 * tau
  losses, _ = L.gpo_loss(*_ours(batch, pl, rl, average=True), beta=beta, loss_type="ipo")
  np.testing.assert_allclose(float(losses.mean()) / beta**2, loss, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta, label_smoothing", [(0.1, 0.1), (0.5, 0.3), (2.0, 0.45)])
def test_robust_dpo(setup, beta, label_smoothing):
  # TRL 1.x applies label smoothing only in its robust/EXO/AOT losses; cDPO is
  # checked against the NumPy equation in test_preference.py.
  loss, _, batch, pl, rl = _trl_loss(setup, "robust", beta, label_smoothing)
  losses, _ = L.dpo_loss(*_ours(batch, pl, rl, average=False), beta=beta,
                         label_smoothing=label_smoothing, robust=True)
  np.testing.assert_allclose(float(losses.mean()), loss, rtol=1e-4, atol=1e-6)
