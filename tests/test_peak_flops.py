"""The MFU denominator: a datasheet peak on known accelerators, else one measured matmul per process."""

import io
import types

import jax
import numpy as np

from alignjax.training import runtime as run_lib


def test_cpu_peak_is_measured_once_and_named_in_the_progress_line(monkeypatch):
  peak = run_lib.peak_flops("float32")
  assert isinstance(peak, run_lib.PeakFlops) and peak.source == "measured float32"
  assert np.isfinite(peak) and 1e8 < peak < 1e15  # between a slow core and an accelerator
  monkeypatch.setattr(run_lib.time, "perf_counter", lambda: (_ for _ in ()).throw(AssertionError("re-measured")))
  assert run_lib.peak_flops("float32") is peak  # cached per process

  monkeypatch.undo()
  out = io.StringIO()
  progress = run_lib.Progress(4, stream=out, interactive=False)
  progress.set_peak_flops(peak)
  progress.step(1, tokens=10, flops=1e6)
  progress.log(1, "dpo", {"loss": 0.5}, progress.stats(1))
  assert "MFU" in out.getvalue() and "of measured float32 peak" in out.getvalue()


def test_known_accelerator_uses_its_published_dense_peak(monkeypatch):
  fake = types.SimpleNamespace(device_kind="NVIDIA H200", platform="gpu")
  monkeypatch.setattr(jax, "local_devices", lambda: [fake, fake])
  monkeypatch.setattr(jax, "local_device_count", lambda: 2)
  bf16 = run_lib.peak_flops("bfloat16")
  assert float(bf16) == 2 * 989e12 and bf16.source == "H200 bfloat16 datasheet"  # NVIDIA H200 datasheet
  assert float(run_lib.peak_flops("float16")) == 2 * 989e12  # same tensor-core rate as bfloat16
  assert float(run_lib.peak_flops("float32")) == 2 * 67e12 and float(run_lib.peak_flops("float64")) == 2 * 67e12
  fake.device_kind = "TPU v5 lite"
  assert float(run_lib.peak_flops("bfloat16")) == 2 * 197e12  # Cloud TPU v5e docs, not v5p's 459


def test_a_step_faster_than_the_measured_peak_measures_it_again(monkeypatch):
  """A peak measured on a busy machine (here: a tiny fake one) is measured again, and only ever raised."""
  low = run_lib.PeakFlops(1e3, "measured float32")
  monkeypatch.setitem(run_lib._measured, (jax.local_devices()[0].device_kind, "float32"), low)
  progress = run_lib.Progress(4, stream=io.StringIO(), interactive=False)
  progress.set_peak_flops(low)
  progress.step(1, tokens=10, flops=1e6)
  import time
  time.sleep(0.01)  # at most 1e8 FLOP/s: above the fake peak, far below any real one
  stats = progress.stats(1)
  assert float(progress._peak) > 1e8 and stats["mfu"] < 1  # pylint: disable=protected-access
  assert run_lib.peak_flops("float32") is progress._peak  # pylint: disable=protected-access
