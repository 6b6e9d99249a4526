"""GPT-2: learned positions, LayerNorm, Conv1D weights ([in, out]), fused c_attn, gelu_new."""

from __future__ import annotations

import numpy as np

from alignjax.models.config import ModelConfig
from alignjax.models.families import _common as c

MODEL_TYPES = ("gpt2",)


def config_from_hf(d: dict, **overrides) -> ModelConfig:
  """ModelConfig of a GPT-2 `config.json` dict."""
  where = "config_from_hf"
  c.check_model_type(d, MODEL_TYPES, where)
  c.reject(d, where, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
  D, H = d["n_embd"], d["n_head"]
  kw = dict(
      family="gpt2", vocab_size=d["vocab_size"], hidden_size=D,
      intermediate_size=d.get("n_inner") or 4 * D, num_layers=d["n_layer"], num_heads=H,
      num_kv_heads=H, head_dim=D // H, max_position_embeddings=d.get("n_positions", 1024),
      norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
      activation=c.activation_from_hf(d.get("activation_function", "gelu_new"), where),
      qkv_bias=True, out_bias=True, mlp_bias=True,
      query_pre_attn_scalar=None if d.get("scale_attn_weights", True) else 1.0,
      tie_embeddings=bool(d.get("tie_word_embeddings", True)), **c.tokens_from_hf(d))
  kw.update(overrides)
  return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
  if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    raise ValueError("to_hf: GPT-2 needs num_kv_heads == num_heads and head_dim * heads == hidden.")
  if cfg.query_pre_attn_scalar not in (None, 1.0):
    raise ValueError("to_hf: GPT-2 scales attention by head_dim ** -0.5 or not at all.")
  act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.activation]
  return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
              n_embd=cfg.hidden_size, n_inner=cfg.intermediate_size, n_layer=cfg.num_layers,
              n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings,
              layer_norm_epsilon=cfg.norm_eps, activation_function=act,
              scale_attn_weights=cfg.query_pre_attn_scalar is None,
              tie_word_embeddings=cfg.tie_embeddings, **c.tokens_to_hf(cfg), **c.dtype_to_hf(cfg))


def _fused_qkv(name, paths, D, H, Dh, bias: bool):
  if bias:
    shape = (3 * D,)
    to = lambda a: tuple(a[i * D:(i + 1) * D].reshape(H, Dh) for i in range(3))
    back = lambda q, k, v: np.concatenate([x.reshape(-1) for x in (q, k, v)])
  else:
    shape = (D, 3 * D)
    to = lambda a: tuple(a[:, i * D:(i + 1) * D].reshape(D, H, Dh) for i in range(3))
    back = lambda q, k, v: np.concatenate([x.reshape(D, D) for x in (q, k, v)], axis=1)
  return c.TensorSpec(name, paths, shape, to, back)


def tensor_specs(cfg: ModelConfig) -> list[c.TensorSpec]:
  D, F, V, H, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim
  t = "transformer."
  specs = [c.copy_spec(t + "wte.weight", ("embed",), (V, D)),
           c.copy_spec(t + "wpe.weight", ("pos_embed",), (cfg.max_position_embeddings, D))]
  for i in range(cfg.num_layers):
    p, L = f"{t}h.{i}.", ("layers", i)
    A = L + ("attn",)
    specs += [
        c.copy_spec(p + "ln_1.weight", L + ("attn_norm", "scale"), (D,)),
        c.copy_spec(p + "ln_1.bias", L + ("attn_norm", "bias"), (D,)),
        _fused_qkv(p + "attn.c_attn.weight", (A + ("q",), A + ("k",), A + ("v",)), D, H, Dh, False),
        _fused_qkv(p + "attn.c_attn.bias", (A + ("q_bias",), A + ("k_bias",), A + ("v_bias",)),
                   D, H, Dh, True),
        c.TensorSpec(p + "attn.c_proj.weight", (A + ("o",),), (D, D),
                     lambda a: (a.reshape(H, Dh, D),), lambda o: o.reshape(D, D)),
        c.copy_spec(p + "attn.c_proj.bias", A + ("o_bias",), (D,)),
        c.copy_spec(p + "ln_2.weight", L + ("mlp_norm", "scale"), (D,)),
        c.copy_spec(p + "ln_2.bias", L + ("mlp_norm", "bias"), (D,)),
        c.copy_spec(p + "mlp.c_fc.weight", L + ("mlp", "up"), (D, F)),
        c.copy_spec(p + "mlp.c_fc.bias", L + ("mlp", "up_bias"), (F,)),
        c.copy_spec(p + "mlp.c_proj.weight", L + ("mlp", "down"), (F, D)),
        c.copy_spec(p + "mlp.c_proj.bias", L + ("mlp", "down_bias"), (D,)),
    ]
  specs += [c.copy_spec(t + "ln_f.weight", ("final_norm", "scale"), (D,)),
            c.copy_spec(t + "ln_f.bias", ("final_norm", "bias"), (D,))]
  if not cfg.tie_embeddings:
    specs.append(c.linear_spec("lm_head.weight", ("lm_head",), D, V))
  return specs
