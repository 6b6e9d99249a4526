"""The critical-token pipeline: positive and negative models, contrastive-estimation weights, a weighted data set.

Lin et al. 2024, "Critical Tokens Matter: Token-Level Contrastive Estimation
Enhances LLM's Reasoning Capability", arXiv:2411.19943, Sec. 3, as the authors'
pipeline runs it:

1. :func:`train_contrast_models`: a positive model (SFT on the chosen
   responses) and a negative model (SFT on the rejected responses) of a paired
   data set written by :mod:`alignjax.data.arrays_tfds`, each one
   :func:`alignjax.training.loop.run` (the negative run reads a swapped copy of
   the data: the SFT phase imitates the chosen side);
2. :func:`token_weights`: every response token scored by
   ``p_cd = softmax(2 z_pos - z_neg)[token]`` (:func:`alignjax.losses.critical_token_scores`);
   rejected tokens weigh ``1 - p_cd`` (the critical ones, which the negative
   model prefers, weigh most), chosen tokens ``p_cd``;
3. :func:`weight_pairs`: the data set again, every split with the ``[N, T]``
   float32 columns ``rejected_weights`` and ``chosen_weights`` (the weight of
   token ``t`` at column ``t``; 0 off the response), which the
   ``critical_tokens`` algorithm reads.

:func:`critical_token_data` runs all three; then train with
``loss.name=critical_tokens`` and ``data.path`` = its output.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from alignjax.data import batch as batch_lib

__all__ = ["critical_token_data", "study_data", "token_weights", "train_contrast_models", "weight_pairs"]


def _splits(path: str) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  from alignjax.data import arrays_tfds, to_arrays  # pylint: disable=import-outside-toplevel
  meta = arrays_tfds.read_metadata(path)
  splits = {s: to_arrays(arrays_tfds.open_arrays(path, s)) for s in meta.pop("splits")}
  return splits, meta


def train_contrast_models(data_path: str, workdir: str, *, fields: Mapping[str, Any],
                          train_fn: Optional[Callable[..., Any]] = None) -> tuple[str, str]:
  """``(positive_dir, negative_dir)``: SFT runs on the chosen and on the rejected responses.

  Args:
    data_path: a paired data set of :mod:`alignjax.data.arrays_tfds` (with ``vocab_size`` metadata).
    workdir: where the runs (``runs/positive``, ``runs/negative``) and the
      swapped copy of the data (``data/negative``) go.
    fields: dotted loop-config fields of both runs, e.g. ``{"sft.steps": 100,
      "init.checkpoint": sft_dir}`` (``sft.steps`` >= 1); ``data.*`` and
      ``dpo.steps`` are set here.
    train_fn: ``train_fn(run_cfg, workdir=...)`` (default :func:`alignjax.training.loop.run`).
  """
  from alignjax.data import arrays_tfds  # pylint: disable=import-outside-toplevel
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel
  train_fn = loop.run if train_fn is None else train_fn
  if int(fields.get("sft.steps", 0)) < 1:
    raise ValueError(f"train_contrast_models: `fields` must set sft.steps >= 1, got {fields.get('sft.steps')!r}.")
  data_path, workdir = os.path.abspath(data_path), os.path.abspath(workdir)
  negative_data = os.path.join(workdir, "data", "negative")
  if not arrays_tfds.is_prepared(negative_data):
    splits, meta = _splits(data_path)
    arrays_tfds.write_arrays(negative_data, {s: batch_lib.swap_pairs(a) for s, a in splits.items()},
                             metadata=dict(meta, swapped_from=data_path))
  out = []
  for name, path in (("positive", data_path), ("negative", negative_data)):
    cfg = config_lib.build(None, **{**fields, "data.kind": "arrays", "data.path": path, "dpo.steps": 0})
    run_dir = os.path.join(workdir, "runs", name)
    train_fn(cfg, workdir=run_dir)
    out.append(run_dir)
  return out[0], out[1]


def _scores_fn(positive, negative) -> Callable[[Any, Any], Any]:
  """``fn(tokens, attention) -> p_cd [b, T-1]``: one compiled program over both models (per batch shape)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax import losses as L  # pylint: disable=import-outside-toplevel

  def scores(pos, neg, t, a):
    return L.critical_token_scores(pos(t, attention_mask=a)[:, :-1], neg(t, attention_mask=a)[:, :-1], t[:, 1:])

  if not (isinstance(positive, nnx.Module) and isinstance(negative, nnx.Module)):
    return lambda t, a: scores(positive, negative, t, a)   # other callables: as they come
  (pos_def, pos_state), (neg_def, neg_state) = nnx.split(positive), nnx.split(negative)
  compiled = jax.jit(lambda ps, ns, t, a: scores(nnx.merge(pos_def, ps), nnx.merge(neg_def, ns), t, a))
  return lambda t, a: compiled(pos_state, neg_state, t, a)


