"""The `reward` algorithm (Bradley–Terry reward-model training) in the registry.

References: the objective's loss against the Bradley–Terry equation (InstructGPT Eq. 1,
with Llama 2's margin and TRL's centering term) in float64 NumPy on scores computed by
transformers' LlamaForSequenceClassification holding the same weights; a run on the
generated sorting task against the untrained model's held-out pairwise accuracy; the
run's final model reloaded by ``load_policy`` and, converted with ``to_hf``, by
transformers (scores recomputed row by row, unpadded).
"""

import numpy as np
import pytest

from alignjax import models
from alignjax.models import RewardModel
from alignjax.training import algorithms, config as config_lib, loop
from alignjax.training.config import ConfigError
from tests import hf_fixtures
from tests.algorithm_helpers import accumulated_loss
from tests.test_steps import VOCAB, make_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD = 0   # make_batch pads with 0 and draws real tokens from [1, VOCAB)


def torch_scores(model, tokens, mask):
  """``logits[:, 0]`` float64 of a transformers sequence-classification model (positions cumsum(mask) - 1)."""
  tokens_t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  mask_t = torch.as_tensor(np.asarray(mask).astype(np.int64))
  with torch.no_grad():
    out = model(input_ids=tokens_t, attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0))
  return out.logits[:, 0].double().numpy()


@pytest.fixture(scope="module")
def llama_rm(tmp_path_factory):
  """(alignjax RewardModel, transformers LlamaForSequenceClassification) with the same random weights."""
  path = str(tmp_path_factory.mktemp("rm"))
  config = hf_fixtures.hf_config("llama", num_labels=1, pad_token_id=PAD)
  torch.manual_seed(0)
  hf = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
  hf_fixtures.randomize_(hf.float(), std=0.3, seed=3, family="llama")
  hf.save_pretrained(path)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()
  assert hf.config.vocab_size >= VOCAB
  return models.from_hf(path), hf


