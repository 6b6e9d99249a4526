r"""HF directory <-> Orbax model checkpoint (``alignjax.training.checkpoint.convert``).

  python -m launch.convert --direction=to_orbax --src=hf/llama --dst=ckpt/llama
  python -m launch.convert --direction=to_hf --src=ckpt/llama --dst=hf/llama_out --dtype=bfloat16

``to_hf`` of a run (``--src`` its workdir or ``final_policy``) also copies the run's tokenizer
(or ``--tokenizer``). ``--mesh=data,fsdp,tensor`` shards the weights while converting (a model
larger than one device); ``--distributed`` on a multi-host slice.
"""

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignjax.training.checkpoint import convert  # noqa: E402

_DIRECTION = flags.DEFINE_enum("direction", None, ["to_orbax", "to_hf"], "Conversion direction.")
_SRC = flags.DEFINE_string("src", None, "Source directory (HF directory or Orbax checkpoint).")
_DST = flags.DEFINE_string("dst", None, "Destination directory (must not exist unless --overwrite).")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype of the output, e.g. float32 or bfloat16.")
_MESH = flags.DEFINE_string("mesh", None, "Optional mesh shape 'data,fsdp,tensor', e.g. '1,8,1'.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "to_hf: HF tokenizer directory to copy (default: the run's).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize()
  print(convert(_DIRECTION.value, _SRC.value, _DST.value, dtype=_DTYPE.value, mesh=_MESH.value or None,
                overwrite=_OVERWRITE.value, tokenizer=_TOKENIZER.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["direction", "src", "dst"])
  app.run(main)
