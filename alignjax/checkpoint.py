"""Atomic, resumable checkpoints of NNX objects with Orbax.

Orbax writes each step into a temporary directory and renames it into place
only once every file is on disk, so a crash mid-save never leaves a partial
checkpoint that a restart would pick up; the previous step stays intact.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"policy/blocks/0/qkv/kernel": shape}`` for every array leaf of ``tree``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":
      names = names[:-1]
    out["/".join(names)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
  return out


class Checkpointer:
  """Saves and restores a named set of NNX objects (models, optimizers)."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler(),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, objects: Mapping[str, nnx.Object], *, wait: bool = True) -> None:
    state = {name: nnx.state(obj) for name, obj in objects.items()}
    self._manager.save(step, args=ocp.args.StandardSave(state))
    if wait:
      self._manager.wait_until_finished()

  def restore(self, objects: Mapping[str, nnx.Object], step: Optional[int] = None) -> int:
    """Restores into ``objects`` in place; returns the step restored."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    abstract = {name: nnx.state(obj) for name, obj in objects.items()}
    self._check_compatible(step, abstract)
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    for name, obj in objects.items():
      nnx.update(obj, restored[name])
    return step

  def _check_compatible(self, step: int, abstract: Any) -> None:
    """Refuses, before reading any array, a checkpoint of a different structure."""
    saved = _shapes(self._manager.item_metadata(step))
    wanted = _shapes(abstract)
    problems = [f"missing in checkpoint: {k}" for k in sorted(set(wanted) - set(saved))]
    problems += [f"not expected: {k}" for k in sorted(set(saved) - set(wanted))]
    problems += [
        f"{k}: checkpoint {saved[k]} vs expected {wanted[k]}"
        for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]
    ]
    if problems:
      shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
      raise ValueError(
          f"checkpoint {self.directory} step {step} does not match the objects being restored "
          f"(was it written with a different config?): {shown}"
      )

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
