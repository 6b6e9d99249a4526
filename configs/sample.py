"""Sampling from a model with ``launch/sample.py``: the fields of
:class:`alignjax.decoding.files.SampleConfig` (``--config_help`` lists them).

Override any field on the command line, e.g.
``--config.model=/path/hf_dir --config.prompts=prompts.jsonl --config.output=out.jsonl
--config.temperature=0.7 --config.top_p=0.9``.

Fields:
  model: a Hugging Face directory (``config.json`` + safetensors, read with
    ``alignjax.models.from_hf``) or an alignjax Orbax model checkpoint directory
    (``alignjax.models.checkpoint_io.save_model``).
  tokenizer: a directory ``transformers.AutoTokenizer`` reads; "" = ``model`` if it holds
    tokenizer files. Needed for text prompts; with it completions also carry ``text``.
  prompts: JSONL, one prompt a line: a JSON string, ``{"prompt": "..."}``, chat
    ``{"messages": [...]}``, a list of token ids, or ``{"tokens": [ids]}``.
  output: JSONL written with one completion per prompt, in order.
  max_new_tokens, temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed.
  eos_token_ids: "auto" (the tokenizer's / generation_config.json's EOS ids), "" (none),
    or comma-separated ids, e.g. "2,7".
  pad_token_id: -1 = auto (the tokenizer's pad id, else the first EOS id, else 0).
  batch_size: rows per compiled call (the last batch is padded, so one program serves all).
  dtype: computation dtype, "float32", "bfloat16" or "float16".
  reward_model: a reward model (HF one-label ``*ForSequenceClassification`` directory, alignjax
    reward checkpoint, or a ``loss.name=reward`` run's workdir) for the reward-guided decoders:
  best_of_n: N > 0 samples N completions per prompt and keeps the best (records add
    ``reward`` and all N ``rewards``); ``alignjax.decoding.best_of_n``.
  args_k, args_w: ARGS (``alignjax.decoding.args_generate``): k > 0 candidates per step chosen
    by ``logit + w * reward`` (greedy at temperature 0, else sampled).
"""

import dataclasses

import ml_collections

from alignjax.decoding.files import SampleConfig


def get_config():
  return ml_collections.ConfigDict(dataclasses.asdict(SampleConfig()))
