"""Sampling completions for a JSONL file of prompts (what ``launch/sample.py`` runs).

Prompts are JSONL (one a line): a JSON string or ``{"prompt": "..."}`` (needs a
tokenizer), chat messages ``{"messages": [{"role": ..., "content": ...}, ...]}``
(rendered with the tokenizer's chat template and ``add_generation_prompt=True``, as
transformers' ``apply_chat_template`` does), or a list of token ids or
``{"tokens": [...]}``. Each output line holds ``index``, ``tokens`` (the
completion's ids, up to and including EOS), ``logprobs`` (per token, under the
distribution sampled from, :func:`alignjax.decoding.generate`), ``finished`` (ended
with EOS), ``prompt`` for text/chat prompts and ``text`` when a tokenizer is
available. Every batch has the same prompt width (left-padded), so one compiled
program serves the whole file.
"""

from __future__ import annotations

import dataclasses
import json
import os

from alignjax.configs import ConfigError

__all__ = ["SampleConfig", "SampleError", "read_prompts", "sample_file"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class SampleError(ConfigError):
  """A problem with the sampling config or its input files (one line; launchers exit with code 2)."""


def _f(default, help: str):
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
  """What to sample (fields of ``configs/sample.py``)."""
  model: str = _f("", "a Hugging Face directory or an alignjax Orbax model checkpoint directory")
  tokenizer: str = _f("", "a tokenizer directory ('' = the model directory if it holds tokenizer files)")
  prompts: str = _f("", "the JSONL file of prompts")
  output: str = _f("", "the completions JSONL to write")
  max_new_tokens: int = _f(32, "response length limit (> 0)")
  temperature: float = _f(0.0, "sampling temperature (0 = greedy)")
  top_k: int = _f(0, "top-k (0 = off)")
  top_p: float = _f(1.0, "top-p (1 = off)")
  seed: int = _f(0, "sampling seed")
  eos_token_ids: str = _f("auto", "'auto' (tokenizer / generation_config.json), '' (none) or comma-separated ids")
  pad_token_id: int = _f(-1, "-1 = auto (the tokenizer's pad id, else the first EOS id, else 0)")
  batch_size: int = _f(8, "rows per compiled call (> 0)")
  dtype: str = _f("float32", "computation dtype: float32, bfloat16 or float16")
  reward_model: str = _f("", "reward model for best_of_n / args_k: an HF *ForSequenceClassification directory, an "
                         "alignjax reward-model checkpoint or a reward run's workdir")
  best_of_n: int = _f(0, "best-of-N: sample N completions per prompt, keep the reward model's best (0 = off)")
  args_k: int = _f(0, "ARGS reward-guided decoding: the policy's top-k tokens scored each step (0 = off)")
  args_w: float = _f(1.0, "ARGS reward weight w: choose by logit + w * reward (temperature 0: argmax)")


def _is_chat(item) -> bool:
  return isinstance(item, list) and bool(item) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in item)


def read_prompts(path: str) -> list:
  """The prompts of a JSONL file: strings, chat message lists or token-id lists (see the module docstring)."""
  if not path:
    raise SampleError("`config.prompts` is required (a JSONL file of prompts).")
  if not os.path.isfile(path):
    raise SampleError(f"`config.prompts` file not found: {path}")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise SampleError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
      if isinstance(item, dict):
        key = next((k for k in ("tokens", "messages", "prompt") if k in item), None)
        if key is None:
          raise SampleError(f"{path}:{n}: an object prompt needs a `prompt` or `tokens` key (or chat `messages`).")
        item = item[key]
      if isinstance(item, str) or _is_chat(item):
        prompts.append(item)
      elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        prompts.append(item)
      else:
        raise SampleError(f"{path}:{n}: a prompt must be a string, chat messages or a non-empty list of token ids.")
  if not prompts:
    raise SampleError(f"{path}: no prompts.")
  return prompts


def _prompt_ids(tokenizer, prompt) -> list:
  if _is_chat(prompt):  # the chat template's text, then encoded as apply_chat_template(tokenize=True) does
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
  return tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)


def _load_model(path: str, dtype: str):
  from alignjax import models  # pylint: disable=import-outside-toplevel
  from alignjax.models import checkpoint_io  # pylint: disable=import-outside-toplevel
  if not path:
    raise SampleError("`config.model` is required (a Hugging Face directory or an alignjax checkpoint).")
  if not os.path.isdir(path):
    raise SampleError(f"`config.model` directory not found: {path}")
  if os.path.isfile(os.path.join(path, "config.json")):
    return models.from_hf(path, dtype=dtype)
  if os.path.isdir(os.path.join(path, checkpoint_io.CONFIG_ITEM)):
    return checkpoint_io.load_model(path, dtype=dtype)
  raise SampleError(f"`config.model` {path} is neither a Hugging Face directory (config.json) nor an "
                    f"alignjax model checkpoint.")


