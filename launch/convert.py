r"""Converts model weights between Hugging Face directories and Orbax checkpoints.

  python -m launch.convert --direction=to_orbax --src=hf/llama --dst=ckpt/llama
  python -m launch.convert --direction=to_hf --src=ckpt/llama --dst=hf/llama_out \
      --dtype=bfloat16

``to_orbax`` reads a ``save_pretrained`` directory with ``models.from_hf`` and
writes an Orbax checkpoint holding the parameters and the ``ModelConfig`` (in
the checkpoint's ``model_config`` item); ``to_hf`` restores it with
``models.checkpoint_io.load_model`` and writes an HF directory with
``models.to_hf`` that ``transformers`` loads unchanged. ``--dtype`` sets the
stored parameter dtype of the output (default: unchanged).

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


def _mesh(spec):
  if not spec:
    return None
  from alignjax import sharding

  try:
    data, fsdp, tensor = (int(x) for x in spec.split(","))
  except ValueError:
    raise ValueError(f"--mesh must be three integers 'data,fsdp,tensor', got {spec!r}.") from None
  return sharding.make_mesh(data, fsdp, tensor)


def convert(direction: str, src: str, dst: str, *, dtype=None, mesh=None, overwrite=False) -> str:
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
    model = checkpoint_io.load_model(src, param_dtype=dtype, mesh=mesh)
    if overwrite and os.path.isdir(dst):
      import shutil

      shutil.rmtree(dst)
    models.to_hf(model, dst)
    return os.path.abspath(dst)
  raise ValueError(f"convert: --direction must be 'to_orbax' or 'to_hf', got {direction!r}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()
  out = convert(_DIRECTION.value, _SRC.value, _DST.value, dtype=_DTYPE.value,
                mesh=_mesh(_MESH.value), overwrite=_OVERWRITE.value)
  logging.info("wrote %s", out)
  print(out)


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  flags.mark_flags_as_required(["direction", "src", "dst"])
  app.run(main)
