"""The batch schemas, spelled once: ``paired`` (preference pairs) and ``unpaired``.

A **paired** batch (DPO, GPO, TDPO, AlignDistil, ...) is a mapping of ``[B, T]``
arrays, one row per pair:

* ``{chosen,rejected}_tokens``: int32 token ids (prompt + response, padded).
* ``{chosen,rejected}_attention``: bool/0-1, True on real (non-pad) tokens.
* ``{chosen,rejected}_response``: bool/0-1, True on the response tokens (and
  EOS) whose log-probabilities a loss scores.

Optional extra keys (precomputed reference log-probs, ids) pass through.
Policy forwards run chosen and rejected rows as one batch of ``2B`` rows,
chosen first: :func:`concat_pair` builds it and :func:`split_pair` splits any
``[2B, ...]`` result back.

An **unpaired** batch (KTO; TRL's unpaired format: prompt, completion, label)
has one response per row, ``completion_{tokens,attention,response}`` ``[B, T]``
and ``desirable`` ``[B]`` (bool: the completion is a good one), plus,
optionally, the mismatched "KL" rows ``kl_{tokens,attention,response}`` KTO's
reference-point estimate uses (each prompt with another row's completion,
built as TRL does by :func:`mismatched_rows`).

A :class:`Schema` names its *sides* (groups of ``{side}_{field}`` arrays);
everything that walks a batch (steps, reference modes, token counts, the
planner's abstract batch) asks the schema instead of assuming pairs.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SIDES = ("chosen", "rejected")
FIELDS = ("tokens", "attention", "response")
PREFERENCE_KEYS = tuple(f"{side}_{field}" for side in SIDES for field in FIELDS)


UNPAIRED_SIDES = ("completion",)
KL_SIDE = "kl"
DESIRABLE = "desirable"
_ALL_SIDES = SIDES + UNPAIRED_SIDES + (KL_SIDE,)


class Schema(NamedTuple):
  """A batch layout.

  Attributes:
    name: ``"paired"`` or ``"unpaired"``.
    sides: the ``{side}_{field}`` groups every batch has (``[B, T]`` each).
    optional_sides: groups a batch may have (unpaired: the KTO ``kl`` rows).
    per_example: ``[B]`` keys every batch has (unpaired: ``desirable``).
  """
  name: str
  sides: tuple[str, ...]
  optional_sides: tuple[str, ...] = ()
  per_example: tuple[str, ...] = ()

  @property
  def first_key(self) -> str:
    """The ``[B, T]`` key whose leading dimension is the number of examples."""
    return f"{self.sides[0]}_tokens"

  def keys(self, *, optional: bool = False) -> tuple[str, ...]:
    sides = self.sides + (self.optional_sides if optional else ())
    return tuple(f"{s}_{f}" for s in sides for f in FIELDS) + self.per_example

  def present_sides(self, batch: Mapping[str, Any]) -> tuple[str, ...]:
    """The schema's sides plus the optional sides ``batch`` holds."""
    return self.sides + tuple(s for s in self.optional_sides if f"{s}_tokens" in batch)


PAIRED = Schema("paired", SIDES)
UNPAIRED = Schema("unpaired", UNPAIRED_SIDES, (KL_SIDE,), (DESIRABLE,))
SCHEMAS = {s.name: s for s in (PAIRED, UNPAIRED)}


def schema(name: str) -> Schema:
  """The :class:`Schema` called ``name``; an unknown name lists the valid ones."""
  if name not in SCHEMAS:
    raise ValueError(f"batch.schema: `name` must be one of {sorted(SCHEMAS)}, got {name!r}.")
  return SCHEMAS[name]


def detect(batch: Mapping[str, Any]) -> Schema:
  """The schema whose keys ``batch`` holds (paired first)."""
  for s in SCHEMAS.values():
    if all(k in batch for k in s.keys()):
      return s
  raise ValueError(f"batch: keys {sorted(batch)} match no schema; paired needs {list(PAIRED.keys())}, "
                   f"unpaired {list(UNPAIRED.keys())}.")


def check_batch(batch: Mapping[str, Any], schema_: Schema) -> tuple[int, int]:
  """Checks ``batch`` against ``schema_`` statically; returns ``(B, T)``."""
  missing = [k for k in schema_.keys() if k not in batch]
  if missing:
    raise ValueError(f"{schema_.name} batch is missing keys {missing}; it needs {list(schema_.keys())}.")
  first = schema_.first_key
  shape = tuple(np.shape(batch[first]))
  if len(shape) != 2:
    raise ValueError(f"{schema_.name} batch: `{first}` must be [B, T], got shape {shape}.")
  for s in schema_.present_sides(batch):
    for f in FIELDS:
      k = f"{s}_{f}"
      if tuple(np.shape(batch[k])) != shape:
        raise ValueError(f"{schema_.name} batch: `{k}` has shape {tuple(np.shape(batch[k]))}, expected {shape}.")
  for k in schema_.per_example:
    if tuple(np.shape(batch[k])) != shape[:1]:
      raise ValueError(f"{schema_.name} batch: `{k}` has shape {tuple(np.shape(batch[k]))}, expected {shape[:1]}.")
  return shape


