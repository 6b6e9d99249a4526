"""LoRA adapters on alignjax decoders: add, train only them, switch them off, merge them.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685, Eq. 3): a frozen weight W gains a low-rank update, h = x·W + (α/r)·x·A·B,
A [in, r] drawn He-uniform and B [r, out] zero (so the adapted model starts equal to the
base model), α/r the scale. The adapters are ``nnx.LoRAParam`` Variables named
``<weight>_lora_a`` / ``<weight>_lora_b`` next to the weight, the layout, initialisers,
scale and (optional) input dropout of qwix's ``LoraProvider`` (the library Tunix uses).

Why not qwix itself: qwix adds adapters by intercepting the einsum/dot_general calls
inside modules whose *module* path matches a rule, so one rule adapts every weight a
module uses (q, k, v and o of an attention block together) and cannot express a regex over
*parameter* paths (``layers/3/attn/q``); it also matches weights by tracing them back from
the einsum operand, which the stacked weights of ``scan_layers`` (sliced inside
``nnx.scan``) do not allow, nor the reshaped weights of alignjax's linear layers (one 2-D
matmul each, `transformer._weight_product`). The adapters here are the same computation,
keyed by parameter path, and work with scanned layers (one stacked adapter per stacked weight).

    model = lora.apply_lora(model, rank=16, alpha=32, targets=r".*attn/(q|v)")
    graphdef, adapters, base = lora.split(model)       # train `adapters` only
    with lora.adapters_off(model):                      # the base model, same weights
      ref_logits = model(tokens)
    hf_model = lora.merge_lora(model)                   # plain Transformer, W + (α/r)·A·B
"""

from __future__ import annotations

import contextlib
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.config import ModelConfig
from alignjax.models.transformer import Attention, Block, MLP, Transformer

# The adapter filter: nnx.LoRAParam (a subclass of nnx.Param, so list it first in filters).
TRAINABLE = nnx.LoRAParam

# Weights LoRA can adapt: module type -> {name: number of leading input axes of W}.
_ADAPTABLE = {Attention: {"q": 1, "k": 1, "v": 1, "o": 2},
              MLP: {"gate": 1, "up": 1, "down": 1}}


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _targets(model: Transformer):
  """[(module, weight name, n_in, per-layer path strings)] of every adaptable weight."""
  out = []
  scanned = model.config.scan_layers
  L = model.config.num_layers
  for path, module in nnx.iter_graph(model):
    for kind, weights in _ADAPTABLE.items():
      if type(module) is not kind:
        continue
      for name, n_in in weights.items():
        if getattr(module, name, None) is None:
          continue
        full = tuple(path) + (name,)
        if scanned and full[:1] == ("layers",):  # ("layers", "attn", "q") -> layers/i/attn/q
          paths = [_path_str(("layers", i) + full[1:]) for i in range(L)]
        else:
          paths = [_path_str(full)]
        out.append((module, name, n_in, paths))
  return out


def adaptable_paths(model: Transformer) -> list[str]:
  """The per-layer parameter paths `apply_lora`'s `targets` regex is matched against."""
  return [p for *_, paths in _targets(_check_model(model, "adaptable_paths")) for p in paths]


def _check_model(model, where):
  if not isinstance(getattr(model, "config", None), ModelConfig) or not isinstance(model, Transformer):
    raise TypeError(f"{where}: `model` must be an alignjax Transformer, got {type(model).__name__}.")
  return model


