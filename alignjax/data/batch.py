"""The preference batch schema, spelled once.

A preference batch is a mapping of ``[B, T]`` arrays, one row per pair:

* ``{chosen,rejected}_tokens``: int32 token ids (prompt + response, padded).
* ``{chosen,rejected}_attention``: bool/0-1, True on real (non-pad) tokens.
* ``{chosen,rejected}_response``: bool/0-1, True on the response tokens (and
  EOS) whose log-probabilities a loss scores.

Optional extra keys (precomputed reference log-probs, ids) pass through.
Policy forwards run chosen and rejected rows as one batch of ``2B`` rows,
chosen first: :func:`concat_pair` builds it and :func:`split_pair` splits any
``[2B, ...]`` result back.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SIDES = ("chosen", "rejected")
FIELDS = ("tokens", "attention", "response")
PREFERENCE_KEYS = tuple(f"{side}_{field}" for side in SIDES for field in FIELDS)


def key(side: str, field: str) -> str:
  """``key("chosen", "tokens") == "chosen_tokens"``; checks both names."""
  if side not in SIDES:
    raise ValueError(f"batch.key: `side` must be one of {SIDES}, got {side!r}.")
  if field not in FIELDS:
    raise ValueError(f"batch.key: `field` must be one of {FIELDS}, got {field!r}.")
  return f"{side}_{field}"


def check_preference_batch(batch: Mapping[str, Any]) -> tuple[int, int]:
  """Checks keys and shapes statically; returns ``(B, T)``."""
  missing = [k for k in PREFERENCE_KEYS if k not in batch]
  if missing:
    raise ValueError(f"preference batch is missing keys {missing}; it needs {list(PREFERENCE_KEYS)}.")
  shape = tuple(np.shape(batch["chosen_tokens"]))
  if len(shape) != 2:
    raise ValueError(f"preference batch: `chosen_tokens` must be [B, T], got shape {shape}.")
  for k in PREFERENCE_KEYS:
    if tuple(np.shape(batch[k])) != shape:
      raise ValueError(f"preference batch: `{k}` has shape {tuple(np.shape(batch[k]))}, expected {shape}.")
  return shape


def concat_pair(batch: Mapping[str, Any], field: str) -> jax.Array:
  """``[chosen; rejected]`` of one field, ``[2B, T]``."""
  return jnp.concatenate([jnp.asarray(batch[key("chosen", field)]),
                          jnp.asarray(batch[key("rejected", field)])], axis=0)


def split_pair(x: Any) -> tuple[Any, Any]:
  """Splits a ``[2B, ...]`` array (or pytree of them) built by :func:`concat_pair`."""
  def half(a, i):
    n = a.shape[0]
    if n % 2:
      raise ValueError(f"split_pair: leading dimension must be even (2B), got {n}.")
    return a[: n // 2] if i == 0 else a[n // 2:]
  return jax.tree.map(lambda a: half(a, 0), x), jax.tree.map(lambda a: half(a, 1), x)
