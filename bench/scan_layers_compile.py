r"""Compile time and HLO size of a DPO training step vs depth, scanned vs per-layer blocks.

  python bench/scan_layers_compile.py                      # llama_tiny widths, 2 and 32 layers
  python bench/scan_layers_compile.py --layers=2,32,80 --backend=tpu   # libtpu's compiler

Plans (``alignjax.aot.plan``) a DPO step with an online reference on a v5e:2x2 topology
(the CPU fallback compiles for 4 fake CPU devices; ``--backend=tpu`` uses libtpu's compiler
for the abstract topology when installed), remat "full", for each depth with
``ModelConfig.scan_layers`` on and off, and prints the compile seconds, the lowered HLO
size and the planned per-device peak. With scanned layers the figures should be flat in
depth (MaxText's reason for ``scan_layers``); without, they grow with it. The peer is the
same step without the scan. Figures depend on the machine and its load.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import time  # noqa: E402

from absl import app, flags  # noqa: E402

_LAYERS = flags.DEFINE_string("layers", "2,32", "Comma-separated depths.")
_BACKEND = flags.DEFINE_string("backend", "cpu", "cpu | tpu | auto (aot.get_topology).")
_REMAT = flags.DEFINE_string("remat", "full", "ModelConfig.remat.")
_UNSCANNED = flags.DEFINE_bool("unscanned", True, "Also compile the per-layer model (the peer).")


def main(argv):
  del argv
  from alignjax import aot
  from alignjax.models import ModelConfig
  topo = aot.get_topology("v5e:2x2", backend=_BACKEND.value)
  print(f"backend={topo.backend} devices={topo.num_devices} remat={_REMAT.value}")
  print(f"{'layers':>6} {'scan':>5} {'lower_s':>8} {'compile_s':>9} {'hlo_chars':>10} {'peak_MiB':>9}")
  for depth in [int(x) for x in _LAYERS.value.split(",")]:
    for scan in (True, False) if _UNSCANNED.value else (True,):
      exp = aot.Experiment(algorithm="dpo", model=ModelConfig.llama_tiny(num_layers=depth, scan_layers=scan),
                           batch_size=8, prompt_len=16, response_len=16, dtype="float32",
                           frozen_dtype="float32")
      built = aot.build_step(exp, topo, (1, 4, 1), remat=_REMAT.value)
      t0 = time.perf_counter()
      lowered = built.step.lower(*built.args)
      t1 = time.perf_counter()
      hlo = len(lowered.as_text())
      compiled = lowered.compile()
      t2 = time.perf_counter()
      mem = compiled.memory_analysis()
      peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes) / 2 ** 20
      print(f"{depth:>6} {str(scan):>5} {t1 - t0:>8.2f} {t2 - t1:>9.2f} {hlo:>10} {peak:>9.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