def num_examples(batch: Mapping[str, Any]) -> int:
  """Rows (pairs, or unpaired examples) of a batch or data set of either schema."""
  return int(np.shape(batch[detect(batch).first_key])[0])


def concat_sides(batch: Mapping[str, Any], field: str, sides: tuple[str, ...]) -> jax.Array:
  """``[side_0; side_1; ...]`` of one field, ``[len(sides) * B, T]``."""
  return jnp.concatenate([jnp.asarray(batch[f"{s}_{field}"]) for s in sides], axis=0)


def split_sides(x: Any, n: int) -> tuple[Any, ...]:
  """Splits a ``[n * B, ...]`` array (or pytree) built by :func:`concat_sides` into ``n`` parts."""
  def part(a, i):
    rows = a.shape[0]
    if rows % n:
      raise ValueError(f"split_sides: leading dimension {rows} is not a multiple of {n}.")
    k = rows // n
    return a[i * k:(i + 1) * k]
  return tuple(jax.tree.map(lambda a: part(a, i), x) for i in range(n))


def reference_keys(schema_: Schema, sides: tuple[str, ...] | None = None) -> tuple[str, ...]:
  """The precomputed reference keys ``reference_{side}_{logps,mean_logps}`` of ``sides``."""
  sides = schema_.sides + schema_.optional_sides if sides is None else sides
  return tuple(f"reference_{s}_{kind}" for s in sides for kind in ("logps", "mean_logps"))


