"""Tokenising preference pairs with a checkpoint's own tokenizer.

The tokenizer is read from a Hugging Face directory: ``tokenizer.json`` through
the ``tokenizers`` library (the core path), ``tokenizer_config.json`` for the
BOS/EOS/PAD tokens and ``add_bos_token``, and — only for chat-format rows —
transformers' ``apply_chat_template`` with the directory's chat template.

A pair becomes two rows of the :mod:`alignjax.data.batch` schema,
``prompt + response``, right-padded to ``max_len``:

* plain-text rows: ``prompt_ids = [BOS] + encode(prompt)`` when the tokenizer
  adds a BOS (``add_bos_token`` in the config, else whatever the tokenizer's
  post-processor puts in front), ``response_ids = encode(response) + [EOS]``;
* chat rows: ``prompt_text = template(prompt_messages, add_generation_prompt=True)``
  (exactly what transformers' ``apply_chat_template(..., add_generation_prompt=True)``
  renders: system prompts and earlier turns kept),
  ``response_text = template(prompt_messages + response_messages)[len(prompt_text):]``,
  both encoded without added special tokens (the template writes them). The
  response is its content followed by the template's end-of-turn token ONCE: the
  ids are cut after the last special token the template wrote when only whitespace
  follows it (ChatML's ``<|im_end|>\n`` becomes ``<|im_end|>``, which is what the
  sampler stops on); a template that writes no special token after the content
  gets ``[EOS]`` appended. TRL (>= 1.0) keeps the template's trailing newline
  (``<|im_end|>\n``); earlier alignjax appended EOS after it as well.

Truncation (counted in the :class:`DataReport`): a plain-text prompt keeps its END
(left-truncated to ``max_prompt_len``; a BOS the tokenizer put in front is kept);
a chat prompt loses whole turns from the left (system messages kept, the kept
history starting at a user turn) until it fits, and a row whose last user turn
alone does not fit is dropped as ``too_long`` (a cut turn would leave its header,
e.g. ChatML's ``<|im_start|>``, dangling). Each response keeps its START
(right-truncated to ``max_len - len(prompt)``); the report counts the responses
that lost their end-of-turn/EOS token this way. A ``"drop"`` policy drops such
rows as ``too_long`` instead. Malformed rows are dropped and reported with their
row numbers (0-based record index in the file; for JSONL the 0-based line number).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from alignjax.data import batch as batch_lib

# Reasons a row is dropped.
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
EMPTY_RESPONSE = "empty_response"
IDENTICAL = "identical"
TOO_LONG = "too_long"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
INVALID_JSON = "invalid_json"
TEMPLATE_ERROR = "template_error"
REASONS = (MISSING_FIELD, BAD_TYPE, EMPTY_RESPONSE, IDENTICAL, TOO_LONG, IDENTICAL_AFTER_TRUNCATION,
           INVALID_JSON, TEMPLATE_ERROR)
MAX_REPORTED_ROWS = 20

PROMPT_POLICIES = ("keep_end", "drop")
RESPONSE_POLICIES = ("keep_start", "drop")


class TokenizerSetupError(ValueError):
  """A tokenizer directory that cannot serve the rows (not a row-level problem)."""


class DataError(ValueError):
  """A data file that yields no usable row (one line naming the file and the counts; launchers exit 2)."""


class BadRecord:
  """Marks a record a reader could not parse (e.g. invalid JSON); ``reason`` is one of REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------------------
# Tokenizer.


def _token_content(value) -> str | None:
  if value is None:
    return None
  if isinstance(value, Mapping):  # serialised AddedToken
    return value.get("content")
  return str(value)


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