def token_weights(positive, negative, data: Mapping[str, Any], *, batch_size: int = 64) -> dict[str, np.ndarray]:
  """``{"rejected_weights", "chosen_weights"}`` ``[N, T]`` float32 from two models (Lin et al. 2024, Sec. 3).

  ``chosen_weights[n, t] = p_cd`` and ``rejected_weights[n, t] = 1 - p_cd`` of
  token ``t`` of that row, ``p_cd = softmax(2 z_pos - z_neg)[token]`` with the
  logits of the positive and negative models at position ``t - 1``
  (:func:`alignjax.losses.critical_token_scores`); 0 off the response. Runs both
  models in one compiled program on ``batch_size`` rows at a time (full ``[b, T, V]``
  logits; the last rows padded to a full batch, so one program serves a data set).
  """
  batch_lib.check_preference_batch(data)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"token_weights: `batch_size` must be a positive int, got {batch_size!r}.")
  fn = _scores_fn(positive, negative)
  out = {}
  for side in batch_lib.SIDES:
    tokens = np.asarray(data[f"{side}_tokens"])
    attention = np.asarray(data[f"{side}_attention"], bool)
    response = np.asarray(data[f"{side}_response"], bool)
    p = np.zeros(tokens.shape, np.float32)
    rows = max(1, min(batch_size, len(tokens)))  # (an empty split: no batches)
    for start in range(0, len(tokens), rows):
      t, a = tokens[start:start + rows], attention[start:start + rows]
      n = len(t)
      if n < rows:  # padding rows (attending to every position), dropped below
        t = np.concatenate([t, np.zeros((rows - n,) + t.shape[1:], t.dtype)])
        a = np.concatenate([a, np.ones((rows - n,) + a.shape[1:], bool)])
      p[start:start + n, 1:] = np.asarray(fn(t, a))[:n]
    weight = p if side == "chosen" else 1.0 - p
    out[f"{side}_weights"] = np.where(response, weight, 0.0).astype(np.float32)
  return {"rejected_weights": out["rejected_weights"], "chosen_weights": out["chosen_weights"]}


def weight_pairs(positive, negative, data_path: str, out_path: str, *, batch_size: int = 64) -> str:
  """Writes ``data_path``'s data set with :func:`token_weights` columns to ``out_path`` (kept if already there)."""
  from alignjax.data import arrays_tfds  # pylint: disable=import-outside-toplevel
  out_path = os.path.abspath(out_path)
  if arrays_tfds.is_prepared(out_path):
    return out_path
  splits, meta = _splits(os.path.abspath(data_path))
  weighted = {s: dict(a, **token_weights(positive, negative, a, batch_size=batch_size)) for s, a in splits.items()}
  return arrays_tfds.write_arrays(out_path, weighted, metadata=dict(meta, critical_token_weights=True))


def critical_token_data(data_path: str, workdir: str, *, fields: Mapping[str, Any],
                        train_fn: Optional[Callable[..., Any]] = None, batch_size: int = 64,
                        out_path: Optional[str] = None) -> str:
  """The whole pipeline: contrast models, weights, and the weighted data set (``out_path``, default
  ``<workdir>/data/weighted``); finished contrast runs are skipped by a ``train_fn`` that checks for them."""
  from alignjax.training.checkpoint import load_policy  # pylint: disable=import-outside-toplevel
  positive_dir, negative_dir = train_contrast_models(data_path, workdir, fields=fields, train_fn=train_fn)
  out_path = out_path or os.path.join(os.path.abspath(workdir), "data", "weighted")
  return weight_pairs(load_policy(positive_dir), load_policy(negative_dir), data_path, out_path,
                      batch_size=batch_size)


def study_data(cfg, *, data_path: str, out_path: str, workdir: str, init_checkpoint: str,
               train_fn: Optional[Callable[..., Any]] = None) -> str:
  """The frontier study's critical-token data set (``Algorithm.study["data"]`` of ``critical_tokens``).

  The pipeline of :func:`critical_token_data` on the study's preference pairs at
  ``data_path``: the positive and negative models are SFT runs of ``cfg.steps``
  steps at ``cfg.learning_rate`` from the study's SFT model ``init_checkpoint``
  (the authors fine-tune both from the policy's initial model), under
  ``<workdir>/critical_tokens``; the weighted data set is written to ``out_path``
  (once), which is returned.
  """
  steps = max(int(cfg.steps), 1)
  fields = {"seed": cfg.seed, "model.preset": cfg.model_preset, "batch_size": cfg.batch_size,
            "init.checkpoint": init_checkpoint, "sft.steps": steps, "sft.learning_rate": cfg.learning_rate,
            "sft.warmup_steps": max(1, steps // 10), "log_every": max(1, steps // 3), "checkpoint_every": steps}
  return critical_token_data(data_path, os.path.join(workdir, "critical_tokens"), fields=fields,
                             train_fn=train_fn, out_path=out_path)
