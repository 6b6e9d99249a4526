r"""Sample completions for a file of prompts with ``alignjax.decoding.generate``.

  python -m launch.sample --config.model=/path/hf_dir --config.prompts=prompts.jsonl \
      --config.output=completions.jsonl --config.max_new_tokens=64 --config.temperature=0.7

Prompts are JSONL (one a line): a JSON string or ``{"prompt": "..."}`` (needs a tokenizer:
``--config.tokenizer``, default the model directory), chat messages ``{"messages": [{"role":
..., "content": ...}, ...]}`` (rendered with the tokenizer's chat template and
``add_generation_prompt=True``, as transformers' ``apply_chat_template`` does), or a list of
token ids or ``{"tokens": [...]}``. Each output line holds ``tokens`` (the completion's ids, up to and
including EOS), ``logprobs`` (per token, under the distribution sampled from),
``finished`` (ended with EOS), and ``text`` when a tokenizer is available. Fields: see
``configs/sample.py``.

Exit codes: 0 finished; 1 a bug (traceback); 2 user error (a bad flag, config field,
file, prompt or sampling argument), reported in one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]


def _define_config():
  # ml_collections applies --config.x=... overrides while the flag is defined (at import).
  try:
    return config_flags.DEFINE_config_file(
        "config", str(ROOT / "configs" / "sample.py"), "Sampling configuration (see configs/sample.py).",
        lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    if "--verbose" in sys.argv:
      raise
    text = " ".join(str(e).split()).strip("\"'") or type(e).__name__
    print(f"error: bad config override: {text} (see configs/sample.py)", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


EXIT_USER_ERROR = 2
_CONFIG = _define_config()
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show Python tracebacks for user errors.")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class UserError(Exception):
  """A problem with the flags, config or input files (exit code 2)."""


def _read_prompts(path: str) -> list:
  if not path:
    raise UserError("`config.prompts` is required (a JSONL file of prompts).")
  if not os.path.isfile(path):
    raise UserError(f"`config.prompts` file not found: {path}")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
      if isinstance(item, dict):
        if "tokens" in item:
          item = item["tokens"]
        elif "messages" in item:
          item = item["messages"]
        elif "prompt" in item:
          item = item["prompt"]
        else:
          raise UserError(f"{path}:{n}: an object prompt needs a `prompt` or `tokens` key (or chat `messages`).")
      if isinstance(item, str) or _is_chat(item):
        prompts.append(item)
      elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        prompts.append(item)
      else:
        raise UserError(f"{path}:{n}: a prompt must be a string, chat messages or a non-empty list of token ids.")
  if not prompts:
    raise UserError(f"{path}: no prompts.")
  return prompts


def _is_chat(item) -> bool:
  return isinstance(item, list) and bool(item) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in item)


def _prompt_ids(tokenizer, prompt) -> list:
  if _is_chat(prompt):  # the chat template's text, then encoded as apply_chat_template(tokenize=True) does
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
  return tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)


def _load_model(path: str, dtype: str):
  from alignjax import models  # pylint: disable=import-outside-toplevel
  if not path:
    raise UserError("`config.model` is required (a Hugging Face directory or an alignjax checkpoint).")
  if not os.path.isdir(path):
    raise UserError(f"`config.model` directory not found: {path}")
  if os.path.isfile(os.path.join(path, "config.json")):
    return models.from_hf(path, dtype=dtype)
  try:
    from alignjax.models import checkpoint_io  # pylint: disable=import-outside-toplevel
  except ImportError:
    checkpoint_io = None
  if checkpoint_io is not None and os.path.isdir(os.path.join(path, checkpoint_io.CONFIG_ITEM)):
    return checkpoint_io.load_model(path, dtype=dtype)
  raise UserError(f"`config.model` {path} is neither a Hugging Face directory (config.json) nor an "
                  f"alignjax model checkpoint.")


def _load_tokenizer(cfg, needed: bool):
  path = cfg.tokenizer
  if not path and cfg.model and any(os.path.isfile(os.path.join(cfg.model, f)) for f in _TOKENIZER_FILES):
    path = cfg.model
  if not path:
    if needed:
      raise UserError("text prompts need a tokenizer: set `config.tokenizer` (or put one in the model directory).")
    return None
  if not os.path.isdir(path):
    raise UserError(f"`config.tokenizer` directory not found: {path}")
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  try:
    return AutoTokenizer.from_pretrained(path)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"could not load a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _eos_ids(cfg, tokenizer) -> tuple[int, ...]:
  spec = str(cfg.eos_token_ids).strip()
  if spec == "auto":
    ids = []
    gen = os.path.join(cfg.model, "generation_config.json")
    if os.path.isfile(gen):
      with open(gen, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
      ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
      ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))
  if not spec:
    return ()
  return _parse_eos(spec)


def _check_config(cfg) -> None:
  """Config-time checks (before any model is loaded)."""
  if not cfg.output:
    raise UserError("`config.output` is required (the completions JSONL to write).")
  if cfg.batch_size <= 0:
    raise UserError(f"`config.batch_size` must be > 0, got {cfg.batch_size}.")
  if cfg.max_new_tokens <= 0:
    raise UserError(f"`config.max_new_tokens` must be > 0, got {cfg.max_new_tokens}.")
  if not cfg.temperature >= 0:
    raise UserError(f"`config.temperature` must be >= 0 (0 = greedy), got {cfg.temperature}.")
  if cfg.top_k < 0:
    raise UserError(f"`config.top_k` must be >= 0 (0 = off), got {cfg.top_k}.")
  if not 0 < cfg.top_p <= 1:
    raise UserError(f"`config.top_p` must be in (0, 1] (1 = off), got {cfg.top_p}.")
  if cfg.dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"`config.dtype` must be 'float32', 'bfloat16' or 'float16', got {cfg.dtype!r}.")
  _parse_eos(str(cfg.eos_token_ids).strip())


def _parse_eos(spec: str):
  if spec in ("auto", ""):
    return None
  try:
    return tuple(int(s) for s in spec.replace(" ", "").strip("()[]").split(",") if s)
  except ValueError:
    raise UserError(f"`config.eos_token_ids` must be 'auto', '' or comma-separated ids, got {spec!r}.") from None


def sample_file(cfg) -> dict:
  """Reads prompts, samples every one, writes the completions JSONL; returns counts."""
  _check_config(cfg)
  prompts = _read_prompts(cfg.prompts)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from alignjax import decoding  # pylint: disable=import-outside-toplevel

  if cfg.model and not os.path.exists(cfg.model):
    raise UserError(f"`config.model` {cfg.model} does not exist.")
  tokenizer = _load_tokenizer(cfg, needed=any(isinstance(p, str) or _is_chat(p) for p in prompts))
  model = _load_model(cfg.model, cfg.dtype)
  try:
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
  except ValueError as e:  # e.g. a tokenizer without a chat template
    raise UserError(f"could not render the prompts: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  for n, row in enumerate(ids):
    if not row:
      raise UserError(f"prompt {n} tokenizes to no tokens.")
  eos = _eos_ids(cfg, tokenizer)
  pad = cfg.pad_token_id
  if pad < 0:
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else (
        eos[0] if eos else 0)

  B = min(cfg.batch_size, len(ids))
  T = max(len(r) for r in ids)  # one prompt width for every batch: one compiled program
  rng = jax.random.key(cfg.seed)
  out_dir = os.path.dirname(os.path.abspath(cfg.output))
  os.makedirs(out_dir, exist_ok=True)
  written = finished = 0
  tmp = cfg.output + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for start in range(0, len(ids), B):
      rows = ids[start:start + B]
      tokens = np.full((B, T), pad, np.int32)
      mask = np.zeros((B, T), bool)
      for b in range(B):
        row = rows[b] if b < len(rows) else rows[0]  # filler rows keep the shape fixed
        tokens[b, T - len(row):] = row
        mask[b, T - len(row):] = True
      try:
        out = decoding.generate(model, tokens, mask, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                eos_token_ids=eos, pad_token_id=pad,
                                rng=jax.random.fold_in(rng, start))
      except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
      toks, msk, lps = (np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))
      for b in range(len(rows)):
        n = int(msk[b].sum())
        done = bool(n and eos and int(toks[b, n - 1]) in eos)
        rec = {"index": start + b, "tokens": toks[b, :n].tolist(),
               "logprobs": [float(x) for x in lps[b, :n]], "finished": done}
        if isinstance(prompts[start + b], str) or _is_chat(prompts[start + b]):
          rec["prompt"] = prompts[start + b]
        if tokenizer is not None:
          rec["text"] = tokenizer.decode(toks[b, :n].tolist(), skip_special_tokens=True)
        f.write(json.dumps(rec) + "\n")
        written += 1
        finished += done
  os.replace(tmp, cfg.output)
  return {"written": written, "finished": finished}


def main(argv):
  if len(argv) > 1:
    _error(f"unexpected arguments: {argv[1:]} (flags look like --config.name=value)")
  try:
    stats = sample_file(_CONFIG.value)
  except UserError as e:
    if _VERBOSE.value:
      raise
    _error(str(e))
  print(f"wrote {stats['written']} completions ({stats['finished']} ended with EOS) to {_CONFIG.value.output}")
  return 0


def _error(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # config_flags reports an unknown field (--config.nope=1) as AttributeError/KeyError.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    _error(f"bad flag or config field: {first} (see --help and configs/sample.py)")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