class HFTokenizer:
  """A Hugging Face tokenizer directory, read with the ``tokenizers`` library.

  Attributes:
    directory: the directory.
    bos_id, eos_id, pad_id: special ids (``None`` when the tokenizer has none;
      ``pad_id`` falls back to ``eos_id``, then 0).
    prompt_prefix: ids put in front of a plain-text prompt (``[bos_id]`` or ``[]``).
    fingerprint: sha256 of the directory's tokenizer files (the cache key).
  """

  def __init__(self, directory: str):
    import tokenizers  # pylint: disable=import-outside-toplevel
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"HFTokenizer: `directory` {directory!r} has no tokenizer.json (a fast HF tokenizer is needed).")
    self.directory = directory
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    config_path = os.path.join(directory, "tokenizer_config.json")
    self.config: dict[str, Any] = {}
    if os.path.isfile(config_path):
      with open(config_path) as f:
        self.config = json.load(f)
    special_map_path = os.path.join(directory, "special_tokens_map.json")
    special_map = {}
    if os.path.isfile(special_map_path):
      with open(special_map_path) as f:
        special_map = json.load(f)

    def token_id(name):
      content = _token_content(self.config.get(name, special_map.get(name)))
      if content is None:
        return None
      tid = self.tokenizer.token_to_id(content)
      if tid is None:
        raise ValueError(f"HFTokenizer: {name}={content!r} in {directory} is not in the vocabulary.")
      return tid

    self.bos_id, self.eos_id = token_id("bos_token"), token_id("eos_token")
    pad = token_id("pad_token")
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
    add_bos = self.config.get("add_bos_token")
    if add_bos is None:  # whatever the post-processor puts in front of a text
      plain = self.tokenizer.encode("a", add_special_tokens=False).ids
      full = self.tokenizer.encode("a", add_special_tokens=True).ids
      k = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
      self.prompt_prefix = list(full[:k])
    else:
      self.prompt_prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
    files = sorted(f for f in os.listdir(directory)
                   if f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                            "chat_template.jinja", "chat_template.json"))
    h = hashlib.sha256()
    for name in files:
      h.update(name.encode() + b"\0" + _sha256_file(os.path.join(directory, name)).encode())
    self.fingerprint = h.hexdigest()
    self.special_ids = frozenset(
        i for i, t in self.tokenizer.get_added_tokens_decoder().items() if getattr(t, "special", False))
    self._hf = None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Ids of ``text`` without added special tokens."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text without added special tokens (parallel in Rust)."""
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def apply_chat_template(self, messages: list, *, add_generation_prompt: bool) -> str:
    """The rendered text of ``messages`` (transformers' ``apply_chat_template``, ``tokenize=False``)."""
    if self._hf is None:
      try:
        import transformers  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise TokenizerSetupError(
            "HFTokenizer.apply_chat_template: chat-format rows need `transformers` installed.") from e
      self._hf = transformers.AutoTokenizer.from_pretrained(self.directory)
      if not getattr(self._hf, "chat_template", None):
        raise TokenizerSetupError(f"HFTokenizer.apply_chat_template: {self.directory} has no chat template "
                         "(tokenizer_config.json `chat_template` or chat_template.jinja); chat rows need one.")
    return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


  def chat_prompt_ids(self, messages: list) -> list[int]:
    """Ids of ``messages`` rendered with ``add_generation_prompt=True``, ready for sampling.

    Equals transformers' ``apply_chat_template(messages, add_generation_prompt=True)``
    (``tokenize=True``): the rendered text encoded without added special tokens.
    """
    if not _is_messages(messages):
      raise ValueError("HFTokenizer.chat_prompt_ids: `messages` must be a list of {role, content} dicts, "
                       f"got {str(messages)[:80]!r}.")
    return self.encode(self.apply_chat_template(list(messages), add_generation_prompt=True))

  def end_turn(self, ids: Sequence[int]) -> list[int] | None:
    """``ids`` of a rendered chat response cut after its end-of-turn token, or None if it has none.

    The end-of-turn token is the last special token, when only whitespace follows it.
    """
    ids = list(ids)
    for j in range(len(ids) - 1, -1, -1):
      if ids[j] in self.special_ids:
        tail = ids[j + 1:]
        if not tail or not self.tokenizer.decode(tail, skip_special_tokens=False).strip():
          return ids[:j + 1]
        return None
    return None


def load_tokenizer(directory: str) -> HFTokenizer:
  """Reads the tokenizer of a Hugging Face checkpoint directory."""
  return HFTokenizer(directory)


# ------------------------------------------------------------------------------------------
# Report.