def apply_lora(model: Transformer, *, rank: int, alpha: float, targets: str, dropout: float = 0.0,
               rngs: nnx.Rngs | None = None) -> Transformer:
  """Adds LoRA adapters, in place, to the weights whose parameter path matches `targets`.

  LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3): h = x·W + (alpha/rank)·dropout(x)·A·B.

  Args:
    model: an alignjax Transformer (per-layer or ``scan_layers``).
    rank: r, the adapters' rank (positive int).
    alpha: α; the update is scaled by α / r.
    targets: a regex matched in full (``re.fullmatch``) against per-layer parameter paths
      such as ``layers/3/attn/q``, ``layers/0/mlp/down`` (see `adaptable_paths`). With
      ``scan_layers`` a stacked weight is adapted in every layer or none.
    dropout: dropout rate on the adapters' input (training mode; 0 = none). Needs `rngs`
      with a ``dropout`` stream; not with ``scan_layers``.
    rngs: nnx.Rngs for A's initialisation (``params`` stream) and the dropout; default
      ``nnx.Rngs(0)``.

  Returns:
    `model`, with ``nnx.LoRAParam`` adapters ``<weight>_lora_a`` [in..., r] (He-uniform) and
    ``<weight>_lora_b`` [r, out...] (zeros), sharded like the weight's input / output axes.
  """
  fn = "apply_lora"
  _check_model(model, fn)
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(f"{fn}: `lora.rank` must be a positive int, got {rank!r}.")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
    raise ValueError(f"{fn}: `lora.alpha` must be a positive number, got {alpha!r}.")
  if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
    raise ValueError(f"{fn}: `lora.dropout` must be in [0, 1), got {dropout!r}.")
  if dropout > 0 and model.config.scan_layers:
    raise ValueError(f"{fn}: `lora.dropout` > 0 is not supported with scan_layers models.")
  if not isinstance(targets, str):
    raise ValueError(f"{fn}: `lora.targets` must be a regex string, got {targets!r}.")
  try:
    pattern = re.compile(targets)
  except re.error as e:
    raise ValueError(f"{fn}: `lora.targets` {targets!r} is not a valid regex ({e}).") from None
  rngs = nnx.Rngs(0) if rngs is None else rngs
  chosen = []
  for module, name, n_in, paths in _targets(model):
    hits = [bool(pattern.fullmatch(p)) for p in paths]
    if any(hits) and not all(hits):
      raise ValueError(f"{fn}: `lora.targets` {targets!r} matches only some layers of the stacked "
                       f"weight {paths[0]} (scan_layers adapts all layers or none).")
    if getattr(module, name + "_lora_a", None) is not None:
      raise ValueError(f"{fn}: {paths[0]} already has an adapter.")
    if all(hits):
      chosen.append((module, name, n_in))
  if not chosen:
    some = adaptable_paths(model)[:4]
    raise ValueError(f"{fn}: `lora.targets` {targets!r} matches no parameter path (e.g. {some}).")
  stacked = 1 if model.config.scan_layers else 0
  dtype = jnp.dtype(model.config.param_dtype)
  for module, name, n_in in chosen:
    w = getattr(module, name)
    value = w.get_value()
    names = tuple(w.get_metadata().get("out_sharding") or (None,) * value.ndim)
    lead, rest = value.shape[:stacked], value.shape[stacked:]
    in_shape, out_shape = rest[:n_in], rest[n_in:]
    in_names, out_names = names[stacked:stacked + n_in], names[stacked + n_in:]
    fan_in = math.prod(in_shape)
    # He-uniform on the flattened [fan_in, r] matrix, as qwix's default lora_a_initializer.
    a = jax.nn.initializers.he_uniform()(rngs.params(), lead + (fan_in, rank), jnp.float32)
    a = a.reshape(lead + in_shape + (rank,)).astype(dtype)
    b = jnp.zeros(lead + (rank,) + out_shape, dtype)
    a = _place_like(a, value, names[:stacked] + in_names + (None,))
    b = _place_like(b, value, names[:stacked] + (None,) + out_names)
    setattr(module, name + "_lora_a", nnx.LoRAParam(
        a, out_sharding=names[:stacked] + in_names + (None,), eager_sharding=False))
    setattr(module, name + "_lora_b", nnx.LoRAParam(
        b, out_sharding=names[:stacked] + (None,) + out_names, eager_sharding=False))
    module.lora_scale = float(alpha) / rank
    module.lora_enabled = True
    module.lora_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
  return model


