r"""Converts model weights between Hugging Face directories and Orbax checkpoints.

  python -m launch.convert --direction=to_orbax --src=hf/llama --dst=ckpt/llama
  python -m launch.convert --direction=to_hf --src=ckpt/llama --dst=hf/llama_out \
      --dtype=bfloat16

``to_orbax`` reads a ``save_pretrained`` directory with ``models.from_hf`` and
writes an Orbax checkpoint holding the parameters and the ``ModelConfig`` (in
the checkpoint's ``model_config`` item); ``to_hf`` restores it with
``models.checkpoint_io.load_model`` and writes an HF directory with
``models.to_hf`` that ``transformers`` loads unchanged. ``--dtype`` sets the
stored parameter dtype of the output (default: unchanged). ``to_hf`` also copies a
tokenizer (files, chat template, generation config) so the output is a complete
Hugging Face directory: ``--tokenizer``, else, for a run's policy (``--src`` a run's
workdir or its ``final_policy``), the run's ``data.tokenizer`` or ``init.checkpoint``
(followed through earlier runs' workdirs); without one only the weights are written.

With ``--mesh=data,fsdp,tensor`` (e.g. ``1,8,1``) the weights are placed on a
mesh while converting, so a model larger than one device's memory converts;
on a multi-host slice pass ``--distributed`` so every process joins
``jax.distributed`` and reads/writes only its own shards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging

ROOT = Path(__file__).resolve().parents[1]

_DIRECTION = flags.DEFINE_enum("direction", None, ["to_orbax", "to_hf"], "Conversion direction.")
_SRC = flags.DEFINE_string("src", None, "Source directory (HF directory or Orbax checkpoint).")
_DST = flags.DEFINE_string("dst", None, "Destination directory (must not exist unless --overwrite).")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype of the output, e.g. float32 or bfloat16.")
_MESH = flags.DEFINE_string("mesh", None, "Optional mesh shape 'data,fsdp,tensor', e.g. '1,8,1'.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "to_hf: HF tokenizer directory to copy (default: the run's).")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def run_tokenizer(src: str):
  """The tokenizer directory of a run's policy (``src``: the workdir or its final_policy), or None."""
  import json

  path, seen = os.path.abspath(src), set()
  while path and path not in seen:
    seen.add(path)
    if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
      return path
    workdir = path if os.path.isdir(os.path.join(path, "final_policy")) else os.path.dirname(path)
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


def _mesh(spec):
  if not spec:
    return None
  from alignjax import sharding

  try:
    data, fsdp, tensor = (int(x) for x in spec.split(","))
  except ValueError:
    raise ValueError(f"--mesh must be three integers 'data,fsdp,tensor', got {spec!r}.") from None
  return sharding.make_mesh(data, fsdp, tensor)


def convert(direction: str, src: str, dst: str, *, dtype=None, mesh=None, overwrite=False, tokenizer=None) -> str:
  """Runs one conversion; returns the written directory."""
  from alignjax import models
  from alignjax.models import checkpoint_io

  if not os.path.isdir(src):
    raise ValueError(f"convert: --src {src} is not a directory.")
  if os.path.exists(dst) and not overwrite:
    raise ValueError(f"convert: --dst {dst} exists; pass --overwrite to replace it.")
  if direction == "to_orbax":
    model = models.from_hf(src, param_dtype=dtype, mesh=mesh)
    return checkpoint_io.save_model(model, dst, force=overwrite)
  if direction == "to_hf":
    tokenizer = tokenizer or run_tokenizer(src)
    if os.path.isdir(os.path.join(src, "final_policy")):  # a run's workdir
      src = os.path.join(src, "final_policy")
    model = checkpoint_io.load_model(src, param_dtype=dtype, mesh=mesh)
    if overwrite and os.path.isdir(dst):
      import shutil

      shutil.rmtree(dst)
    models.to_hf(model, dst, tokenizer_dir=tokenizer)
    if tokenizer is None:
      logging.warning("to_hf: no tokenizer found for %s (pass --tokenizer); %s holds the weights only.", src, dst)
    return os.path.abspath(dst)
  raise ValueError(f"convert: --direction must be 'to_orbax' or 'to_hf', got {direction!r}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()
  out = convert(_DIRECTION.value, _SRC.value, _DST.value, dtype=_DTYPE.value,
                mesh=_mesh(_MESH.value), overwrite=_OVERWRITE.value, tokenizer=_TOKENIZER.value)
  logging.info("wrote %s", out)
  print(out)


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  flags.mark_flags_as_required(["direction", "src", "dst"])
  app.run(main)