@dataclasses.dataclass
class DataReport:
  """What tokenising a file did.

  Attributes:
    source: the file or directory read.
    rows: records read (including malformed ones).
    kept: pairs written.
    truncated: kept pairs whose prompt or a response was cut.
    truncated_prompt, truncated_response: kept pairs with the prompt cut / a response cut.
    lost_end_of_turn: kept responses (chosen and rejected counted apart) whose
      final end-of-turn/EOS token was cut off by response truncation.
    dropped: reason -> count of dropped rows (reasons in :data:`REASONS`).
    row_numbers: reason -> the first :data:`MAX_REPORTED_ROWS` dropped row numbers.
    cached: True when the tokenised set was found on disk and nothing was tokenised.
  """

  source: str
  rows: int = 0
  kept: int = 0
  truncated: int = 0
  truncated_prompt: int = 0
  truncated_response: int = 0
  lost_end_of_turn: int = 0
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)
  row_numbers: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  cached: bool = False

  def drop(self, reason: str, row: int):
    self.dropped[reason] = self.dropped.get(reason, 0) + 1
    rows = self.row_numbers.setdefault(reason, [])
    if len(rows) < MAX_REPORTED_ROWS:
      rows.append(int(row))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DataReport":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

  def summary(self) -> str:
    """One line for a log."""
    dropped = ", ".join(f"{k}={v} (rows {self.row_numbers.get(k, [])})" for k, v in sorted(self.dropped.items()))
    return (f"{self.source}: {self.kept}/{self.rows} pairs kept, {self.truncated} truncated "
            f"(prompt {self.truncated_prompt}, response {self.truncated_response}; "
            f"{self.lost_end_of_turn} responses lost their end-of-turn token); "
            f"dropped: {dropped or 'none'}{' [cached]' if self.cached else ''}")


# ------------------------------------------------------------------------------------------
# Rows -> texts.


def _is_messages(x) -> bool:
  return isinstance(x, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in x)


def _as_messages(x):
  if isinstance(x, str):
    return [{"role": "assistant", "content": x}]
  return [dict(m) for m in x]


def _messages_empty(msgs) -> bool:
  return not msgs or all(not str(m.get("content") or "").strip() for m in msgs)


def _row_texts(record, tok: HFTokenizer):
  """``(kind, prompt, chosen, rejected, prompt_messages)`` of one record, or ``(reason, None...)``.

  ``kind`` is "plain" (prompt gets the tokenizer's prefix) or "chat" (texts
  rendered with the chat template; ``prompt_messages`` for turn-wise truncation).
  """
  kind, *texts = _row_texts_impl(record, tok, unpaired=_is_unpaired(record))
  return (kind, *texts) if len(texts) == 4 else (kind, *texts, None)


def _is_unpaired(record) -> bool:
  """TRL's unpaired format: ``prompt``, ``completion`` and a bool ``label`` (desirable or not)."""
  return isinstance(record, Mapping) and "completion" in record and "chosen" not in record and "rejected" not in record


def _as_pair(record):
  """An unpaired record as a pair whose two sides are its completion (the label travels separately)."""
  return {"prompt": record.get("prompt"), "chosen": record["completion"], "rejected": record["completion"]}


def _row_texts_impl(record, tok: HFTokenizer, unpaired: bool = False):
  if unpaired:
    record = _as_pair(record)
  if isinstance(record, BadRecord):
    return record.reason, None, None, None
  if not isinstance(record, Mapping):
    return BAD_TYPE, None, None, None
  for field in ("chosen", "rejected"):
    if record.get(field) is None:
      return MISSING_FIELD, None, None, None
  prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
  if all(isinstance(x, str) for x in (chosen, rejected)) and isinstance(prompt, str):
    if not chosen.strip() or not rejected.strip():
      return EMPTY_RESPONSE, None, None, None
    if chosen == rejected and not unpaired:
      return IDENTICAL, None, None, None
    return "plain", prompt, chosen, rejected
  if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
    return MISSING_FIELD, None, None, None
  # Chat formats: messages for the prompt and/or the responses.
  for x in (chosen, rejected):
    if not (isinstance(x, str) or _is_messages(x)):
      return BAD_TYPE, None, None, None
  if prompt is None:  # implicit prompt: the common message prefix (TRL's extract_prompt)
    if not (_is_messages(chosen) and _is_messages(rejected)):
      return MISSING_FIELD, None, None, None
    if chosen == rejected and not unpaired:
      return IDENTICAL, None, None, None
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
      k += 1
    if k == 0:
      return MISSING_FIELD, None, None, None
    prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
  elif isinstance(prompt, str):
    prompt = [{"role": "user", "content": prompt}]
  elif not _is_messages(prompt):
    return BAD_TYPE, None, None, None
  chosen, rejected = _as_messages(chosen), _as_messages(rejected)
  if _messages_empty(chosen) or _messages_empty(rejected):
    return EMPTY_RESPONSE, None, None, None
  if chosen == rejected and not unpaired:
    return IDENTICAL, None, None, None
  try:
    prompt_text = tok.apply_chat_template(list(prompt), add_generation_prompt=True)
    texts = []
    for resp in (chosen, rejected):
      full = tok.apply_chat_template(list(prompt) + resp, add_generation_prompt=False)
      if not full.startswith(prompt_text):
        return TEMPLATE_ERROR, None, None, None
      texts.append(full[len(prompt_text):])
  except TokenizerSetupError:
    raise
  except Exception:  # pylint: disable=broad-except  # a template that fails on this row
    return TEMPLATE_ERROR, None, None, None
  return "chat", prompt_text, texts[0], texts[1], list(prompt)