def _place_like(x, like, names):
  """x on the mesh of `like` (a sharded weight), by the rule table; else as is."""
  sharding = getattr(like, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return x
  from alignjax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  spec = sharding_lib.logical_to_spec(names, shape=x.shape, mesh=sharding.mesh)
  return jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, spec))


def _adapted_modules(model):
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, (Attention, MLP))
          and hasattr(m, "lora_scale")]


def has_lora(model) -> bool:
  """Whether `model` carries LoRA adapters."""
  return bool(_adapted_modules(model))


def set_adapters(model: Transformer, enabled: bool) -> Transformer:
  """Switches every adapter on or off, in place (a static attribute: jit retraces)."""
  for m in _adapted_modules(model):
    m.lora_enabled = bool(enabled)
  return model


@contextlib.contextmanager
def adapters_off(model: Transformer):
  """Context in which `model` computes the base model's outputs (same weights, adapters off).

  The switch is a static module attribute, so a graphdef taken inside the context
  (``nnx.split(model)``) stays adapter-free wherever it is merged, e.g. a DPO reference
  that shares the policy's weights (``reference.mode=adapter_off``).
  """
  if not has_lora(_check_model(model, "adapters_off")):
    raise ValueError("adapters_off: `model` has no LoRA adapters (apply_lora first).")
  previous = [(m, m.lora_enabled) for m in _adapted_modules(model)]
  set_adapters(model, False)
  try:
    yield model
  finally:
    for m, was in previous:
      m.lora_enabled = was


def split(model: Transformer):
  """``(graphdef, adapters, base)``: the LoRAParam state and everything else.

  Gradients and optimizer state go to `adapters` only; ``nnx.merge(graphdef, adapters,
  base)`` rebuilds the model.
  """
  if not has_lora(_check_model(model, "split")):
    raise ValueError("split: `model` has no LoRA adapters (apply_lora first).")
  return nnx.split(model, TRAINABLE, ...)


def num_trainable(model: Transformer) -> int:
  """Number of adapter parameters (what LoRA trains)."""
  state = nnx.state(model, TRAINABLE)
  return int(sum(x.size for x in jax.tree.leaves(state)))


def merge_lora(model: Transformer) -> Transformer:
  """A plain Transformer with every adapted weight replaced by W + (α/r)·A·B.

  Computed in float32 and stored in the parameter dtype; `models.to_hf` of the result
  writes weights transformers loads unchanged. The adapted model is left as it is.
  """
  _check_model(model, "merge_lora")
  cfg = model.config
  out = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  merged = {}
  for module in _adapted_modules(model):
    for name in _ADAPTABLE[type(module)]:
      a = getattr(module, name + "_lora_a", None)
      if a is None:
        continue
      w = getattr(module, name).get_value()
      a, b = a.get_value().astype(jnp.float32), getattr(module, name + "_lora_b").get_value()
      b = b.astype(jnp.float32)
      r = a.shape[-1]
      if cfg.scan_layers:  # batched over the leading layers axis
        lead = a.shape[0]
        delta = jnp.einsum("lir,lro->lio", a.reshape(lead, -1, r), b.reshape(lead, r, -1))
      else:
        delta = a.reshape(-1, r) @ b.reshape(r, -1)
      value = (w.astype(jnp.float32) + module.lora_scale * delta.reshape(w.shape)).astype(w.dtype)
      if isinstance(getattr(w, "sharding", None), jax.sharding.NamedSharding):
        value = jax.device_put(value, w.sharding)
      merged[id(getattr(module, name))] = value
  src = {tuple(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
  for path, var in nnx.iter_graph(out):
    if isinstance(var, nnx.Variable):
      source = src[tuple(path)]
      var.set_value(merged.get(id(source), source.get_value()))
  return out


__all__ = ["TRAINABLE", "adaptable_paths", "adapters_off", "apply_lora", "has_lora", "merge_lora",
           "num_trainable", "set_adapters", "split"]