def _model_vocab_size(path: str):
  """The vocabulary size from a model directory's config (no weights read); None if unknown."""
  from alignjax.models import checkpoint_io, families, hf  # pylint: disable=import-outside-toplevel
  if not path:
    return None
  try:
    if os.path.isfile(os.path.join(path, "config.json")):
      return families.config_from_hf(hf.read_hf_config(path)).vocab_size
    if os.path.isdir(os.path.join(path, checkpoint_io.CONFIG_ITEM)):
      return checkpoint_io.load_config(path).vocab_size
  except Exception:  # pylint: disable=broad-except  (loading the model reports a bad config)
    return None
  return None


def _load_tokenizer(cfg: SampleConfig, needed: bool):
  path = cfg.tokenizer
  if not path and cfg.model and any(os.path.isfile(os.path.join(cfg.model, f)) for f in _TOKENIZER_FILES):
    path = cfg.model
  if not path:
    if needed:
      raise SampleError("text prompts need a tokenizer: set `config.tokenizer` (or put one in the model directory).")
    return None
  if not os.path.isdir(path):
    raise SampleError(f"`config.tokenizer` directory not found: {path}")
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  try:
    return AutoTokenizer.from_pretrained(path)
  except Exception as e:  # pylint: disable=broad-except
    raise SampleError(f"could not load a tokenizer from {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _parse_eos(spec: str):
  if spec in ("auto", ""):
    return None
  try:
    return tuple(int(s) for s in spec.replace(" ", "").strip("()[]").split(",") if s)
  except ValueError:
    raise SampleError(f"`config.eos_token_ids` must be 'auto', '' or comma-separated ids, got {spec!r}.") from None


def _eos_ids(cfg: SampleConfig, tokenizer) -> tuple[int, ...]:
  spec = str(cfg.eos_token_ids).strip()
  if spec != "auto":
    return _parse_eos(spec) or ()
  ids = []
  gen = os.path.join(cfg.model, "generation_config.json")
  if os.path.isfile(gen):
    with open(gen, encoding="utf-8") as f:
      eos = json.load(f).get("eos_token_id")
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    ids.append(tokenizer.eos_token_id)
  return tuple(dict.fromkeys(int(i) for i in ids))


def check_config(cfg: SampleConfig) -> None:
  """Config-time checks (before any model is loaded); raises :class:`SampleError` naming the field."""
  checks = [
      (bool(cfg.output), "`config.output` is required (the completions JSONL to write)."),
      (cfg.batch_size > 0, f"`config.batch_size` must be > 0, got {cfg.batch_size}."),
      (cfg.max_new_tokens > 0, f"`config.max_new_tokens` must be > 0, got {cfg.max_new_tokens}."),
      (cfg.temperature >= 0, f"`config.temperature` must be >= 0 (0 = greedy), got {cfg.temperature}."),
      (cfg.top_k >= 0, f"`config.top_k` must be >= 0 (0 = off), got {cfg.top_k}."),
      (0 < cfg.top_p <= 1, f"`config.top_p` must be in (0, 1] (1 = off), got {cfg.top_p}."),
      (cfg.dtype in ("float32", "bfloat16", "float16"),
       f"`config.dtype` must be 'float32', 'bfloat16' or 'float16', got {cfg.dtype!r}."),
  ]
  guided = cfg.best_of_n > 0 or cfg.args_k > 0
  checks += [
      (cfg.best_of_n >= 0, f"`config.best_of_n` must be >= 0 (0 = off), got {cfg.best_of_n}."),
      (cfg.args_k >= 0, f"`config.args_k` must be >= 0 (0 = off), got {cfg.args_k}."),
      (not (cfg.best_of_n > 0 and cfg.args_k > 0), "`config.best_of_n` and `config.args_k` exclude each other."),
      (not guided or bool(cfg.reward_model), "`config.best_of_n` / `config.args_k` need `config.reward_model`."),
      (guided or not cfg.reward_model, "`config.reward_model` is used by best_of_n or args_k; set one of them."),
      (cfg.args_k == 0 or (cfg.top_k == 0 and cfg.top_p == 1.0),
       "`config.top_k` / `config.top_p` do not apply to ARGS (`config.args_k` candidates, `config.temperature`)."),
  ]
  for ok, message in checks:
    if not ok:
      raise SampleError(message)
  _parse_eos(str(cfg.eos_token_ids).strip())


def _load_reward_model(path: str, dtype: str):
  """The :class:`alignjax.models.RewardModel` at ``path`` (a run's workdir: its ``final_policy``)."""
  from alignjax.models import RewardModel  # pylint: disable=import-outside-toplevel
  if os.path.isdir(os.path.join(path, "final_policy")):
    path = os.path.join(path, "final_policy")
  rm = _load_model(path, dtype)
  if not isinstance(rm, RewardModel):
    raise SampleError(f"`config.reward_model` {path} is not a reward model (a one-label "
                      "*ForSequenceClassification or a reward run's model).")
  return rm


def sample_file(cfg: SampleConfig) -> dict[str, int]:
  """Reads ``cfg.prompts``, samples a completion of each, writes ``cfg.output`` (JSONL, atomically).

  Sampling is :func:`alignjax.decoding.generate` (temperature, top-k, top-p as
  transformers applies them; greedy at temperature 0) on left-padded batches of
  ``batch_size`` rows; with ``reward_model``, :func:`alignjax.decoding.best_of_n`
  (``best_of_n`` samples, records add ``reward`` and every sample's ``rewards``) or
  :func:`alignjax.decoding.args_generate` (ARGS, ``args_k`` candidates, weight ``args_w``). Returns ``{"written": n, "finished": n_with_eos}``; raises
  :class:`SampleError` (one line) on a bad field, file or prompt.
  """
  check_config(cfg)
  prompts = read_prompts(cfg.prompts)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from alignjax.decoding.reward_guided import args_generate, best_of_n  # pylint: disable=import-outside-toplevel
  from alignjax.decoding.sampler import generate  # pylint: disable=import-outside-toplevel

  if cfg.model and not os.path.exists(cfg.model):
    raise SampleError(f"`config.model` {cfg.model} does not exist.")
  tokenizer = _load_tokenizer(cfg, needed=any(isinstance(p, str) or _is_chat(p) for p in prompts))
  try:
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
  except ValueError as e:  # e.g. a tokenizer without a chat template
    raise SampleError(f"could not render the prompts: {_first_line(e)}") from None
  vocab = _model_vocab_size(cfg.model)  # from the config alone: bad prompts fail before the weights load
  for n, row in enumerate(ids):
    if not row:
      raise SampleError(f"prompt {n} tokenizes to no tokens.")
    if vocab is not None and (min(row) < 0 or max(row) >= vocab):
      raise SampleError(f"prompt {n} has token ids outside the model's vocabulary [0, {vocab}): "
                        f"range [{min(row)}, {max(row)}].")
  model = _load_model(cfg.model, cfg.dtype)
  rm = _load_reward_model(cfg.reward_model, cfg.dtype) if cfg.reward_model else None
  eos = _eos_ids(cfg, tokenizer)
  pad = cfg.pad_token_id
  if pad < 0:
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else (
        eos[0] if eos else 0)

  B = min(cfg.batch_size, len(ids))
  T = max(len(r) for r in ids)  # one prompt width for every batch: one compiled program
  rng = jax.random.key(cfg.seed)
  os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
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
      kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, eos_token_ids=eos,
                pad_token_id=pad, rng=jax.random.fold_in(rng, start))
      try:
        if cfg.best_of_n:
          out = best_of_n(model, rm, tokens, mask, n=cfg.best_of_n, top_k=cfg.top_k, top_p=cfg.top_p, **kw)
        elif cfg.args_k:
          out = args_generate(model, rm, tokens, mask, k=cfg.args_k, w=cfg.args_w, **kw)
        else:
          out = generate(model, tokens, mask, top_k=cfg.top_k, top_p=cfg.top_p, **kw)
      except (ValueError, TypeError) as e:
        raise SampleError(str(e)) from None
      toks, msk, lps = (np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))
      for b in range(len(rows)):
        n = int(msk[b].sum())
        done = bool(n and eos and int(toks[b, n - 1]) in eos)
        rec = {"index": start + b, "tokens": toks[b, :n].tolist(),
               "logprobs": [float(x) for x in lps[b, :n]], "finished": done}
        if cfg.best_of_n:
          scores = np.asarray(out.scores[b], np.float64)
          rec["reward"], rec["rewards"] = float(scores[int(out.index[b])]), scores.tolist()
        if isinstance(prompts[start + b], str) or _is_chat(prompts[start + b]):
          rec["prompt"] = prompts[start + b]
        if tokenizer is not None:
          rec["text"] = tokenizer.decode(toks[b, :n].tolist(), skip_special_tokens=True)
        f.write(json.dumps(rec) + "\n")
        written += 1
        finished += done
  os.replace(tmp, cfg.output)
  return {"written": written, "finished": finished}
