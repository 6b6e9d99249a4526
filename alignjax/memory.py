"""Peak-memory figures for run logs: what the devices (or the host) held, and what XLA planned.

`peak_memory()` reads the backend's allocator statistics where it has them
(``device.memory_stats()``: TPU and GPU report ``peak_bytes_in_use``) and otherwise the
process's host high-water mark (``VmHWM`` in ``/proc/self/status``, the peak resident set
size; the CPU backend keeps its arrays in host memory). `compiled_memory(compiled)` reads
XLA's buffer assignment of one compiled program (``compiled.memory_analysis()``): the bytes
of its arguments, outputs and temporaries, the per-device figure a memory planner predicts.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax


class PeakMemory(NamedTuple):
  """Peak memory of this process.

  bytes: the largest peak over the local devices (``source="device"``) or the host
    resident-set high-water mark (``source="host_rss"``); None when neither is available.
  per_device: peak bytes per local device (empty for ``host_rss``).
  source: "device", "host_rss" or "unavailable".
  """
  bytes: int | None
  per_device: tuple[int, ...]
  source: str


class CompiledMemory(NamedTuple):
  """XLA's memory plan of one compiled program, per device, in bytes.

  total = argument + output + temp - alias (donated arguments that outputs reuse are
  counted once), plus the generated code.
  """
  argument: int
  output: int
  temp: int
  alias: int
  generated_code: int
  total: int


def host_peak_rss() -> int | None:
  """The process's peak resident set size in bytes (``VmHWM``), or None off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          value, unit = line.split()[1:3]
          return int(value) * {"kB": 1024, "mB": 1024 ** 2, "gB": 1024 ** 3}.get(unit, 1)
  except OSError:
    return None
  return None


def peak_memory(devices=None) -> PeakMemory:
  """Peak memory of the local devices, or the host's peak RSS where they keep no statistics.

  Args:
    devices: the devices to read (default: ``jax.local_devices()``).

  Returns:
    A `PeakMemory`. Device statistics come from ``device.memory_stats()``
    (``peak_bytes_in_use``, falling back to ``bytes_in_use``); the CPU backend returns no
    statistics, so its figure is the host's ``VmHWM``.
  """
  devices = jax.local_devices() if devices is None else list(devices)
  per_device = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # some backends raise instead of returning None
      stats = None
    if not stats:
      per_device = []
      break
    value = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    if value is None:
      per_device = []
      break
    per_device.append(int(value))
  if per_device:
    return PeakMemory(bytes=max(per_device), per_device=tuple(per_device), source="device")
  rss = host_peak_rss()
  if rss is not None:
    return PeakMemory(bytes=rss, per_device=(), source="host_rss")
  return PeakMemory(bytes=None, per_device=(), source="unavailable")


def compiled_memory(compiled) -> CompiledMemory:
  """XLA's per-device memory plan of ``compiled`` (a ``jax.stages.Compiled``).

  Args:
    compiled: e.g. ``jax.jit(step).lower(*args).compile()``.

  Returns:
    A `CompiledMemory` from ``compiled.memory_analysis()``.
  """
  analyse = getattr(compiled, "memory_analysis", None)
  if analyse is None:
    raise TypeError(f"compiled_memory: `compiled` must be a jax.stages.Compiled, got "
                    f"{type(compiled).__name__}.")
  stats = analyse()
  if isinstance(stats, (list, tuple)):  # older jax: one entry per program
    stats = stats[0]
  if stats is None:
    raise ValueError("compiled_memory: this backend gives no memory analysis for `compiled`.")
  arg = int(stats.argument_size_in_bytes)
  out = int(stats.output_size_in_bytes)
  temp = int(stats.temp_size_in_bytes)
  alias = int(stats.alias_size_in_bytes)
  code = int(getattr(stats, "generated_code_size_in_bytes", 0) or 0)
  return CompiledMemory(argument=arg, output=out, temp=temp, alias=alias, generated_code=code,
                        total=arg + out + temp - alias + code)


def format_bytes(n: int | None) -> str:
  """'1.23 GiB'-style text of a byte count ('n/a' for None)."""
  if n is None:
    return "n/a"
  value = float(n)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(value) < 1024 or unit == "TiB":
      return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
    value /= 1024
  return f"{n} B"


__all__ = ["CompiledMemory", "PeakMemory", "compiled_memory", "format_bytes", "host_peak_rss",
           "peak_memory"]
