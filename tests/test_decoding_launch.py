"""launch/sample.py end to end on a tiny random HF Llama with a word-level tokenizer.

Reference: transformers ``generate(do_sample=False)`` on each unpadded prompt.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests import hf_fixtures, launcher_zygote

ROOT = Path(__file__).resolve().parents[1]
V = 101
EOS = 2


def _write_tokenizer(out_dir):
  from tokenizers import Tokenizer, models as tk_models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"w{i}": i for i in range(3, V)})
  tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                          unk_token="<pad>").save_pretrained(out_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("sample_launch") / "llama")
  hf_fixtures.make_tiny_hf("llama", d)
  _write_tokenizer(d)
  return d


def _run(*args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return launcher_zygote.run([sys.executable, "-m", "launch.sample", *args], cwd=cwd or ROOT, env=env, timeout=600)


def test_sample_launcher_greedy_matches_transformers(model_dir, tmp_path):
  prompts = ["w5 w9 w13 w40", {"prompt": "w7"}, [11, 12, 13], {"tokens": [50, 60, 70, 80, 90, 3]}]
  p = tmp_path / "prompts.jsonl"
  p.write_text("".join(json.dumps(x) + "\n" for x in prompts))
  out = tmp_path / "out" / "completions.jsonl"
  r = _run(f"--config.model={model_dir}", f"--config.prompts={p}", f"--config.output={out}",
           "--config.max_new_tokens=6", "--config.batch_size=3")
  assert r.returncode == 0, r.stderr
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  assert [x["index"] for x in recs] == [0, 1, 2, 3]
  tm = hf_fixtures.load_hf_torch(model_dir)
  tm.generation_config.eos_token_id = EOS
  ids = [[5, 9, 13, 40], [7], [11, 12, 13], [50, 60, 70, 80, 90, 3]]
  for rec, row in zip(recs, ids):
    with torch.no_grad():
      want = tm.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                         max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=0)[0, len(row):]
    want = want.tolist()
    if EOS in want:
      want = want[:want.index(EOS) + 1]
    assert rec["tokens"] == want
    assert rec["finished"] == (want[-1] == EOS)
    assert len(rec["logprobs"]) == len(want) and all(lp <= 0 for lp in rec["logprobs"])
    assert rec["text"] == " ".join(f"w{t}" for t in want if t >= 3)
  assert recs[0]["prompt"] == prompts[0] and "prompt" not in recs[2]


@pytest.mark.parametrize("setup,args,match", [
    (None, ["--config.prompts=missing.jsonl"], "prompts` file not found"),
    ("not json\n", [], "not valid JSON"),
    ('{"text": "w3"}\n', [], "needs a `prompt` or `tokens` key"),
    ('"w3 w4"\n', ["--config.max_new_tokens=0"], "`config.max_new_tokens` must be > 0"),
    ('"w3 w4"\n', ["--config.temperature=-1.0"], "`config.temperature` must be"),
    ("[3, 400]\n", [], "prompt 0 has token ids outside the model's vocabulary"),
    ('"w3"\n', ["--config.eos_token_ids=a,b"], "`config.eos_token_ids`"),
    ('"w3"\n', ["--config.nope=1"], "nope"),
])
def test_sample_launcher_user_errors_exit_2(model_dir, tmp_path, setup, args, match):
  p = tmp_path / "prompts.jsonl"
  if setup is not None:
    p.write_text(setup)
  base = [f"--config.model={model_dir}", f"--config.prompts={p}", f"--config.output={tmp_path / 'o.jsonl'}"]
  r = _run(*base, *args, cwd=tmp_path)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and match in lines[0], r.stderr


def test_sample_launcher_checks_prompt_tokens_before_loading_weights(model_dir, tmp_path):
  """The vocabulary comes from config.json alone: a directory without weights still gets the prompt error."""
  import shutil
  bare = tmp_path / "config_only"
  bare.mkdir()
  shutil.copy(os.path.join(model_dir, "config.json"), bare / "config.json")
  p = tmp_path / "prompts.jsonl"
  p.write_text("[3, 400]\n")
  r = _run(f"--config.model={bare}", f"--config.prompts={p}", f"--config.output={tmp_path / 'o.jsonl'}", cwd=tmp_path)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and "prompt 0 has token ids outside the model's vocabulary [0, " in lines[0], r.stderr
