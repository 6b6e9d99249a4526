"""Local preference files -> tokenised arrays -> TFDS array_record (alignjax.data.files / tokenize).

References: the tokenizer's own encode (``tokenizers``/transformers), transformers'
``apply_chat_template(tokenize=True)``, and layouts written out by hand.
"""

import json
import os

import numpy as np
import pytest

from alignjax.data import batch as batch_lib
from alignjax.data import files
from alignjax.data import tokenize as tok_lib
from tests import launcher_zygote

WORDS = ("how do you sort the digits please what is two plus three it is five four six "
         "they are sorted mixed up user assistant : a b c d e f g h").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
TRANSPARENT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
ROLE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")

ROWS = [
    {"prompt": "how do you sort the digits", "chosen": "they are sorted", "rejected": "they are mixed up"},
    {"prompt": "what is two plus three", "chosen": "it is five", "rejected": "it is four"},
    {"prompt": "sort a b c please", "chosen": "a b c", "rejected": "c b a"},
]


def make_tokenizer_dir(path, chat_template=TRANSPARENT_TEMPLATE, add_bos=None):
  """A WordLevel tokenizer (BOS added by the post-processor) saved as an HF directory."""
  import tokenizers
  from tokenizers import models, pre_tokenizers, processors
  vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIALS)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": chat_template}
  if add_bos is not None:
    config["add_bos_token"] = add_bos
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(path), vocab


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def write_parquet(path, rows):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), path)
  return str(path)


