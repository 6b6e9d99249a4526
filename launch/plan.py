r"""Plan a pod run from a laptop: compile alignjax's training step for a TPU topology.

  python launch/plan.py --model=llama3_70b --algorithm=dpo --topology=v5p:4x4x8 \
      --mesh=1,32,4 --batch_size=32 --prompt_len=512 --response_len=512 --remat=full
  python launch/plan.py --model=llama3_70b --topology=v5p:4x4x8 --search

Compiles ``alignjax.training.steps.make_train_step``'s step ahead of time (no weights, no
TPU: libtpu's compiler, ``pip install 'alignjax[tpu]'``) and prints per-device memory
(parameters, optimizer, frozen models, temporaries, peak vs HBM, fits or the shortfall),
FLOPs next to the (6+2·frozen)·N·T formula, and a roofline step time and tokens/s.
``--search`` compiles every data×fsdp×tensor mesh and remat policy and prints those that
fit, fastest first (results cached on disk; a re-run is instant). Without libtpu it falls
back to fake CPU devices (memory figures are then CPU figures).

Exit codes: 0 done; 1 a bug (traceback); 2 user error (one line on stderr).
"""

from __future__ import annotations

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

_MODEL = flags.DEFINE_string("model", "llama3_8b", "Model preset (alignjax.models.presets.PRESET_NAMES).")
_HF_CONFIG = flags.DEFINE_string("hf_config", None, "Path to an HF config.json (or its directory); overrides --model.")
_ALGORITHM = flags.DEFINE_string("algorithm", "dpo", "Algorithm name (alignjax.training.algorithms.names()).")
_REFERENCE = flags.DEFINE_enum("reference", "online", ["online", "precomputed", "free"],
                               "DPO-family reference mode (TDPO: online; AlignDistil: two teachers).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v4:2x2x2, v5e:16x16, v5p:4x4x4, v6e:8x8.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice).")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor (default: all devices on fsdp).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch of preference pairs per step.")
_PROMPT = flags.DEFINE_integer("prompt_len", 512, "Padded prompt length.")
_RESPONSE = flags.DEFINE_integer("response_len", 512, "Padded response length.")
_REMAT = flags.DEFINE_string("remat", None, "Remat policy (none, full, dots, dots_no_batch, save_attention_out).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "Master parameter dtype.")
_FROZEN_DTYPE = flags.DEFINE_string("frozen_dtype", "bfloat16", "Frozen reference/teacher parameter dtype.")
_GRAD_ACCUM = flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step.")
_SEARCH = flags.DEFINE_bool("search", False, "Search meshes × remat policies; print those that fit, fastest first.")
_SAMPLER = flags.DEFINE_bool("sampler", False, "Also compile the sampler's program (prefill + decode loop) on the mesh.")
_COMPILE = flags.DEFINE_bool("compile", True, "--nocompile: per-device lower bound (params+optimizer+frozen+batch) only, instant.")
_TOP = flags.DEFINE_integer("top", 10, "Rows of the --search table.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Search cache (default $ALIGNJAX_AOT_CACHE or ~/.cache/alignjax/aot).")
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "cpu"], "tpu (libtpu), cpu (fake devices) or auto.")


def main(argv):
  del argv
  from alignjax import aot  # noqa: PLC0415

  try:
    exp = aot.Experiment(algorithm=_ALGORITHM.value, model=_MODEL.value, hf_config=_HF_CONFIG.value,
                         batch_size=_BATCH.value, prompt_len=_PROMPT.value, response_len=_RESPONSE.value,
                         reference=_REFERENCE.value, dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value,
                         frozen_dtype=_FROZEN_DTYPE.value, remat=_REMAT.value, grad_accum=_GRAD_ACCUM.value)
    cfg = exp.model_config()
    topo = aot.get_topology(_TOPOLOGY.value, num_slices=_NUM_SLICES.value, backend=_BACKEND.value)
    mesh = None
    if _MESH.value:
      parts = _MESH.value.split(",")
      if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"plan: --mesh must be data,fsdp,tensor (three positive ints), got {_MESH.value!r}.")
      mesh = aot.check_mesh([int(p) for p in parts], topo, exp)
  except (ValueError, TypeError) as e:
    print(f"plan: {e}", file=sys.stderr)
    return 2

  print(f"{exp.algorithm} | {cfg.family} {cfg.num_params / 1e9:.2f}B params | batch {exp.batch_size} x "
        f"({exp.prompt_len}+{exp.response_len}) | {topo.name} x{topo.num_slices}: {topo.num_devices} "
        f"{topo.backend} devices ({topo.chip.name}: {topo.chip.hbm_gib} GiB HBM, "
        f"{topo.chip.bf16_tflops} bf16 TFLOP/s, {topo.chip.hbm_gbps} GB/s per chip)")
  if topo.backend == "cpu":
    print("NOTE: libtpu is not installed: compiled for fake CPU devices; memory figures are CPU figures.")
  if _SEARCH.value:
    try:
      remats = None if _REMAT.value is None else [_REMAT.value]
      meshes = None if mesh is None else [mesh]

      def progress(r):
        status = "fits" if r.fits else ("skipped" if not r.compiled else "does not fit")
        print(f"  mesh {','.join(map(str, r.mesh)):>9} remat {r.remat:<18} peak {r.peak_bytes / aot.GiB:8.2f} GiB  {status}",
              flush=True)
      results = aot.search(exp, topo, remats=remats, meshes=meshes, cache_dir=_CACHE_DIR.value, progress=progress)
    except (ValueError, TypeError) as e:
      print(f"plan: {e}", file=sys.stderr)
      return 2
    if not results:
      print("No configuration fits: add chips, shorten sequences, or shrink the batch.")
      return 0
    print(aot.format_table(results[:_TOP.value]))
    print()
    print(aot.describe(results[0]))
  else:
    if mesh is None:
      mesh = (1, topo.num_devices, 1)
    try:
      result = aot.plan(exp, topo, mesh, compile=_COMPILE.value)
    except (ValueError, TypeError) as e:
      print(f"plan: {e}", file=sys.stderr)
      return 2
    print(aot.format_table([result]))
    print()
    print(aot.describe(result))
    if _SAMPLER.value:
      print()
      print(aot.describe(aot.plan_sampler(exp, topo, mesh)))
  print()
  print(aot.chip_table())
  return 0


def _entry(argv):
  sys.exit(main(argv))


if __name__ == "__main__":
  app.run(_entry)
