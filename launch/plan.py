r"""Plan a pod run from a laptop: compile alignjax's training step for a TPU topology (``alignjax.aot.report``).

  python launch/plan.py --model=llama3_70b --algorithm=dpo --topology=v5p:4x4x8 \
      --mesh=1,32,4 --batch_size=32 --prompt_len=512 --response_len=512 --remat=full
  python launch/plan.py --model=llama3_70b --topology=v5p:4x4x8 --search

No weights, no TPU (libtpu's compiler; else fake CPU devices): per-device memory vs HBM, FLOPs,
roofline step time; ``--search`` tries every mesh and remat policy. Exit codes: 0; 1 a bug; 2 user error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Plan on the host CPU; libtpu only compiles. Without libtpu, fake one CPU device per chip.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if importlib.util.find_spec("libtpu") is None and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  _topo = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--topology=")), "v5e:2x2")
  _slices = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--num_slices=")), "1")
  _m = re.fullmatch(r"v[0-9a-z]+:([0-9x]+)", _topo)
  if _m and _slices.isdigit():
    _n = int(_slices) * int(eval("*".join(_m.group(1).split("x")) or "1"))  # noqa: S307 (digits only)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}").strip()

from absl import app, flags  # noqa: E402

flags.DEFINE_string("model", "llama3_8b", "Model preset (alignjax.models.presets.PRESET_NAMES).")
flags.DEFINE_string("hf_config", None, "Path to an HF config.json (or its directory); overrides --model.")
flags.DEFINE_string("algorithm", "dpo", "Algorithm name (alignjax.training.algorithms.names()).")
flags.DEFINE_enum("reference", "online", ["online", "precomputed", "free"],
                  "DPO-family reference mode (TDPO: online; AlignDistil: two teachers).")
flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v4:2x2x2, v5e:16x16, v5p:4x4x4, v6e:8x8.")
flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice).")
flags.DEFINE_string("mesh", None, "data,fsdp,tensor (default: all devices on fsdp).")
flags.DEFINE_integer("batch_size", 32, "Global batch of preference pairs per step.")
flags.DEFINE_integer("prompt_len", 512, "Padded prompt length.")
flags.DEFINE_integer("response_len", 512, "Padded response length.")
flags.DEFINE_string("remat", None, "Remat policy (none, full, dots, dots_no_batch, save_attention_out).")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_string("param_dtype", "float32", "Master parameter dtype.")
flags.DEFINE_string("frozen_dtype", "bfloat16", "Frozen reference/teacher parameter dtype.")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step.")
flags.DEFINE_bool("search", False, "Search meshes × remat policies; print those that fit, fastest first.")
flags.DEFINE_bool("sampler", False, "Also compile the sampler's program (prefill + decode loop) on the mesh.")
flags.DEFINE_bool("compile", True, "--nocompile: per-device lower bound (params+optimizer+frozen+batch) only, instant.")
flags.DEFINE_integer("top", 10, "Rows of the --search table.")
flags.DEFINE_string("cache_dir", None, "Search cache (default $ALIGNJAX_AOT_CACHE or ~/.cache/alignjax/aot).")
flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "cpu"], "tpu (libtpu), cpu (fake devices) or auto.")
flags.DEFINE_boolean("scan_layers", None, "Plan with the blocks under nnx.scan: a deep model compiles in the time of a "
                     "shallow one (XLA's cost analysis then counts one layer's FLOPs).")
flags.DEFINE_string("emit_config", None, "Write the chosen plan as a config file that launch/train.py --config=PATH runs.")


def main(argv):
  del argv
  from alignjax import aot  # noqa: PLC0415
  f = flags.FLAGS
  try:  # every flag named like an aot.Experiment field (algorithm, model, batch_size, ...) sets it
    exp = aot.Experiment(**{x.name: f[x.name].value for x in dataclasses.fields(aot.Experiment) if x.name in f})
    topo = aot.get_topology(f.topology, num_slices=f.num_slices, backend=f.backend)
    aot.report(exp, topo, f.mesh, search_meshes=f.search, remat=f.remat, compile=f.compile, sampler=f.sampler,
               cache_dir=f.cache_dir, top=f.top, emit=lambda line: print(line, flush=True), emit_config=f.emit_config)
  except (ValueError, TypeError) as e:
    print(f"plan: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