def tokenize_file(path, tok_dir, **options):
  tok = tok_lib.load_tokenizer(tok_dir)
  opts = tok_lib.TokenizeOptions(**{"max_len": 16, **options})
  return tok_lib.tokenize_pairs(files.read_records(path), tok, opts, source=path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def expected_rows(tok_dir, rows, max_len):
  """Reference layout from transformers' tokenizer: [BOS]+prompt, response+[EOS], padded."""
  import transformers
  hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
  out = {k: [] for k in batch_lib.PREFERENCE_KEYS}
  for r in rows:
    prompt = hf(r["prompt"])["input_ids"]  # add_special_tokens=True: the tokenizer's BOS
    for side in ("chosen", "rejected"):
      seq = prompt + hf(r[side], add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
      pad = max_len - len(seq)
      out[f"{side}_tokens"].append(seq + [hf.pad_token_id] * pad)
      out[f"{side}_attention"].append([True] * len(seq) + [False] * pad)
      out[f"{side}_response"].append([False] * len(prompt) + [True] * (len(seq) - len(prompt)) + [False] * pad)
  return {k: np.asarray(v) for k, v in out.items()}


def assert_same(a, b):
  for k in batch_lib.PREFERENCE_KEYS:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_formats_give_identical_arrays_matching_the_tokenizer(tok_dir, tmp_path):
  tdir, vocab = tok_dir
  datasets = pytest.importorskip("datasets")
  jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
  parquet = write_parquet(tmp_path / "d.parquet", ROWS)
  saved = str(tmp_path / "saved")
  datasets.Dataset.from_list(ROWS).save_to_disk(saved)
  chat_rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS]
  chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows)
  implicit = write_jsonl(tmp_path / "implicit.jsonl", [
      {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in chat_rows])
  chat_parquet = write_parquet(tmp_path / "chat.parquet", chat_rows)

  results = {p: tokenize_file(p, tdir) for p in (jsonl, parquet, saved, chat, implicit, chat_parquet)}
  reference = expected_rows(tdir, ROWS, 16)
  for path, (arrays, report) in results.items():
    assert report.kept == 3 and report.rows == 3 and not report.dropped, (path, report)
    assert_same(arrays, reference)
    np.testing.assert_array_equal(arrays["row"], [0, 1, 2])
    assert arrays["chosen_tokens"].dtype == np.int32 and arrays["chosen_attention"].dtype == bool

  # Hand-built layout of row 1: <s> what is two plus three | it is five </s> <pad>...
  v = vocab
  prompt = [BOS, v["what"], v["is"], v["two"], v["plus"], v["three"]]
  chosen = prompt + [v["it"], v["is"], v["five"], EOS]
  arrays = results[jsonl][0]
  np.testing.assert_array_equal(arrays["chosen_tokens"][1], chosen + [PAD] * (16 - len(chosen)))
  np.testing.assert_array_equal(arrays["chosen_response"][1], [0] * 6 + [1] * 4 + [0] * 6)
  np.testing.assert_array_equal(arrays["rejected_attention"][1], [1] * 10 + [0] * 6)


def test_chat_template_matches_transformers(tmp_path):
  import transformers
  tdir, _ = make_tokenizer_dir(tmp_path / "tok", chat_template=ROLE_TEMPLATE)
  rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
           "chosen": [{"role": "assistant", "content": r["chosen"]}],
           "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS]
  arrays, report = tokenize_file(write_jsonl(tmp_path / "c.jsonl", rows), tdir, max_len=24)
  assert report.kept == 3
  hf = transformers.AutoTokenizer.from_pretrained(tdir)

  def ids(messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)

  for i, r in enumerate(rows):
    n_prompt = len(ids(r["prompt"], add_generation_prompt=True))
    for side in ("chosen", "rejected"):
      full = ids(r["prompt"] + r[side])
      assert full[-1] == EOS  # the template ends turns with EOS: no second EOS is added
      row = arrays[f"{side}_tokens"][i]
      np.testing.assert_array_equal(row[: len(full)], full)
      np.testing.assert_array_equal(row[len(full):], PAD)
      np.testing.assert_array_equal(np.flatnonzero(arrays[f"{side}_response"][i]), np.arange(n_prompt, len(full)))


def test_truncation_keeps_prompt_end_and_response_start(tok_dir, tmp_path):
  tdir, v = tok_dir
  rows = [
      {"prompt": "a b c d e f", "chosen": "it is five", "rejected": "it is four"},  # prompt cut
      {"prompt": "a", "chosen": "a b c d e f g h", "rejected": "b"},  # chosen cut
      {"prompt": "a b", "chosen": "c", "rejected": "d"},  # untouched
  ]
  arrays, report = tokenize_file(write_jsonl(tmp_path / "t.jsonl", rows), tdir, max_len=8, max_prompt_len=4)
  assert (report.kept, report.truncated, report.truncated_prompt, report.truncated_response) == (3, 2, 1, 1)
  # Row 0: BOS kept, then the prompt's last 3 words; the response fits.
  np.testing.assert_array_equal(arrays["chosen_tokens"][0], [BOS, v["d"], v["e"], v["f"], v["it"], v["is"], v["five"], EOS])
  # Row 1: prompt [BOS a], chosen keeps its first 6 tokens (no EOS: it was cut), rejected intact.
  np.testing.assert_array_equal(arrays["chosen_tokens"][1], [BOS, v["a"], v["a"], v["b"], v["c"], v["d"], v["e"], v["f"]])
  np.testing.assert_array_equal(arrays["rejected_tokens"][1], [BOS, v["a"], v["b"], EOS, PAD, PAD, PAD, PAD])
  np.testing.assert_array_equal(arrays["chosen_response"][1], [0, 0, 1, 1, 1, 1, 1, 1])

  # "drop" policies, and no prompt limit: the same rows are dropped as too_long.
  _, report = tokenize_file(write_jsonl(tmp_path / "t.jsonl", rows), tdir, max_len=8, max_prompt_len=4,
                            prompt_truncation="drop", response_truncation="drop")
  assert report.kept == 1 and report.dropped == {"too_long": 2} and report.row_numbers["too_long"] == [0, 1]
  _, report = tokenize_file(write_jsonl(tmp_path / "t.jsonl", rows), tdir, max_len=7)
  assert report.dropped == {"too_long": 1} and report.row_numbers["too_long"] == [0]  # prompt of 7 fills T


def test_malformed_rows_are_counted_with_row_numbers(tok_dir, tmp_path):
  tdir, _ = tok_dir
  lines = [
      {"prompt": "a", "chosen": "b", "rejected": "c"},         # 0 ok
      {"prompt": "a", "chosen": "b"},                          # 1 missing rejected
      {"prompt": "a", "chosen": 3, "rejected": "b"},           # 2 bad type
      {"prompt": "a", "chosen": "  ", "rejected": "b"},        # 3 empty response
      {"prompt": "a", "chosen": "b c", "rejected": "b c"},     # 4 identical
      "{not json",                                              # 5 invalid json
      "",                                                       # 6 blank line: skipped, not a row
      {"chosen": "b", "rejected": "c"},                         # 7 missing prompt
      {"prompt": "a", "chosen": "b c d e f g h", "rejected": "b c d e f g a"},  # 8 same after truncation
      {"prompt": "a", "chosen": "e", "rejected": "f"},          # 9 ok
      {"prompt": "a", "chosen": "b", "rejected": [1, 2]},       # 10 bad type
  ]
  arrays, report = tokenize_file(write_jsonl(tmp_path / "m.jsonl", lines), tdir, max_len=8)
  assert report.rows == 10 and report.kept == 2
  np.testing.assert_array_equal(arrays["row"], [0, 9])
  assert report.dropped == {"missing_field": 2, "bad_type": 2, "empty_response": 1, "identical": 1,
                            "invalid_json": 1, "identical_after_truncation": 1}
  assert report.row_numbers == {"missing_field": [1, 7], "bad_type": [2, 10], "empty_response": [3],
                                "identical": [4], "invalid_json": [5], "identical_after_truncation": [8]}
  assert "2/10 pairs kept" in report.summary()


def test_no_usable_row_is_a_one_line_error(tok_dir, tmp_path):
  tdir, _ = tok_dir
  path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}, {"x": 1}])
  cfg = files.PreferenceFileConfig(path=path, tokenizer_dir=tdir, max_len=8)
  with pytest.raises(ValueError, match="no usable row in .*bad.jsonl") as e:
    files.load_preference_file(cfg, data_dir=str(tmp_path / "data"))
  assert "\n" not in str(e.value)