# ------------------------------------------------------------------------------------------
# Tokenising and laying out.


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeOptions:
  """Lengths and truncation policies.

  Attributes:
    max_len: length T of every row (prompt + response, right-padded).
    max_prompt_len: prompts longer than this keep their last tokens (a leading
      BOS is kept); ``None`` = no prompt limit (then a prompt leaving no room
      for a response token drops the row as ``too_long``).
    prompt_truncation: "keep_end" (left-truncate) or "drop" (drop as too_long).
    response_truncation: "keep_start" (right-truncate) or "drop".
    append_eos: end each response with the tokenizer's EOS (unless it already does).
  """

  max_len: int
  max_prompt_len: int | None = None
  prompt_truncation: str = "keep_end"
  response_truncation: str = "keep_start"
  append_eos: bool = True

  def __post_init__(self):
    if not isinstance(self.max_len, int) or self.max_len < 2:
      raise ValueError(f"TokenizeOptions: `max_len` must be an int >= 2, got {self.max_len!r}.")
    if self.max_prompt_len is not None and not (
        isinstance(self.max_prompt_len, int) and 1 <= self.max_prompt_len < self.max_len):
      raise ValueError(f"TokenizeOptions: `max_prompt_len` must be None or an int in [1, max_len={self.max_len}), "
                       f"got {self.max_prompt_len!r}.")
    if self.prompt_truncation not in PROMPT_POLICIES:
      raise ValueError(f"TokenizeOptions: `prompt_truncation` must be one of {PROMPT_POLICIES}, "
                       f"got {self.prompt_truncation!r}.")
    if self.response_truncation not in RESPONSE_POLICIES:
      raise ValueError(f"TokenizeOptions: `response_truncation` must be one of {RESPONSE_POLICIES}, "
                       f"got {self.response_truncation!r}.")


def _truncate_prompt(ids: list[int], limit: int, prefix: Sequence[int]) -> list[int]:
  """A plain prompt's last tokens, keeping the prefix (BOS) the tokenizer put in front."""
  keep = len(prefix) if prefix and list(ids[:len(prefix)]) == list(prefix) and limit > len(prefix) else 0
  return ids[:keep] + ids[len(ids) - (limit - keep):]


def fit_prompt_turns(messages: list, limit: int, tokenizer: HFTokenizer) -> list | None:
  """The longest suffix of whole turns of a chat prompt (system messages kept) that renders to <= ``limit`` ids.

  The rendering is ``apply_chat_template(..., add_generation_prompt=True)``; a kept
  history starts at a user message. Returns the messages (``messages`` itself when
  it fits), or None when even the last user turn alone is too long.
  """
  if len(tokenizer.chat_prompt_ids(messages)) <= limit:
    return list(messages)
  ids = _truncate_turns(messages, limit, tokenizer)
  return None if ids is None else ids[1]


def _truncate_turns(messages: list, limit: int, tokenizer: HFTokenizer):
  """``(ids, messages)`` of the longest suffix of whole turns (system messages kept) that fits ``limit``.

  Kept histories start at a user message; None when even the last user turn alone is too long.
  """
  system = [m for m in messages if m.get("role") == "system"]
  rest = [m for m in messages if m.get("role") != "system"]
  starts = [k for k in range(1, len(rest)) if rest[k].get("role") == "user"]
  for k in starts:
    kept = system + rest[k:]
    ids = tokenizer.encode(tokenizer.apply_chat_template(kept, add_generation_prompt=True))
    if len(ids) <= limit:
      return ids, kept
  return None


