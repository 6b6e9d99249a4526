"""Atomic, verified, self-healing checkpoints of NNX objects with Orbax.

* Atomic: Orbax writes each step into a temporary directory and renames it into
  place only once every file is on disk, so a crash mid-save never leaves a
  partial step that a restart would pick up.
* Verified before rotation: after a save, the new step's metadata is read back
  and checked against the saved structure; only then are old steps beyond
  ``max_to_keep`` deleted, so the last known-good step is never removed while a
  newer one is unverified (retention is done here, not by Orbax).
* Self-healing restore: :meth:`Checkpointer.restore_latest_valid` tries the
  newest step first; a step that cannot be read (truncated array file, damaged
  ``_METADATA``, empty directory) is reported, renamed to ``<step>.damaged`` (kept
  for inspection, ignored by Orbax) and the next older step is tried.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["Checkpointer", "CheckpointMismatchError", "FINAL_POLICY", "load_policy"]

FINAL_POLICY = "final_policy"  # <workdir>/final_policy: a finished run's policy (models.checkpoint_io.save_model)


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose structure differs from the objects being restored."""


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _is_nnx(obj: Any) -> bool:
  return isinstance(obj, (nnx.Module, nnx.Object)) if hasattr(nnx, "Object") else isinstance(obj, nnx.Module)