def test_config_validation(tok_dir):
  tdir, _ = tok_dir
  with pytest.raises(ValueError, match="max_prompt_len"):
    files.PreferenceFileConfig(path="x.jsonl", tokenizer_dir=tdir, max_len=8, max_prompt_len=8)
  with pytest.raises(ValueError, match="format"):
    files.PreferenceFileConfig(path="x.jsonl", tokenizer_dir=tdir, max_len=8, format="csv")
  with pytest.raises(ValueError, match="prompt_truncation"):
    files.PreferenceFileConfig(path="x.jsonl", tokenizer_dir=tdir, max_len=8, prompt_truncation="keep_start")


def test_tfds_round_trip_and_cache_hit(tok_dir, tmp_path, monkeypatch):
  tdir, _ = tok_dir
  rows = ROWS + [{"prompt": "a", "chosen": "b", "rejected": "b"}]
  path = write_jsonl(tmp_path / "d.jsonl", rows)
  data_dir = str(tmp_path / "data")
  cfg = files.PreferenceFileConfig(path=path, tokenizer_dir=tdir, max_len=16, max_prompt_len=8)
  with pytest.raises(ValueError, match="build=False"):
    files.load_preference_file(cfg, data_dir=data_dir, build=False)
  source, report = files.load_preference_file(cfg, data_dir=data_dir)
  assert not report.cached and report.kept == 3 and report.row_numbers == {"identical": [3]}
  assert len(source) == 3
  reference = expected_rows(tdir, ROWS, 16)
  got = {k: np.stack([source[i][k] for i in range(3)]) for k in source[0]}
  assert_same(got, reference)
  np.testing.assert_array_equal(got["row"], [0, 1, 2])

  # Same inputs: opened from disk, the tokenizer never runs; the report comes back too.
  def fail(*a, **k):
    raise AssertionError("tokenize_pairs called on a cache hit")
  monkeypatch.setattr(tok_lib, "tokenize_pairs", fail)
  source2, report2 = files.load_preference_file(cfg, data_dir=data_dir, build=False)
  assert report2.cached and report2.kept == 3 and report2.row_numbers == {"identical": [3]}
  assert_same({k: np.stack([source2[i][k] for i in range(3)]) for k in source2[0]}, reference)
  # Another length, or changed content, is another data set (tokenised again).
  with pytest.raises(AssertionError, match="cache hit"):
    files.load_preference_file(files.PreferenceFileConfig(path=path, tokenizer_dir=tdir, max_len=12), data_dir=data_dir)
  write_jsonl(path, rows[:2])
  with pytest.raises(AssertionError, match="cache hit"):
    files.load_preference_file(cfg, data_dir=data_dir)


def test_save_to_disk_dataset_dict_split(tok_dir, tmp_path):
  tdir, _ = tok_dir
  datasets = pytest.importorskip("datasets")
  saved = str(tmp_path / "dd")
  datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[:1])).save_to_disk(saved)
  records = list(files.read_records(saved, split="test"))
  assert records == [(0, ROWS[0])]
  with pytest.raises(ValueError, match="split"):
    list(files.read_records(saved))