def tokenize_pairs(records: Iterable[tuple[int, Any]], tokenizer: HFTokenizer, options: TokenizeOptions, *,
                   source: str = "<records>", chunk_size: int = 1024) -> tuple[dict[str, np.ndarray], DataReport]:
  """Tokenises ``(row_number, record)`` pairs into ``[N, max_len]`` preference arrays.

  Records hold ``prompt``/``chosen``/``rejected`` strings, or chat messages
  (see the module docstring). Returns ``(arrays, report)``: the arrays of
  :data:`alignjax.data.batch.PREFERENCE_KEYS` (int32 tokens, bool attention and
  response masks, right-padded with ``tokenizer.pad_id``) plus ``row`` (int32
  source row numbers); malformed rows are left out and counted in ``report``.
  """
  T = options.max_len
  report = DataReport(source=source)
  cols: dict[str, list] = {k: [] for k in batch_lib.PREFERENCE_KEYS}
  cols["row"], cols["label"] = [], []
  pending: list[tuple[int, str, str, str, str, Any, int]] = []

  def finish(resp_ids, kind):
    """A response's ids ending with one end-of-turn token (chat) or EOS (appended if needed)."""
    if kind == "chat":
      ended = tokenizer.end_turn(resp_ids)
      if ended is not None:
        return ended
    if options.append_eos and tokenizer.eos_id is not None and not (resp_ids and resp_ids[-1] == tokenizer.eos_id):
      return list(resp_ids) + [tokenizer.eos_id]
    return list(resp_ids)

  def flush():
    texts = [t for _, _, p, c, r, _, _ in pending for t in (p, c, r)]
    ids = tokenizer.encode_batch(texts) if texts else []
    for i, (row, kind, _, _, _, messages, label) in enumerate(pending):
      p_ids, c_ids, r_ids = ids[3 * i: 3 * i + 3]
      if kind == "plain":
        p_ids = list(tokenizer.prompt_prefix) + list(p_ids)
      c_ids, r_ids = finish(c_ids, kind), finish(r_ids, kind)
      if not c_ids or not r_ids:
        report.drop(EMPTY_RESPONSE, row)
        continue
      cut_prompt = cut_response = False
      if options.max_prompt_len is not None and len(p_ids) > options.max_prompt_len:
        if options.prompt_truncation == "drop":
          report.drop(TOO_LONG, row)
          continue
        if kind == "chat":
          cut = _truncate_turns(messages, options.max_prompt_len, tokenizer)
          if cut is None:
            report.drop(TOO_LONG, row)
            continue
          p_ids = cut[0]
        else:
          p_ids = _truncate_prompt(p_ids, options.max_prompt_len, tokenizer.prompt_prefix)
        cut_prompt = True
      room = T - len(p_ids)
      if room < 1:
        report.drop(TOO_LONG, row)
        continue
      if len(c_ids) > room or len(r_ids) > room:
        if options.response_truncation == "drop":
          report.drop(TOO_LONG, row)
          continue
        lost = (len(c_ids) > room) + (len(r_ids) > room)
        c_ids, r_ids, cut_response = c_ids[:room], r_ids[:room], True
      if c_ids == r_ids and label < 0:
        report.drop(IDENTICAL_AFTER_TRUNCATION, row)
        continue
      for side, resp in (("chosen", c_ids), ("rejected", r_ids)):
        seq = list(p_ids) + list(resp)
        tokens = np.full(T, tokenizer.pad_id, np.int32)
        tokens[: len(seq)] = seq
        attention = np.zeros(T, bool)
        attention[: len(seq)] = True
        response = np.zeros(T, bool)
        response[len(p_ids): len(seq)] = True
        cols[f"{side}_tokens"].append(tokens)
        cols[f"{side}_attention"].append(attention)
        cols[f"{side}_response"].append(response)
      cols["row"].append(row)
      cols["label"].append(label)
      report.kept += 1
      report.truncated += cut_prompt or cut_response
      report.truncated_prompt += cut_prompt
      report.truncated_response += cut_response
      report.lost_end_of_turn += lost if cut_response else 0
    pending.clear()

  for row, record in records:
    report.rows += 1
    label = -1   # a pair; unpaired rows (TRL's prompt/completion/label) carry 1 (desirable) or 0
    if _is_unpaired(record):
      value = record.get("label")
      if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
        report.drop(MISSING_FIELD if value is None else BAD_TYPE, row)
        continue
      label = int(bool(value))
    kind, prompt, chosen, rejected, messages = _row_texts(record, tokenizer)
    if kind not in ("plain", "chat"):
      report.drop(kind, row)
      continue
    pending.append((row, kind, prompt, chosen, rejected, messages, label))
    if len(pending) >= chunk_size:
      flush()
  flush()
  if report.kept == 0:
    return {}, report
  labels = np.asarray(cols.pop("label"), np.int8)
  if (labels < 0).any() and (labels >= 0).any():
    raise DataError(f"tokenize_pairs: {source} mixes preference pairs (prompt/chosen/rejected) and unpaired rows "
                    "(prompt/completion/label); use one format per file.")
  arrays = {k: np.stack(v) for k, v in cols.items() if k != "row"}
  arrays["row"] = np.asarray(cols["row"], np.int32)
  arrays["label"] = labels
  return arrays, report
