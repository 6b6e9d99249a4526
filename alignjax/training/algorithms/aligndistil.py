"""AlignDistil: token-level alignment as adaptive policy distillation.

Zhang et al. 2025, "AlignDistil: Token-Level Language Model Alignment as
Adaptive Policy Distillation", ACL 2025, arXiv:2503.02832, run as the authors'
code does (``songmzhang/AlignDistil``, OpenRLHF trainers):

* two frozen models: the ``dpo`` teacher and the ``contrast`` model, a *reverse*
  DPO model (DPO on the same pairs with chosen and rejected swapped,
  ``data.swap_pairs``), both final policies of finished runs
  (``distill.dpo_checkpoint`` / ``distill.contrast_checkpoint``), with no
  optimizer state, inference only;
* off-policy distillation reads the CHOSEN rows of the batch only (the authors'
  off-policy trainer); on-policy (``distill.on_policy``) the chosen rows hold the
  student's own samples (:mod:`alignjax.training.rollout`, temperature 1, top-p 1,
  every step) and the student's logits are divided by ``temperature`` first, as
  their on-policy trainer does;
* per-token loss ``(beta / w_t) KL(pi_student || softmax(z*/tau))`` with the
  teacher of :func:`alignjax.losses.aligndistil_teacher`, length-normalised;
* which distributions: ``positions="next_token"`` (default) distils the ones
  that predict the response tokens (from the last prompt token to the one
  before EOS, the label-aligned layout of every other loss here);
  ``positions="authors"`` reproduces the authors' trainers' one-position offset:
  the distributions AT the response-token positions (their action mask on the
  logits), never the one that predicts the first response token, and including
  the one after EOS.

Per-example metrics are the authors' logged ones (mean weight, expected token
rewards, KL to the DPO and contrast models).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax.losses.aligndistil import MODES
from alignjax.training.algorithms import base

TEACHERS = ("dpo", "contrast")
POSITIONS = ("next_token", "authors")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignDistilHParams:
  """AlignDistil hyper-parameters (authors' off-policy defaults)."""
  beta: float = base.field(0.1, "scale of the per-token distillation loss (> 0)")
  beta2: float = base.field(10.0, "AlignDistil beta2: w_t = beta2 * sum_v |p_dpo - p_contrast| + 1e-3 (> 0; "
                            "authors: 10 off-policy, 15 on-policy)")
  mode: str = base.field("aligndistil", "AlignDistil teacher: " + ", ".join(MODES))
  temperature: float = base.field(1.0, "AlignDistil teacher temperature tau (> 0; authors: 1)")
  length_normalize: bool = base.field(True, "AlignDistil: per-example mean over the distilled tokens (authors: True)")
  on_policy: bool = base.field(False, "student logits / temperature (the authors' on-policy trainer); set from "
                               "distill.on_policy", config=False)
  positions: str = base.field("next_token", "AlignDistil distilled positions: 'next_token' (those predicting the "
                              "response tokens) or 'authors' (the authors' offset: the response-token positions, "
                              "incl. the one after EOS)")

  def __post_init__(self):
    base.check(math.isfinite(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")
    base.check(math.isfinite(self.beta2) and self.beta2 > 0,
               f"loss: `beta2` must be a finite number > 0, got {self.beta2}.")
    base.check(self.mode in MODES, f"loss: `mode` must be one of {list(MODES)}, got {self.mode!r}.")
    base.check(math.isfinite(self.temperature) and self.temperature > 0,
               f"loss: `temperature` must be a finite number > 0, got {self.temperature}.")
    base.check(self.positions in POSITIONS, f"loss: `positions` must be one of {list(POSITIONS)}, "
               f"got {self.positions!r}.")


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  """AlignDistil on the CHOSEN rows of the batch (the rejected rows are not read)."""
  tokens = jnp.asarray(batch["chosen_tokens"])
  attention = batch["chosen_attention"]
  h, unembed = base.features(ctx.policy, tokens, attention)
  hd, ud = base.features(ctx.frozen["dpo"], tokens, attention)
  hc, uc = base.features(ctx.frozen["contrast"], tokens, attention)
  response = jnp.asarray(batch["chosen_response"]).astype(jnp.float32)
  if hp.positions == "authors":
    # The distributions at the response-token positions (the one after EOS included).
    mask, keep = response, slice(None)
  else:
    # The distributions that predict the response tokens.
    mask, keep = response[:, 1:], slice(None, -1)
  h, hd, hc = h[:, keep], jax.lax.stop_gradient(hd[:, keep]), jax.lax.stop_gradient(hc[:, keep])

  def chunk_loss(hs, hdc, hcc, m):
    zs = unembed(hs)
    if hp.on_policy:
      zs = zs.astype(jnp.float32) / hp.temperature
    losses, out = L.aligndistil_loss(zs, ud(hdc), uc(hcc), m, beta=hp.beta, beta2=hp.beta2, mode=hp.mode,
                                     temperature=hp.temperature, length_normalize=False)
    stats = jnp.stack([jnp.sum(out.weights * m, axis=-1), out.expected_reward, out.dpo_expected_reward,
                       out.seq_kl_dpo, out.seq_kl_contrast], axis=-1)
    return losses, jax.lax.stop_gradient(stats)

  per_chunk, stats = L.chunked_scan(chunk_loss, (h, hd, hc, mask), chunk_size=ctx.chunk_size,
                                   needed=mask > 0)   # masked sums: the distilled positions only
  summed, stats = per_chunk.sum(axis=0), stats.sum(axis=0)        # [B], [B, 5]
  denom = jnp.maximum(mask.sum(axis=-1), 1.0)
  losses = summed / denom if hp.length_normalize else summed
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), {
      "distil/loss": jax.lax.stop_gradient(losses),
      "distil/mean_weight": stats[:, 0] / denom,
      "distil/expected_reward": stats[:, 1],
      "distil/dpo_expected_reward": stats[:, 2],
      "distil/seq_kl_dpo": stats[:, 3],
      "distil/token_kl_dpo": stats[:, 3] / denom,
      "distil/seq_kl_contrast": stats[:, 4],
      "distil/token_kl_contrast": stats[:, 4] / denom,
  })


# ---------------------------------------------------------------- run-level hooks

def run_vocab(field: str, workdir: str, *, student_vocab: Optional[int] = None) -> int:
  """The vocabulary size of the final policy of the finished run in ``workdir`` (reads no weights).

  Raises a one-line ``ValueError`` naming ``config.<field>`` when ``workdir`` is
  empty, missing or holds no finished run (no ``final_policy/``, which
  :func:`alignjax.training.loop.run` writes after the last step), or when its
  vocabulary differs from ``student_vocab``.
  """
  from alignjax.models import checkpoint_io  # pylint: disable=import-outside-toplevel
  if not isinstance(workdir, str) or not workdir:
    raise ValueError(f"config.{field} must name the workdir of a finished run, got {workdir!r}.")
  path = os.path.abspath(workdir)
  if not os.path.isdir(path):
    raise ValueError(f"config.{field}: {path} does not exist (train that run first).")
  for d in (os.path.join(path, "final_policy"), path):
    if os.path.isdir(os.path.join(d, checkpoint_io.CONFIG_ITEM)):
      vocab = checkpoint_io.load_config(d).vocab_size
      break
  else:
    raise ValueError(f"config.{field}: {path} holds no finished run (no final_policy/; train that run to the end "
                     "first).")
  if student_vocab is not None and vocab != student_vocab:
    raise ValueError(f"config.{field}: the model in {path} has vocabulary size {vocab}, the student "
                     f"{student_vocab}; teacher, contrast model and student must share one vocabulary.")
  return vocab


def validate_run(cfg) -> None:
  """The frozen runs exist, are finished and share the student's vocabulary; no swapped pairs."""
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  if cfg.data.swap_pairs:
    raise ValueError("config.data.swap_pairs does not apply to 'aligndistil' (it distils the chosen responses); "
                     "swap the pairs of the reverse-DPO run instead.")
  student = config_lib.student_vocab(cfg)
  for name in TEACHERS:
    run_vocab(f"distill.{name}_checkpoint", getattr(cfg.distill, f"{name}_checkpoint"), student_vocab=student)


def load_frozen(cfg, vocab_size: int) -> dict:
  """The frozen ``dpo`` teacher and ``contrast`` model: final policies of the ``distill.*`` runs."""
  from alignjax.training.checkpoint import load_policy  # pylint: disable=import-outside-toplevel
  out = {}
  for name in TEACHERS:
    field = f"distill.{name}_checkpoint"
    workdir = getattr(cfg.distill, f"{name}_checkpoint")
    run_vocab(field, workdir, student_vocab=vocab_size)
    out[name] = load_policy(os.path.abspath(workdir), where=f"config.{field}")
  return out


def rollout(cfg, policy, seq_len: int):
  """On-policy (``distill.on_policy``): one student sample per prompt each step; else None."""
  if not cfg.distill.on_policy:
    return None
  from alignjax.training.rollout import make_rollout  # pylint: disable=import-outside-toplevel
  ds = cfg.distill
  return make_rollout(policy, max_new_tokens=ds.max_new_tokens or seq_len, eos_token_id=ds.eos_token_id,
                      pad_token_id=0, seed=cfg.seed + 7)


base.register(base.Algorithm(
    "aligndistil", AlignDistilHParams, objective, needs="teachers", frozen=TEACHERS,
    description="AlignDistil (Zhang et al. 2025): distillation from DPO and reverse-DPO teachers (distill.*)",
    load_frozen=load_frozen, configure=lambda cfg: {"on_policy": cfg.distill.on_policy},
    validate_run=validate_run, rollout=rollout,
    study={"teachers": True, "methods": {"aligndistil": {"beta2": "@aligndistil_beta2"},
                                         "aligndistil_authors": {"beta2": "@aligndistil_beta2",
                                                                 "positions": "authors"}}}))