def test_add_bos_token_false_in_config_means_no_bos(tmp_path):
  tdir, v = make_tokenizer_dir(tmp_path / "tok", add_bos=False)
  tok = tok_lib.load_tokenizer(tdir)
  assert tok.prompt_prefix == [] and (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS, EOS, PAD)
  rows = [{"prompt": "a b", "chosen": "c", "rejected": "d"}]
  arrays, _ = tokenize_file(write_jsonl(tmp_path / "x.jsonl", rows), tdir, max_len=6)
  np.testing.assert_array_equal(arrays["chosen_tokens"][0], [v["a"], v["b"], v["c"], EOS, PAD, PAD])
  np.testing.assert_array_equal(arrays["chosen_response"][0], [0, 0, 1, 1, 0, 0])


def test_chat_rows_without_a_chat_template_fail_clearly(tmp_path):
  tdir, _ = make_tokenizer_dir(tmp_path / "tok", chat_template=None)
  rows = [{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}]
  with pytest.raises(ValueError, match="no chat template"):
    tokenize_file(write_jsonl(tmp_path / "x.jsonl", rows), tdir)


def test_building_and_reading_leaves_no_temp_dir_and_no_tfds_warning(tok_dir, tmp_path, monkeypatch, caplog):
  """TFDS made a ``tmp*tfds`` dir per unbuilt builder and warned "Variant folder ... has no dataset_info.json"."""
  import tempfile

  from alignjax.data import arrays_tfds, tfds_sorting
  from alignjax.data.synthetic import SortingTask
  systmp = tmp_path / "systmp"
  systmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(systmp))  # this test's own "system temp dir"
  tdir, _ = tok_dir
  cfg = files.PreferenceFileConfig(path=write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer_dir=tdir, max_len=16)
  with caplog.at_level("INFO"):
    for build in (True, False):  # build, then open from disk
      source, report = files.load_preference_file(cfg, data_dir=str(tmp_path / "data"), build=build)
      assert len(source) == 3 and report.cached == (not build) and source[2]["row"] == 2
    path = arrays_tfds.write_arrays(str(tmp_path / "arrays"), {"train": {"x": np.arange(5)}})
    assert arrays_tfds.open_arrays(path)[4]["x"] == 4
    train, ev = tfds_sorting.sorting_preferences(SortingTask(5, 2, 3), train_examples=4, eval_examples=2, seed=0,
                                                 data_dir=str(tmp_path / "sorting"))
    assert (len(train), len(ev)) == (4, 2)
  assert tempfile.gettempdir() == str(systmp) and sorted(os.listdir(systmp)) == []
  messages = [r.getMessage() for r in caplog.records]
  assert messages and not [m for m in messages if "Variant folder" in m or "dataset_info.json" in m], messages


# ------------------------------------------------------------------------------------------
# ChatML: one end-of-turn token per response, whole-turn prompt truncation (issue 20).

CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}"
                   "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
  """A byte-level BPE tokenizer (newlines are tokens) with SmolLM2's ChatML conventions:
  BOS ``<|im_start|>``, EOS = PAD ``<|im_end|>``, no BOS added to plain text."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=CHAT_SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([" ".join(WORDS) + "\nuser assistant system\n"] * 4, trainer=trainer)
  path = tmp_path_factory.mktemp("chatml")
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
               "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}, f)
  return str(path)


def _hf_chat_ids(hf, messages, **kw):
  out = hf.apply_chat_template(messages, tokenize=True, **kw)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def _msgs(*pairs):
  return [{"role": r, "content": c} for r, c in pairs]


def test_chatml_response_ends_with_one_end_of_turn_token(chatml_dir, tmp_path):
  """Reference: transformers' apply_chat_template; the response is the template's text up to <|im_end|>."""
  import transformers
  hf = transformers.AutoTokenizer.from_pretrained(chatml_dir)
  im_end = hf.convert_tokens_to_ids("<|im_end|>")
  rows = [
      {"prompt": _msgs(("user", "what is two plus three")), "chosen": _msgs(("assistant", "it is five")),
       "rejected": _msgs(("assistant", "it is four"))},
      {"prompt": _msgs(("system", "sort the digits"), ("user", "a b c")), "chosen": _msgs(("assistant", "a b c")),
       "rejected": _msgs(("assistant", "c b a"))},
      {"prompt": _msgs(("user", "how do you sort"), ("assistant", "they are sorted"), ("user", "what is six")),
       "chosen": _msgs(("assistant", "it is six")), "rejected": _msgs(("assistant", "it is five"))},
  ]
  arrays, report = tokenize_file(write_jsonl(tmp_path / "c.jsonl", rows), chatml_dir, max_len=96)
  assert report.kept == 3 and report.lost_end_of_turn == 0
  for i, r in enumerate(rows):
    prompt = _hf_chat_ids(hf, r["prompt"], add_generation_prompt=True)
    for side in ("chosen", "rejected"):
      full = _hf_chat_ids(hf, r["prompt"] + r[side])
      assert hf.decode(full[-2:]) == "<|im_end|>\n"
      expected = full[:-1]  # the content, then <|im_end|> once (not the template's newline, no second EOS)
      tokens, attention = arrays[f"{side}_tokens"][i], arrays[f"{side}_attention"][i]
      np.testing.assert_array_equal(tokens[attention], expected)
      np.testing.assert_array_equal(np.flatnonzero(arrays[f"{side}_response"][i]), np.arange(len(prompt), len(expected)))
      assert list(tokens[len(prompt):len(expected)]).count(im_end) == 1
  tok = tok_lib.load_tokenizer(chatml_dir)
  assert tok.chat_prompt_ids(rows[2]["prompt"]) == _hf_chat_ids(hf, rows[2]["prompt"], add_generation_prompt=True)


def test_chat_prompt_truncation_drops_whole_turns_and_counts_lost_end_of_turn(chatml_dir, tmp_path):
  import transformers
  hf = transformers.AutoTokenizer.from_pretrained(chatml_dir)
  history = [("system", "sort the digits"), ("user", "a b c d e f g h"), ("assistant", "a b c d e f g h"),
             ("user", "how do you sort the digits please"), ("assistant", "they are sorted"), ("user", "what is five")]
  long_last = [("user", " ".join(WORDS * 3))]
  rows = [
      {"prompt": _msgs(*history), "chosen": _msgs(("assistant", "it is five")),
       "rejected": _msgs(("assistant", "it is four"))},
      {"prompt": _msgs(*long_last), "chosen": _msgs(("assistant", "a")), "rejected": _msgs(("assistant", "b"))},
      {"prompt": _msgs(("user", "a")), "chosen": _msgs(("assistant", " ".join(WORDS))),
       "rejected": _msgs(("assistant", "b"))},
  ]
  full_prompt = _hf_chat_ids(hf, rows[0]["prompt"], add_generation_prompt=True)
  # Room for the system prompt and the last two turns (user, assistant, user) but not the whole history.
  kept_msgs = _msgs(history[0], *history[3:])
  kept = _hf_chat_ids(hf, kept_msgs, add_generation_prompt=True)
  assert len(kept) < len(full_prompt)
  arrays, report = tokenize_file(write_jsonl(tmp_path / "t.jsonl", rows), chatml_dir, max_len=len(kept) + 24,
                                 max_prompt_len=len(kept))
  assert report.dropped == {"too_long": 1} and report.row_numbers == {"too_long": [1]}  # last turn alone too long
  assert report.kept == 2 and report.truncated_prompt == 1 and report.truncated_response == 1
  assert report.lost_end_of_turn == 1  # row 2's long chosen answer lost its <|im_end|>
  assert "1 responses lost their end-of-turn token" in report.summary()
  chosen = _hf_chat_ids(hf, kept_msgs + rows[0]["chosen"])[:-1]
  np.testing.assert_array_equal(arrays["chosen_tokens"][0][arrays["chosen_attention"][0]], chosen)
  text = hf.decode(arrays["chosen_tokens"][0][arrays["chosen_attention"][0]])
  assert text.startswith("<|im_start|>system\nsort the digits<|im_end|>\n<|im_start|>user\nhow do")  # whole turns
  np.testing.assert_array_equal(arrays["row"], [0, 2])
  assert arrays["chosen_tokens"][1][arrays["chosen_attention"][1]][-1] != hf.convert_tokens_to_ids("<|im_end|>")


def test_plain_prompt_truncation_keeps_no_bos_the_tokenizer_did_not_add(chatml_dir, tmp_path):
  """A pre-rendered ChatML prompt given as text: cutting it keeps its end only (no dangling <|im_start|>)."""
  tok = tok_lib.load_tokenizer(chatml_dir)
  assert tok.prompt_prefix == [] and tok.bos_id == tok.tokenizer.token_to_id("<|im_start|>")
  prompt = "<|im_start|>user\nhow do you sort the digits please<|im_end|>\n<|im_start|>assistant\n"
  rows = [{"prompt": prompt, "chosen": "a b", "rejected": "c"}]
  arrays, report = tokenize_file(write_jsonl(tmp_path / "p.jsonl", rows), chatml_dir, max_len=24, max_prompt_len=6)
  p_ids = tok.encode(prompt)
  assert report.truncated_prompt == 1
  np.testing.assert_array_equal(arrays["chosen_tokens"][0][:6], p_ids[-6:])


def test_no_usable_row_exits_2_with_one_line_through_the_launcher(tok_dir, tmp_path):
  import sys
  tdir, _ = tok_dir
  path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}, {"x": 1}])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "launch.train", f"--workdir={tmp_path / 'run'}", "--config.data.kind=file",
         f"--config.data.path={path}", f"--config.data.tokenizer={tdir}", "--config.data.seq_len=16"]
  proc = launcher_zygote.run(cmd, cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "no usable row in" in lines[0] and "bad.jsonl (2 rows" in lines[0], proc.stderr


UNPAIRED_ROWS = [
    {"prompt": "how do you sort the digits", "completion": "they are sorted", "label": True},
    {"prompt": "what is two plus three", "completion": "it is four", "label": False},
    {"prompt": "sort a b c please", "completion": "a b c", "label": 1},
    {"prompt": "sort a b c please", "completion": "c b a"},                       # no label: dropped
]


def test_unpaired_trl_rows_tokenize_with_their_labels(tmp_path, tok_dir):
  """TRL's unpaired format (prompt, completion, label): one completion per row, the label kept; the loop
  reads the rows in the unpaired schema (reference: the tokenizer's own encode of prompt + completion)."""
  import tokenizers
  path, vocab = tok_dir
  arrays, report = tokenize_file(write_jsonl(tmp_path / "kto.jsonl", UNPAIRED_ROWS), path)
  assert report.kept == 3 and report.dropped == {tok_lib.MISSING_FIELD: 1}
  np.testing.assert_array_equal(arrays["label"], [1, 0, 1])
  rows = batch_lib.unpaired_rows(arrays)
  assert batch_lib.check_batch(rows, batch_lib.UNPAIRED)[0] == 3
  np.testing.assert_array_equal(rows["desirable"], [True, False, True])
  enc = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  for i, r in enumerate(UNPAIRED_ROWS[:3]):
    want = enc.encode(r["prompt"]).ids + enc.encode(r["completion"], add_special_tokens=False).ids + [EOS]
    got = rows["completion_tokens"][i][rows["completion_attention"][i]].tolist()
    assert got == want
    n_resp = len(enc.encode(r["completion"], add_special_tokens=False).ids) + 1
    assert rows["completion_response"][i].sum() == n_resp
  # Pairs carry label -1 and stay pairs; mixing the two formats in one file is refused in one line.
  pairs, _ = tokenize_file(write_jsonl(tmp_path / "pairs.jsonl", ROWS), path)
  assert (pairs["label"] == -1).all() and batch_lib.unpaired_rows(pairs) is None
  with pytest.raises(tok_lib.DataError, match="mixes preference pairs") as e:
    tokenize_file(write_jsonl(tmp_path / "mixed.jsonl", ROWS + UNPAIRED_ROWS[:1]), path)
  assert "\n" not in str(e.value)


def test_kto_trains_on_an_unpaired_file_through_the_loop(tmp_path, tok_dir):
  from alignjax.training import config as config_lib
  from alignjax.training import loop
  path, _ = tok_dir
  rows = [dict(r, label=bool(i % 2)) for i, r in enumerate(UNPAIRED_ROWS[:3] * 3)]
  cfg = config_lib.build(None, **{
      "data.kind": "file", "data.path": write_jsonl(tmp_path / "kto.jsonl", rows), "data.tokenizer": path,
      "data.seq_len": 16, "data.eval_examples": 2, "loss.name": "kto", "batch_size": 2, "eval_batch_size": 2,
      "model.hidden_size": 16, "model.intermediate_size": 32, "model.num_layers": 1, "model.num_heads": 2,
      "model.num_kv_heads": 1, "model.head_dim": 8, "sft.steps": 1, "sft.warmup_steps": 1, "dpo.steps": 2,
      "dpo.warmup_steps": 1, "log_every": 1, "checkpoint_every": 10})
  result = loop.run(cfg, workdir=str(tmp_path / "run"), handle_signals=False)
  assert result["loss"] == "kto" and np.isfinite(result["eval_after"]["loss"])
