"""alignjax.models.RewardModel vs transformers' *ForSequenceClassification (one label).

References: tiny random Llama / Qwen2 / GPT-2 sequence-classification models built locally
with transformers (fp32, eager attention), their ``logits[:, 0]`` on left- and
right-padded batches (positions ``cumsum(mask) - 1`` passed explicitly, as
tests/hf_fixtures.torch_logits does), and transformers reloading what ``to_hf`` wrote.
The reward model's KV-cache path is checked against transformers on every full candidate
sequence by tests/test_reward_decoding.py (ARGS).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import models, sharding
from alignjax.models import RewardModel, Transformer
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "gpt2")
TOL = 1e-4
PAD = 0


def make_tiny_rm(family, out_dir, *, seed=0):
  """A random one-label *ForSequenceClassification checkpoint (save_pretrained) in out_dir."""
  config = hf_fixtures.hf_config(family, num_labels=1, pad_token_id=PAD)
  torch.manual_seed(seed)
  model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
  hf_fixtures.randomize_(model.float(), seed=seed, family=family)
  model.save_pretrained(out_dir)
  return out_dir


def load_torch_rm(path):
  return transformers.AutoModelForSequenceClassification.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()


def torch_scores(model, tokens, mask):
  tokens_t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  mask_t = torch.as_tensor(np.asarray(mask).astype(np.int64))
  positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = model(input_ids=tokens_t, attention_mask=mask_t, position_ids=positions)
  return out.logits[:, 0].double().numpy()


def _batch(seed=0, B=4, T=11, V=101):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (B, T)).astype(np.int32)
  mask = np.ones((B, T), bool)
  mask[1, :4] = False   # left-padded
  mask[2, 7:] = False   # right-padded
  mask[3, :3] = False   # left-padded, short
  return np.where(mask, tokens, PAD).astype(np.int32), mask


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("rm")
  return {f: make_tiny_rm(f, str(root / f), seed=i) for i, f in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_match_transformers_sequence_classification_left_and_right_padded(rm_dirs, family, tmp_path):
  tokens, mask = _batch()
  hf = load_torch_rm(rm_dirs[family])
  want = torch_scores(hf, tokens, mask)
  rm = models.from_hf(rm_dirs[family])
  assert isinstance(rm, RewardModel) and rm.config.family == family
  got = np.asarray(rm(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  assert got.shape == (4,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
  # A padded row scores like its bare tokens (transformers on the unpadded row).
  for b in (1, 2):
    row = tokens[b:b + 1][mask[b:b + 1]][None]
    np.testing.assert_allclose(got[b], torch_scores(hf, row, np.ones_like(row))[0], atol=TOL, rtol=TOL)

  # to_hf round trip: transformers loads the same class and scores the same.
  out = models.to_hf(rm, str(tmp_path / "rt"))
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["architectures"] == [type(hf).__name__]
  hf2 = load_torch_rm(out)
  assert type(hf2) is type(hf) and hf2.config.num_labels == 1
  np.testing.assert_allclose(torch_scores(hf2, tokens, mask), want, atol=TOL, rtol=TOL)
  rm2 = models.from_hf(out)
  np.testing.assert_array_equal(np.asarray(rm2(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))), got)


def test_from_backbone_keeps_the_policy_and_adds_a_sharded_score_head(tmp_path):
  path = hf_fixtures.make_tiny_hf("llama", str(tmp_path / "policy"))
  policy = models.from_hf(path)
  rm = RewardModel.from_backbone(policy, rngs=nnx.Rngs(0))
  assert policy.lm_head is not None  # the policy is untouched
  tokens, mask = _batch(seed=3)
  hidden = np.asarray(policy(jnp.asarray(tokens), attention_mask=jnp.asarray(mask), return_hidden=True))
  last = np.array([10, 10, 6, 10])
  want = np.einsum("bd,d->b", hidden[np.arange(4), last].astype(np.float64),
                   np.asarray(rm.score[...])[:, 0].astype(np.float64))
  np.testing.assert_allclose(np.asarray(rm(tokens, attention_mask=mask)), want, rtol=1e-5, atol=1e-6)
  assert rm.score.get_metadata()["out_sharding"] == ("embed", None)
  mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  spec = sharding.model_shardings(rm, mesh)["score"].spec
  assert tuple(spec) == ("fsdp", None)
  # A fresh reward model of a policy exports as LlamaForSequenceClassification.
  out = models.to_hf(rm, str(tmp_path / "rm"))
  hf = load_torch_rm(out)
  assert type(hf).__name__ == "LlamaForSequenceClassification"
  np.testing.assert_allclose(torch_scores(hf, tokens, mask), want, rtol=1e-4, atol=1e-5)


def test_bad_reward_checkpoints_raise_one_line_errors(rm_dirs, tmp_path):
  bad = str(tmp_path / "two_labels")
  config = hf_fixtures.hf_config("llama", num_labels=2, pad_token_id=PAD)
  transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(bad)
  with pytest.raises(ValueError, match="num_labels=1") as e:
    models.from_hf(bad)
  assert "\n" not in str(e.value)
  with pytest.raises(TypeError, match="from_backbone"):
    RewardModel.from_backbone(models.from_hf(rm_dirs["gpt2"]), rngs=nnx.Rngs(0))
  assert isinstance(models.from_hf(rm_dirs["gpt2"]).backbone, Transformer)