def _state(obj: Any) -> Any:
  """What is saved for ``obj``: its ``nnx.state`` for NNX objects, else the pytree itself."""
  return nnx.state(obj) if _is_nnx(obj) else obj


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"policy/blocks/0/qkv/kernel": shape}`` for every array leaf of ``tree``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":
      names = names[:-1]
    out["/".join(names)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
  return out


@contextlib.contextmanager
def _quiet_asyncio():
  """Orbax/tensorstore log unretrieved task errors when a damaged step is read."""
  log = std_logging.getLogger("asyncio")
  level = log.level
  log.setLevel(std_logging.CRITICAL)
  try:
    yield
  finally:
    log.setLevel(level)


def _is_late_loop_callback(u) -> bool:
  """An exception raised by ``call_soon_threadsafe`` on a closed asyncio loop, with no owner."""
  if u.object is not None or not isinstance(u.exc_value, RuntimeError) or str(u.exc_value) != "Event loop is closed":
    return False
  tb = u.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def _drop_late_loop_callbacks() -> None:
  """Keep tensorstore's late callbacks out of the user's terminal after a damaged step's read.

  When a read fails, orbax closes the event loop of that restore while tensorstore still
  completes the other reads on its threads; each completion calls ``call_soon_threadsafe``
  on the closed loop, and the ``RuntimeError('Event loop is closed')`` goes to
  ``sys.unraisablehook``, which prints a traceback per array (47 for one truncated array
  of a tiny model). This wraps the current hook (once; pytest swaps hooks per test) so
  that exactly those are dropped and every other unraisable exception still reaches it.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_alignjax_drops_late_loop_callbacks", False):
    return

  def hook(u):
    if not _is_late_loop_callback(u):
      previous(u)

  hook._alignjax_drops_late_loop_callbacks = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _one_line(e: BaseException) -> str:
  text = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {text[:240]}"


class Checkpointer:
  """Saves and restores a named set of NNX objects (models, optimizers).

  Args:
    directory: where the numbered step directories live.
    max_to_keep: verified steps kept (>= 1); older ones are deleted only after
      a newer step has been verified.
    warn: called with one line per damaged step skipped on restore
      (default: ``absl.logging.warning``).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2, warn: Optional[Callable[[str], None]] = None):
    if max_to_keep < 1:
      raise ValueError(f"Checkpointer: `max_to_keep` must be >= 1, got {max_to_keep}.")
    self.directory = os.path.abspath(directory)
    self.max_to_keep = max_to_keep
    self._warn = warn
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
        item_handlers=ocp.StandardCheckpointHandler(),
    )

  def warn(self, message: str) -> None:
    if self._warn is not None:
      self._warn(message)
    else:
      from absl import logging  # pylint: disable=import-outside-toplevel
      logging.warning("%s", message)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, objects: Mapping[str, Any], *, wait: bool = True) -> None:
    """Saves ``objects`` as ``step``; verifies it, then deletes steps beyond ``max_to_keep``.

    Values are NNX objects (their ``nnx.state`` is saved) or pytrees of arrays
    (e.g. a :class:`alignjax.training.steps.TrainState`).

    ``wait=False`` returns once the save is dispatched; verification and rotation
    then happen at the next :meth:`save`, :meth:`wait` or :meth:`close`.
    """
    self.wait()
    state = {name: _state(obj) for name, obj in objects.items()}
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._pending = (step, _shapes(state))
    if wait:
      self.wait()

  _pending: Optional[tuple[int, dict]] = None

  def wait(self) -> None:
    """Waits for a dispatched save, verifies it and rotates old steps."""
    self._manager.wait_until_finished()
    if self._pending is None:
      return
    step, shapes = self._pending
    self._pending = None
    problem = self._verify(step, shapes)
    if problem:
      raise RuntimeError(f"Checkpointer: step {step} in {self.directory} failed verification after save: {problem}")
    self._rotate(keep_newest=step)

  def _verify(self, step: int, shapes: dict) -> Optional[str]:
    path = os.path.join(self.directory, str(step))
    if not os.path.isdir(path):
      return "step directory missing"
    try:
      saved = _shapes(self._manager.item_metadata(step))
    except Exception as e:  # pylint: disable=broad-except
      return _one_line(e)
    if saved != shapes:
      return "metadata does not match the saved structure"
    for root, _, files in os.walk(path):
      for f in files:
        if os.path.getsize(os.path.join(root, f)) == 0 and not f.startswith("."):
          return f"empty file {os.path.join(root, f)}"
    return None

  def _rotate(self, keep_newest: int) -> None:
    steps = [s for s in self.all_steps() if s <= keep_newest]
    for s in steps[:-self.max_to_keep]:
      self._manager.delete(s)

  def restore(self, objects: Mapping[str, Any], step: Optional[int] = None) -> int:
    """Restores ``step`` (default: latest) into ``objects`` in place; returns the step.

    NNX objects are updated in place; a pytree value is replaced in ``objects``
    (which must then be a mutable mapping) by the restored pytree.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    abstract = {name: _state(obj) for name, obj in objects.items()}
    self._check_compatible(step, abstract)
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    for name, obj in list(objects.items()):
      if _is_nnx(obj):
        nnx.update(obj, restored[name])
      else:
        objects[name] = restored[name]
    return step

  def restore_latest_valid(self, objects: Mapping[str, Any]) -> Optional[int]:
    """Restores the newest readable step into ``objects``; ``None`` if there is none.

    Unreadable newer steps are warned about (with the reason) and renamed to
    ``<step>.damaged`` so later saves of that step number are not blocked. A
    readable step of a different structure raises :class:`CheckpointMismatchError`.
    """
    for step in sorted(self.all_steps(), reverse=True):
      _drop_late_loop_callbacks()
      try:
        with _quiet_asyncio():
          return self.restore(objects, step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # damaged step: fall back
        reason = _one_line(e)
        older = [s for s in self.all_steps() if s < step]
        self.warn(
            f"checkpoint step {step} in {self.directory} is unreadable ({reason}); "
            + (f"falling back to step {older[-1]}" if older else "no older step to fall back to")
        )
        self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    path = os.path.join(self.directory, str(step))
    if jax.process_index() != 0 or not os.path.exists(path):
      return
    target, n = f"{path}.damaged", 1
    while os.path.exists(target):
      n += 1
      target = f"{path}.damaged{n}"
    os.rename(path, target)
    self._manager.reload()

  def _check_compatible(self, step: int, abstract: Any) -> None:
    """Refuses, before reading any array, a checkpoint of a different structure."""
    saved = _shapes(self._manager.item_metadata(step))
    if not saved:
      raise FileNotFoundError(f"checkpoint step {step} holds no items")
    wanted = _shapes(abstract)
    problems = [f"missing in checkpoint: {k}" for k in sorted(set(wanted) - set(saved))]
    problems += [f"not expected: {k}" for k in sorted(set(saved) - set(wanted))]
    problems += [
        f"{k}: checkpoint {saved[k]} vs expected {wanted[k]}"
        for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]
    ]
    if problems:
      shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
      raise CheckpointMismatchError(
          f"checkpoint {self.directory} step {step} does not match the objects being restored "
          f"(was it written with a different config?): {shown}"
      )

  def close(self) -> None:
    self.wait()
    self._manager.close()


def load_policy(path: str, *, where: str = "load_policy: `path`"):
  """A policy model (``alignjax.models.Transformer``) from a run workdir or a model checkpoint.

  ``path`` is one of: the workdir of a finished run (every run saves its final
  policy as ``<workdir>/final_policy`` with
  :func:`alignjax.models.checkpoint_io.save_model`); such an Orbax model
  checkpoint itself (e.g. written by ``launch/convert.py``); or a Hugging Face
  directory (``config.json`` + safetensors, read with :func:`alignjax.models.from_hf`).
  """
  path = os.path.abspath(path)
  from alignjax.models import checkpoint_io  # pylint: disable=import-outside-toplevel
  if os.path.isdir(os.path.join(path, FINAL_POLICY)):
    return checkpoint_io.load_model(os.path.join(path, FINAL_POLICY))
  if os.path.isdir(os.path.join(path, checkpoint_io.CONFIG_ITEM)):
    return checkpoint_io.load_model(path)
  if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
    from alignjax.models import from_hf  # pylint: disable=import-outside-toplevel
    return from_hf(path)
  from alignjax.training.config import ConfigError  # pylint: disable=import-outside-toplevel
  raise ConfigError(f"{where}: {path} is neither a finished run (no {FINAL_POLICY}/), an alignjax model checkpoint "
                    "nor a Hugging Face model directory.")


# ----------------------------------------------------------------------------- conversion

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def run_tokenizer(src: str) -> Optional[str]:
  """The tokenizer directory of a run's policy (``src``: the workdir or its final_policy), or None.

  A directory holding tokenizer files is its own; else the run's ``data.tokenizer``
  or, failing that, its ``init.checkpoint`` (followed through earlier runs' workdirs).
  """
  import json  # pylint: disable=import-outside-toplevel
  path, seen = os.path.abspath(src), set()
  while path and path not in seen:
    seen.add(path)
    if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
      return path
    workdir = path if os.path.isdir(os.path.join(path, FINAL_POLICY)) else os.path.dirname(path)
    try:
      with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        run = json.load(f)
    except (OSError, ValueError):
      return None
    if not isinstance(run, dict):
      return None
    if run.get("data.tokenizer"):
      return os.path.abspath(run["data.tokenizer"])
    path = os.path.abspath(run["init.checkpoint"]) if run.get("init.checkpoint") else None
  return None


def convert(direction: str, src: str, dst: str, *, dtype=None, mesh=None, overwrite: bool = False,
            tokenizer: Optional[str] = None) -> str:
  """Converts model weights between a Hugging Face directory and an Orbax model checkpoint; returns ``dst``.

  ``to_orbax`` reads ``src`` with :func:`alignjax.models.from_hf` and writes the
  parameters and the ``ModelConfig`` (:func:`alignjax.models.checkpoint_io.save_model`);
  ``to_hf`` restores a model checkpoint (or a run's ``final_policy``) and writes a
  directory transformers loads unchanged (:func:`alignjax.models.to_hf`), with the
  tokenizer files of ``tokenizer`` or else of the run (:func:`run_tokenizer`).
  ``dtype`` is the stored parameter dtype (default: unchanged); ``mesh`` (a
  ``jax.sharding.Mesh`` or its shape ``"data,fsdp,tensor"``) places the weights on a
  mesh while converting, so a model larger than one device converts.
  """
  from alignjax import models, sharding  # pylint: disable=import-outside-toplevel
  from alignjax.models import checkpoint_io  # pylint: disable=import-outside-toplevel
  if isinstance(mesh, str):
    shape = [int(x) for x in mesh.split(",") if x.strip().isdigit()]
    if len(shape) != 3:
      raise ValueError(f"convert: --mesh must be three integers 'data,fsdp,tensor', got {mesh!r}.")
    mesh = sharding.make_mesh(*shape)
  if not os.path.isdir(src):
    raise ValueError(f"convert: --src {src} is not a directory.")
  if os.path.exists(dst) and not overwrite:
    raise ValueError(f"convert: --dst {dst} exists; pass --overwrite to replace it.")
  if direction == "to_orbax":
    model = models.from_hf(src, param_dtype=dtype, mesh=mesh)
    return checkpoint_io.save_model(model, dst, force=overwrite)
  if direction != "to_hf":
    raise ValueError(f"convert: --direction must be 'to_orbax' or 'to_hf', got {direction!r}.")
  tokenizer = tokenizer or run_tokenizer(src)
  if os.path.isdir(os.path.join(src, FINAL_POLICY)):  # a run's workdir
    src = os.path.join(src, FINAL_POLICY)
  model = checkpoint_io.load_model(src, param_dtype=dtype, mesh=mesh)
  if overwrite and os.path.isdir(dst):
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(dst)
  models.to_hf(model, dst, tokenizer_dir=tokenizer)
  if tokenizer is None:
    std_logging.getLogger(__name__).warning(
        "to_hf: no tokenizer found for %s (pass --tokenizer); %s holds the weights only.", src, dst)
  return os.path.abspath(dst)
