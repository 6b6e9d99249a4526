"""AlignDistil's data plumbing for the training loop: frozen models, pairs, rollouts.

Zhang et al. 2025, "AlignDistil: Token-Level Language Model Alignment as
Adaptive Policy Distillation", ACL 2025, arXiv:2503.02832; run as the authors'
code does (``songmzhang/AlignDistil``, OpenRLHF trainers):

* the teacher is a DPO model and the contrast model a *reverse* DPO model (DPO
  on the same preference set with chosen and rejected swapped,
  :func:`swap_pairs`), both trained from the same SFT model with the same beta;
  they are loaded from the workdirs of finished runs (:func:`load_frozen`) and
  run frozen (no optimizer state, inference only);
* off-policy distillation reads the *chosen* responses of the preference set
  only (:func:`chosen_only`; the authors' off-policy trainer distils the chosen
  side);
* on-policy distillation samples one response per prompt from the student at
  temperature 1, top-p 1 every step (:func:`make_rollout`) and distils on it.

The loop (:mod:`alignjax.training.loop`) calls these; nothing here reads flags.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from alignjax.data import batch as batch_lib

__all__ = ["chosen_only", "load_frozen", "make_rollout", "prompt_mask", "run_vocab", "swap_pairs"]


def swap_pairs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """``batch`` with chosen and rejected exchanged (every ``chosen_*``/``rejected_*`` key).

  DPO on the swapped pairs is the reverse-DPO contrast model of AlignDistil
  (arXiv:2503.02832, Sec. 4.2).
  """
  out = {}
  for k, v in batch.items():
    if k.startswith("chosen_"):
      out["rejected_" + k[len("chosen_"):]] = v
    elif k.startswith("rejected_"):
      out["chosen_" + k[len("rejected_"):]] = v
    else:
      out[k] = v
  return out


def chosen_only(batch: Mapping[str, Any]) -> dict[str, Any]:
  """``batch`` whose rejected fields are copies of the chosen ones (off-policy AlignDistil data)."""
  out = dict(batch)
  for field in batch_lib.FIELDS:
    out[batch_lib.key("rejected", field)] = batch[batch_lib.key("chosen", field)]
  return out


def prompt_mask(batch: Mapping[str, Any]) -> np.ndarray:
  """``[B, T]`` bool: the chosen rows' prompt tokens (attended, not response)."""
  att = np.asarray(batch[batch_lib.key("chosen", "attention")], bool)
  resp = np.asarray(batch[batch_lib.key("chosen", "response")], bool)
  return att & ~resp


def make_rollout(policy, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int, seed: int,
                 temperature: float = 1.0, top_p: float = 1.0) -> Callable[[Any, Mapping[str, Any], int], dict]:
  """``rollout(params, batch, step) -> batch`` of one student sample per prompt.

  The prompts are the chosen rows' prompt tokens (left in place; the sampler
  left-aligns them). Each prompt gets one response sampled from the student
  (``params`` merged into ``policy``'s graph) with
  :func:`alignjax.decoding.generate` at ``temperature``/``top_p`` (the
  authors' on-policy runs: 1 and 1), from the key ``fold_in(key(seed), step)``
  (a resumed run draws the same samples). The result is a preference-schema
  batch ``[B, T + max_new_tokens]`` whose chosen and rejected rows are both
  prompt + sample (only the chosen side is distilled).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax import decoding  # pylint: disable=import-outside-toplevel
  from alignjax.study import evaluation  # pylint: disable=import-outside-toplevel

  if max_new_tokens < 1:
    raise ValueError(f"make_rollout: `max_new_tokens` must be >= 1, got {max_new_tokens}.")
  graphdef, _, rest = nnx.split(policy, nnx.Param, ...)
  base = jax.random.key(seed)

  def rollout(params, batch, step: int) -> dict:
    model = nnx.merge(graphdef, params, rest)
    tokens = np.asarray(batch[batch_lib.key("chosen", "tokens")])
    mask = prompt_mask(batch)
    out = decoding.generate(model, tokens, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, eos_token_ids=(eos_token_id,), pad_token_id=pad_token_id,
                            rng=jax.random.fold_in(base, step))
    seq = evaluation.sequence_batch(tokens, mask, np.asarray(out.tokens), np.asarray(out.mask),
                                    pad_token_id=pad_token_id)
    return {batch_lib.key(side, field): seq[field] for side in batch_lib.SIDES for field in batch_lib.FIELDS}

  return rollout


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


def load_frozen(field: str, workdir: str, *, vocab_size: Optional[int] = None):
  """The final policy of the finished run in ``workdir``, frozen (AlignDistil's teacher or contrast model).

  Raises a one-line ``ValueError`` naming ``config.<field>`` when the run is
  missing or unfinished, or when its vocabulary differs from ``vocab_size``
  (the student's).
  """
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel
  run_vocab(field, workdir, student_vocab=vocab_size)
  return loop.load_policy(os.path.abspath(workdir), where=f"config.{field}")