@pytest.mark.parametrize("margin,center,row_margin", [(0.0, 0.0, False), (0.3, 0.05, True)])
def test_loss_matches_numpy_bradley_terry_on_transformers_scores(llama_rm, margin, center, row_margin):
  rm, hf = llama_rm
  assert isinstance(rm, RewardModel)
  rng = np.random.default_rng(7)
  batch = make_batch(rng, B=6, T=12)   # left and right padding
  if row_margin:
    batch["margin"] = rng.uniform(0.0, 1.0, 6).astype(np.float32)
  got, metrics = accumulated_loss(
      algorithms.loss("reward", margin=margin, center_rewards_coefficient=center), rm, {}, batch, k=2)
  c = torch_scores(hf, batch["chosen_tokens"], batch["chosen_attention"])
  r = torch_scores(hf, batch["rejected_tokens"], batch["rejected_attention"])
  m = margin + (batch["margin"].astype(np.float64) if row_margin else 0.0)
  want = np.mean(np.logaddexp(0.0, -(c - r - m)) + center * (c + r) ** 2)   # -log sigma(x) = log(1 + e^-x)
  assert abs(want - np.log(2)) > 1e-3   # the scores are far from equal
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Micro-batch 0 holds rows 0, 2, 4 (accumulated_loss's split).
  np.testing.assert_allclose(metrics["rewards/chosen"], c[0::2], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["rewards/rejected"], r[0::2], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(metrics["rewards/accuracy"], (c[0::2] > r[0::2]).astype(np.float32))


def test_registry_entry_config_and_errors():
  algo = algorithms.get("reward")
  assert algo.needs == "none" and algo.frozen == () and algo.schema == "paired" and algo.make_model is not None
  assert "reward" in config_lib.loss_names()
  help_text = config_lib.field_help()
  assert any(line.split()[:1] == ["reward"] for line in help_text.splitlines())
  assert "center_rewards_coefficient" in help_text
  from alignjax.study import frontier
  assert all(m["algorithm"] != "reward" for m in frontier.methods().values())   # not a policy
  with pytest.raises(ValueError, match="center_rewards_coefficient"):
    algorithms.loss("reward", center_rewards_coefficient=-1.0)
  with pytest.raises(ConfigError, match=r"^config\.sft\.steps must be 0 for loss\.name='reward'[^\n]*$"):
    config_lib.build(None, **{"loss.name": "reward", "sft.steps": 2})
  with pytest.raises(ConfigError, match="config.loss.beta does not apply to 'reward'"):
    config_lib.build(None, **{"loss.name": "reward", "loss.beta": 0.3})


def test_planner_builds_the_reward_models_step():
  """aot.Experiment(algorithm="reward") plans the step of a RewardModel (abstract, via make_model)."""
  from alignjax import aot
  exp = aot.Experiment(algorithm="reward", batch_size=4, prompt_len=8, response_len=8, dtype="float32")
  built = aot.build_step(exp, aot.get_topology("v5e:2x2", backend="cpu"), (1, 4, 1))
  state, batch, frozen = built.args
  assert set(state.params.keys()) == {"backbone", "score"} and frozen == {}
  assert built.reference_mode == "none" and "chosen_tokens" in batch
  assert state.params["score"].shape == (built.model_config.hidden_size, 1)
  built.step.lower(*built.args)   # the step traces and lowers with a RewardModel policy


RUN = {
    "data.train_examples": 512, "data.eval_examples": 64, "model.hidden_size": 32, "model.intermediate_size": 64,
    "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16,
    "data.min_len": 2, "data.max_len": 4, "sft.steps": 0, "dpo.steps": 150, "dpo.warmup_steps": 1,
    "dpo.learning_rate": 1e-2, "batch_size": 32, "eval_batch_size": 64, "log_every": 1000,
    "checkpoint_every": 1000, "loss.name": "reward",
}


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reward_run"))
  return loop.run(config_lib.build(None, **RUN), workdir=workdir, handle_signals=False)


def test_training_raises_heldout_pairwise_accuracy(reward_run):
  before, after = reward_run["eval_before"], reward_run["eval_after"]
  assert set(after) >= {"loss", "rewards/accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"}
  print(f"held-out pairwise accuracy: {before['rewards/accuracy']:.3f} (untrained) -> "
        f"{after['rewards/accuracy']:.3f}; loss {before['loss']:.4f} -> {after['loss']:.4f}")
  assert after["rewards/accuracy"] >= before["rewards/accuracy"] + 0.15
  assert after["loss"] < before["loss"] - 0.1


def test_final_model_reloads_and_converts_to_transformers(reward_run, tmp_path):
  from alignjax.data import to_arrays
  from alignjax.training.checkpoint import convert, load_policy
  workdir = reward_run["workdir"]
  rm = load_policy(workdir)
  assert isinstance(rm, RewardModel)
  _, eval_source, _, _ = loop.open_data(config_lib.build(None, **RUN), workdir)
  data = to_arrays(eval_source)
  # The reloaded model's held-out accuracy is the run's final eval (one forward of [chosen; rejected]).
  scores = np.asarray(rm(np.concatenate([data["chosen_tokens"], data["rejected_tokens"]]),
                         attention_mask=np.concatenate([data["chosen_attention"], data["rejected_attention"]])))
  c, r = np.split(scores, 2)
  np.testing.assert_allclose(np.mean(c > r), reward_run["eval_after"]["rewards/accuracy"], atol=1e-6)
  tokens, mask, got = data["chosen_tokens"][:8], data["chosen_attention"][:8], c[:8].astype(np.float64)

  dst = convert("to_hf", workdir, str(tmp_path / "hf"))
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      dst, dtype=torch.float32, attn_implementation="eager").eval()
  assert type(hf).__name__.endswith("ForSequenceClassification") and hf.config.num_labels == 1
  # Row by row without padding: transformers scores the last token.
  want = np.array([torch_scores(hf, t[m][None], np.ones((1, int(m.sum())), bool))[0] for t, m in zip(tokens, mask)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