def unpair(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Paired rows -> unpaired rows: every chosen row desirable, every rejected row not.

  As TRL's ``unpair_preference_dataset``: ``2B`` rows, the chosen ones first.
  Precomputed reference log-probs follow their rows; other extra keys are dropped.
  """
  check_batch(batch, PAIRED)
  out = {f"completion_{f}": np.concatenate([np.asarray(batch[key("chosen", f)]),
                                            np.asarray(batch[key("rejected", f)])]) for f in FIELDS}
  for kind in ("logps", "mean_logps"):
    if f"reference_chosen_{kind}" in batch:
      out[f"reference_completion_{kind}"] = np.concatenate([np.asarray(batch[f"reference_chosen_{kind}"]),
                                                            np.asarray(batch[f"reference_rejected_{kind}"])])
  b = np.shape(batch["chosen_tokens"])[0]
  out[DESIRABLE] = np.concatenate([np.ones(b, bool), np.zeros(b, bool)])
  return out


def mismatched_rows(batch: Mapping[str, Any], *, side: str = "completion") -> dict[str, np.ndarray]:
  """KTO's KL rows: row ``i``'s prompt with row ``i - 1``'s completion (cyclically), right-padded.

  Ethayarajh et al. 2024, "KTO", arXiv:2402.01306, Sec. 4.1 (the reference point
  z_0 from mismatched pairs); TRL's ``KTOTrainer`` builds its KL data set the same
  way within each batch: ``KL_completion_ids = [completions[-1]] + completions[:-1]``,
  so prompt ``i`` gets the *previous* row's completion and prompt 0 the last row's
  (:func:`alignjax.losses.kto_mismatched_pairs`). Rows are right-padded to the
  batch's length ``T``; a pair longer than ``T`` keeps its first ``T`` tokens.
  Returns ``kl_{tokens,attention,response}`` ``[B, T]``.
  """
  tokens = np.asarray(batch[f"{side}_tokens"])
  attention = np.asarray(batch[f"{side}_attention"]).astype(bool)
  response = np.asarray(batch[f"{side}_response"]).astype(bool)
  b, t = tokens.shape
  out_t, out_a, out_r = np.zeros_like(tokens), np.zeros((b, t), bool), np.zeros((b, t), bool)
  for i in range(b):
    j = (i - 1) % b
    prompt = tokens[i][attention[i] & ~response[i]]
    completion = tokens[j][response[j]]
    row = np.concatenate([prompt, completion])[:t]
    n, p = len(row), min(len(prompt), t)
    out_t[i, :n], out_a[i, :n], out_r[i, p:n] = row, True, True
  return {"kl_tokens": out_t, "kl_attention": out_a, "kl_response": out_r}


def key(side: str, field: str) -> str:
  """``key("chosen", "tokens") == "chosen_tokens"``; checks both names."""
  if side not in _ALL_SIDES:
    raise ValueError(f"batch.key: `side` must be one of {_ALL_SIDES}, got {side!r}.")
  if field not in FIELDS:
    raise ValueError(f"batch.key: `field` must be one of {FIELDS}, got {field!r}.")
  return f"{side}_{field}"


def check_preference_batch(batch: Mapping[str, Any]) -> tuple[int, int]:
  """Checks a paired batch's keys and shapes statically; returns ``(B, T)``."""
  missing = [k for k in PREFERENCE_KEYS if k not in batch]
  if missing:
    raise ValueError(f"preference batch is missing keys {missing}; it needs {list(PREFERENCE_KEYS)}.")
  return check_batch(batch, PAIRED)


def concat_pair(batch: Mapping[str, Any], field: str) -> jax.Array:
  """``[chosen; rejected]`` of one field, ``[2B, T]``."""
  return concat_sides(batch, field, SIDES)


def split_pair(x: Any) -> tuple[Any, Any]:
  """Splits a ``[2B, ...]`` array (or pytree of them) built by :func:`concat_pair`."""
  try:
    return split_sides(x, 2)
  except ValueError:
    raise ValueError("split_pair: leading dimension must be even (2B).") from None


def sequence_batch(prompt_tokens, prompt_mask, response_tokens, response_mask, *,
                   pad_token_id: int = 0) -> dict[str, np.ndarray]:
  """``(tokens, attention, response)`` ``[N, T+L]`` of prompts followed by their responses.

  Prompt padding (left or right) stays in place: positions follow the mask, so a
  padded prompt scores like the unpadded one. Response slots outside
  ``response_mask`` become ``pad_token_id`` and are not attended to or scored.
  """
  pt, pm = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
  rt, rm = np.asarray(response_tokens), np.asarray(response_mask, bool)
  if pt.ndim != 2 or pm.shape != pt.shape:
    raise ValueError(f"sequence_batch: `prompt_tokens`/`prompt_mask` must be [N, T] of one shape, got "
                     f"{pt.shape} and {pm.shape}.")
  if rt.ndim != 2 or rm.shape != rt.shape or rt.shape[0] != pt.shape[0]:
    raise ValueError(f"sequence_batch: `response_tokens`/`response_mask` must be [N, L] with N = {pt.shape[0]}, "
                     f"got {rt.shape} and {rm.shape}.")
  tokens = np.concatenate([pt, np.where(rm, rt, pad_token_id)], axis=1).astype(np.int32)
  attention = np.concatenate([pm, rm], axis=1)
  response = np.concatenate([np.zeros_like(pm), rm], axis=1)
  return {"tokens": tokens, "attention": attention, "response": response}


def response_batch(prompt_tokens, prompt_mask, response_tokens, response_mask, *,
                   pad_token_id: int = 0) -> dict[str, np.ndarray]:
  """A preference-schema batch whose chosen and rejected rows are both prompt + response.

  The scoring pass of :func:`make_scorer` reads it (the schema of
  :mod:`alignjax.data.batch` lets it reuse the training code's chunked log-probs).
  """
  seq = sequence_batch(prompt_tokens, prompt_mask, response_tokens, response_mask, pad_token_id=pad_token_id)
  return {key(side, field): seq[field] for side in SIDES for field in FIELDS}


def swap_pairs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """``batch`` with chosen and rejected exchanged (every ``chosen_*``/``rejected_*`` key).

  DPO on the swapped pairs is the reverse-DPO contrast model of AlignDistil
  (Zhang et al. 2025, arXiv:2503.02832, Sec. 4.2).
  """
  out = {}
  for k, v in batch.items():
    for prefix in ("", "reference_"):   # precomputed reference log-probs swap with their rows
      if k.startswith(prefix + "chosen_"):
        out[prefix + "rejected_" + k[len(prefix + "chosen_"):]] = v
        break
      if k.startswith(prefix + "rejected_"):
        out[prefix + "chosen_" + k[len(prefix + "rejected_"):]] = v
        break
    else:
      out[k] = v
  return out


def prompt_mask(batch: Mapping[str, Any]) -> np.ndarray:
  """``[B, T]`` bool: the prompt tokens (attended, not response) of the first side's rows."""
  side = detect(batch).sides[0]
  att = np.asarray(batch[f"{side}_attention"], bool)
  resp = np.asarray(batch[f"{side}_response"], bool)
  return att & ~resp


def abstract_batch(schema_: Schema, batch_size: int, seq_len: int, *, sides: tuple[str, ...] | None = None,
                   reference: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """``jax.ShapeDtypeStruct`` of a ``schema_`` batch (the planner's abstract input; allocates nothing).

  ``sides`` defaults to the schema's required sides; ``reference`` adds the
  precomputed reference keys of those sides.
  """
  sides = schema_.sides if sides is None else sides
  out = {f"{s}_{f}": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for s in sides for f in FIELDS}
  for k in schema_.per_example:
    out[k] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_)
  if reference:
    for k in reference_keys(schema_, sides):
      out[k] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  return out


def unpaired_rows(batch: Mapping[str, Any]) -> dict[str, Any] | None:
  """The unpaired rows of a tokenised file batch, or None when it holds pairs.

  Files in TRL's unpaired format (``prompt``, ``completion``, ``label``) are stored
  like pairs whose two sides are the completion, with ``label`` 1 (desirable) or
  0; pairs carry ``label == -1``. Returns the unpaired schema's keys.
  """
  label = batch.get("label")
  if label is None or np.size(label) == 0 or np.asarray(label).min() < 0:
    return None
  out = {f"completion_{f}": batch[key("chosen", f)] for f in FIELDS}
  out[DESIRABLE] = np.asarray(label) > 0
  return out
