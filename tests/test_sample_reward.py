"""launch/sample.py's reward-guided options (alignjax.decoding.files): best-of-N and ARGS.

References: transformers' LlamaForSequenceClassification scoring each written completion
(prompt + completion, unpadded, one row at a time) for best-of-N's ``reward``; ARGS at
w = 0 against the file's plain greedy decoding (the ARGS paper's identity).
"""

import json

import numpy as np
import pytest

from alignjax.decoding import files
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 13, 40], [7], [11, 12, 13]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample_reward")
  lm = hf_fixtures.make_tiny_hf("llama", str(root / "lm"), seed=1)
  config = hf_fixtures.hf_config("llama", num_labels=1, pad_token_id=0)
  torch.manual_seed(0)
  rm = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
  hf_fixtures.randomize_(rm.float(), std=0.3, seed=2, family="llama")
  rm.save_pretrained(str(root / "rm"))
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
  return {"lm": lm, "rm": str(root / "rm"), "prompts": str(prompts), "root": root}


def _sample(dirs, name, **fields):
  out = dirs["root"] / f"{name}.jsonl"
  cfg = files.SampleConfig(model=dirs["lm"], prompts=dirs["prompts"], output=str(out), max_new_tokens=5,
                           eos_token_ids="", batch_size=2, **fields)
  files.sample_file(cfg)
  return [json.loads(line) for line in out.read_text().splitlines()]


def test_best_of_n_writes_the_reward_models_best(dirs):
  recs = _sample(dirs, "bon", reward_model=dirs["rm"], best_of_n=4, temperature=1.0, seed=3)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      dirs["rm"], dtype=torch.float32, attn_implementation="eager").eval()
  for rec, prompt in zip(recs, PROMPTS):
    assert len(rec["rewards"]) == 4 and rec["reward"] == max(rec["rewards"])
    ids = torch.as_tensor([prompt + rec["tokens"]])
    with torch.no_grad():
      want = float(hf(input_ids=ids).logits[0, 0])
    np.testing.assert_allclose(rec["reward"], want, rtol=1e-4, atol=1e-4)
  assert len({tuple(r["rewards"]) for r in recs}) == len(recs)   # distinct samples were scored


def test_args_with_zero_weight_is_greedy(dirs):
  greedy = _sample(dirs, "greedy")
  args0 = _sample(dirs, "args0", reward_model=dirs["rm"], args_k=3, args_w=0.0)
  assert [r["tokens"] for r in args0] == [r["tokens"] for r in greedy]


@pytest.mark.parametrize("fields,match", [
    ({"best_of_n": 2}, "need `config.reward_model`"),
    ({"reward_model": "x"}, "set one of them"),
    ({"reward_model": "x", "best_of_n": 2, "args_k": 2}, "exclude each other"),
    ({"reward_model": "x", "args_k": 2, "top_p": 0.9}, "do not apply to ARGS"),
    ({"best_of_n": -1}, "best_of_n` must be >= 0"),
])
def test_bad_reward_options_raise_one_line(fields, match):
  with pytest.raises(files.SampleError, match=match) as e:
    files.check_config(files.SampleConfig(output="o.jsonl", **fields))
  assert "\n" not in str(e.value)


def test_a_policy_is_not_a_reward_model(dirs):
  with pytest.raises(files.SampleError, match="is not a reward model"):
    _sample(dirs, "bad", reward_model=dirs["lm"], best_of_n=2)
