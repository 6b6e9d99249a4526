"""Tiny random Hugging Face checkpoints written locally (no downloads) for model tests.

`make_tiny_hf(family, out_dir, **config_overrides)` builds a transformers model from a tiny
config, draws every weight from N(0, 0.1) (norm weights around their identity value) so
logits are far from uniform, and saves it with `save_pretrained` (safetensors).
`load_hf_torch(out_dir)` loads it back as a float32 eval-mode torch model (eager attention).
"""

from __future__ import annotations

import os

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")

_BASE = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

_DEFAULTS = {
    "llama": dict(_BASE, tie_word_embeddings=False, rope_theta=10000.0),
    "mistral": dict(_BASE, tie_word_embeddings=False, sliding_window=4, head_dim=12),
    "qwen2": dict(_BASE, tie_word_embeddings=False),
    "qwen3": dict(_BASE, head_dim=16, tie_word_embeddings=True),
    "gemma": dict(_BASE, head_dim=16, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(_BASE, head_dim=16, num_hidden_layers=3, sliding_window=4,
                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0),
    "gpt2": dict(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                 bos_token_id=1, eos_token_id=2),
}


def hf_config(family: str, **overrides):
  """The transformers config object of a tiny model of `family`."""
  import transformers
  if family not in _DEFAULTS:
    raise ValueError(f"hf_config: `family` must be one of {FAMILIES}, got {family!r}.")
  kwargs = dict(_DEFAULTS[family])
  kwargs.update(overrides)
  return transformers.AutoConfig.for_model(family, **kwargs)


def randomize_(model, *, std: float = 0.1, seed: int = 0, family: str = "llama"):
  """Draw every parameter from N(0, std); norm scales from 1 + N(0, std) (Gemma: N(0, std))."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
      is_norm_scale = ("norm" in name or ".ln_" in name) and name.endswith("weight")
      if is_norm_scale and family not in ("gemma", "gemma2"):
        noise = noise + 1.0
      p.copy_(noise.to(p.dtype))
  return model


def make_tiny_hf(family: str, out_dir, *, seed: int = 0, std: float = 0.1,
                 max_shard_size=None, torch_dtype=None, **config_overrides):
  """Write a random tiny HF model of `family` to `out_dir` (save_pretrained); returns out_dir."""
  import torch
  import transformers
  config = hf_config(family, **config_overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  model = model.float()
  randomize_(model, std=std, seed=seed, family=family)
  if torch_dtype is not None:
    model = model.to(getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype)
  os.makedirs(out_dir, exist_ok=True)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(out_dir, **kwargs)
  return out_dir


def load_hf_torch(out_dir):
  """The transformers model saved in `out_dir`, float32, eval mode, eager attention."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, dtype=torch.float32, attn_implementation="eager")
  return model.eval()


def torch_logits(model, tokens, mask):
  """float32 numpy logits of a torch HF model with positions cumsum(mask) - 1 (clipped at 0)."""
  import numpy as np
  import torch
  tokens = torch.as_tensor(np.array(tokens), dtype=torch.long)  # a copy: jax arrays read as numpy are read-only
  mask_t = torch.as_tensor(np.asarray(mask).astype(np.int64))
  positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = model(input_ids=tokens, attention_mask=mask_t, position_ids=positions)
  return out.logits.float().numpy()
