"""Scalar reward models: a decoder backbone plus a linear score head, read at the last token.

A :class:`RewardModel` is what transformers' ``*ForSequenceClassification`` classes with
one label compute: the backbone's final-normed hidden states ``h [B, T, D]``, a bias-free
linear head ``score: D -> 1``, and the score at each row's last real token. It is the
reward model r_θ(x, y) of Ouyang et al. 2022, "Training language models to follow
instructions with human feedback" (InstructGPT, arXiv:2203.02155, Sec. 3.5: "a scalar
reward ... the SFT model with the final unembedding layer removed"), trained with the
Bradley–Terry loss :func:`alignjax.losses.bradley_terry_loss`.

The last real token is chosen by the attention mask: ``max{t : mask[b, t]}``.
transformers chooses the last token that is not ``pad_token_id``
(``GenericForSequenceClassification``); the two agree unless a row's real tokens
include the pad id after its last real token -- e.g. a tokenizer whose pad token is
also its EOS, appended as a real token: transformers then reads the score before that
EOS, alignjax at it. Rows without a real token get the score of their last position.

``models.from_hf`` returns a :class:`RewardModel` for a checkpoint whose
``config.json`` names a ``*ForSequenceClassification`` architecture with one label;
``models.to_hf`` writes one back (``score.weight`` ``[1, D]``, no ``lm_head``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models import families
from alignjax.models.config import ModelConfig
from alignjax.models.families._common import TensorSpec
from alignjax.models.transformer import KVCache, Transformer, _param

_SUFFIX = "ForSequenceClassification"


class RewardModel(nnx.Module):
  """A :class:`~alignjax.models.Transformer` backbone with a scalar score head.

  ``rm(tokens [B, T] int, attention_mask=None, *, positions=None, cache=None)`` ->
  ``scores [B]`` float32, the head applied to the final-normed hidden state at each row's
  last real token (by the mask); with a ``cache`` (from :meth:`init_cache`) ->
  ``(scores, new_cache)``, the score at the last real token among the new tokens.

  Attributes:
    config: the backbone's :class:`~alignjax.models.ModelConfig` (as read from the HF
      config; its ``tie_embeddings`` is kept for ``to_hf`` although the reward model has
      no unembedding).
    backbone: the decoder; its ``lm_head`` is removed (``None``), so ``backbone.unembed``
      is not meaningful.
    score: ``nnx.Param [D, 1]`` with logical axes ``("embed", None)``.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backbone: Transformer | None = None):
    if not isinstance(config, ModelConfig):
      raise TypeError(f"RewardModel: `config` must be a ModelConfig, got {type(config).__name__}.")
    if backbone is None:
      backbone = Transformer(config, rngs=rngs)
    elif backbone.config != config:
      raise ValueError("RewardModel: `backbone.config` differs from `config`.")
    self.config = config
    self.backbone = backbone
    self.backbone.lm_head = None
    # transformers initialises the score head with N(0, initializer_range = 0.02).
    self.score = _param(rngs, (config.hidden_size, 1), ("embed", None),
                        jnp.dtype(config.param_dtype), std=0.02)

  @classmethod
  def from_backbone(cls, transformer: Transformer, *, rngs: nnx.Rngs) -> "RewardModel":
    """A reward model on (a copy of) a policy's decoder with a fresh score head.

    The usual start of reward-model training (InstructGPT, arXiv:2203.02155, Sec. 3.5:
    the SFT model with its unembedding replaced by a scalar head). ``transformer`` is
    not modified; the copy shares its (immutable) parameter arrays until training
    updates them.
    """
    if not isinstance(transformer, Transformer):
      raise TypeError(f"RewardModel.from_backbone: `transformer` must be an alignjax Transformer, "
                      f"got {type(transformer).__name__}.")
    return cls(transformer.config, rngs=rngs, backbone=nnx.clone(transformer))

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty KV cache of the backbone (see ``Transformer.init_cache``)."""
    return self.backbone.init_cache(batch_size, max_len)

  def head(self, hidden: jax.Array) -> jax.Array:
    """Scores ``[...]`` float32 of final-normed hidden states ``[..., D]`` (math in float32)."""
    w = self.score[...].astype(jnp.float32)
    return (hidden.astype(jnp.float32) @ w)[..., 0]

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: KVCache | None = None):
    tokens = jnp.asarray(tokens)
    out = self.backbone(tokens, attention_mask, positions=positions, cache=cache, return_hidden=True)
    hidden, new_cache = (out, None) if cache is None else out
    T = tokens.shape[1]
    if attention_mask is None:
      last = jnp.full((tokens.shape[0],), T - 1, jnp.int32)
    else:
      mask = jnp.asarray(attention_mask).astype(bool)
      last = (T - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    scores = self.head(h)
    return scores if cache is None else (scores, new_cache)


# ---------------------------------------------------------------------------- HF adapters
def is_sequence_classification(hf_config: dict, *, where: str = "from_hf") -> bool:
  """Whether an HF ``config.json`` dict is a ``*ForSequenceClassification`` checkpoint.

  ValueError if it is one with other than one label (a reward model has one).
  """
  archs = hf_config.get("architectures") or ()
  if not any(isinstance(a, str) and a.endswith(_SUFFIX) for a in archs):
    return False
  if hf_config.get("num_labels") is not None:
    num = int(hf_config["num_labels"])
  elif hf_config.get("id2label"):
    num = len(hf_config["id2label"])
  else:
    num = 2  # transformers' PretrainedConfig default
  if num != 1:
    raise ValueError(f"{where}: a {archs[0]} checkpoint must have one label (num_labels=1) to be "
                     f"a reward model, got {num}.")
  return True


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
  """HF tensor name <-> parameter path specs of a :class:`RewardModel`.

  The backbone's specs (under ``backbone``) without ``lm_head.weight``, plus
  ``score.weight`` ``[1, D]`` (a torch ``nn.Linear(D, 1, bias=False)``) <-> ``score [D, 1]``.
  """
  specs = []
  for s in families.tensor_specs(config):
    if s.name == "lm_head.weight":
      continue
    specs.append(TensorSpec(s.name, tuple(("backbone",) + tuple(p) for p in s.paths), s.hf_shape,
                            s.to_params, s.from_params))
  D = config.hidden_size
  specs.append(TensorSpec("score.weight", (("score",),), (1, D), lambda a: (a.T,), lambda p: p.T))
  return specs


def hf_config(config: ModelConfig) -> dict:
  """The ``config.json`` dict of a :class:`RewardModel`: the family's, as a one-label
  ``*ForSequenceClassification``."""
  d = families.config_to_hf(config)
  arch = d["architectures"][0]
  for suffix in ("ForCausalLM", "LMHeadModel"):
    if arch.endswith(suffix):
      arch = arch[:-len(suffix)]
      break
  d["architectures"] = [arch + _SUFFIX]
  d["id2label"] = {"0": "LABEL_0"}
  d["label2id"] = {"LABEL_0": 0}
  return d


__all__ = ["RewardModel", "hf_config", "is_sequence_classification", "tensor_specs"]
