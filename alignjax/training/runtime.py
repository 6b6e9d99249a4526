"""Run plumbing shared by every launcher: workdir lock, run identity, metrics, progress, preemption.

* :class:`WorkdirLock` -- an OS (``fcntl``) lock on ``<workdir>/.lock``, released
  by the OS on any exit; a second launcher is refused naming the holder's PID.
* :func:`read_record` / :func:`write_record` -- the run's identity (its config
  minus the resumable fields) and budget history, stored next to the checkpoints.
* :class:`MetricsWriter` -- ``metrics.jsonl`` (exactly one row per logged step
  across resumes: rows past the restored step are dropped on :meth:`~MetricsWriter.open`)
  plus TensorBoard event files (tensorboardX, purged past the restored step).
  Only process 0 writes (:func:`metrics_writer`).
* :class:`Progress` -- steps/s, tokens/s, an MFU estimate and ETA; a tqdm bar
  when stderr is a terminal, plain log lines otherwise.
* :class:`PreemptionGuard` -- SIGTERM/SIGINT set a flag; the loop finishes the
  current step, checkpoints and raises :class:`Preempted`. A second Ctrl-C
  interrupts at once. Under ``jax.distributed`` all processes agree on the stop.
* :func:`enable_compilation_cache` -- JAX's persistent compilation cache (every
  launcher's ``--compilation_cache``): a resumed run, a rerun and the runs of a
  sweep that share a program (steps take their float hyper-parameters as inputs)
  load it instead of compiling it again.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping, Optional

import numpy as np

__all__ = [
    "EXIT_USER_ERROR", "EXIT_TRAINING_FAILED", "MetricsWriter", "NullWriter", "Preempted",
    "PreemptionGuard", "Progress", "RunLockedError", "TrainingFailed", "WorkdirLock",
    "default_compilation_cache", "enable_compilation_cache", "metrics_writer", "peak_flops", "read_record",
    "write_record",
]

EXIT_USER_ERROR = 2        # bad config, identity mismatch, locked workdir
EXIT_TRAINING_FAILED = 3   # non-finite loss/gradients/parameters, or divergence
# Preempted runs (SIGTERM/SIGINT) exit with 128 + signal number (143 / 130)
# after writing a checkpoint: re-running the same command resumes.


class RunLockedError(RuntimeError):
  """The workdir is locked by another live process."""


class TrainingFailed(RuntimeError):
  """Training stopped: non-finite values or divergence (nothing bad was saved)."""

  def __init__(self, message: str, *, step: int):
    super().__init__(message)
    self.step = step


class Preempted(Exception):
  """A SIGTERM/SIGINT stopped the run after checkpointing ``step``."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"{signal.Signals(signum).name} at step {step}")
    self.signum, self.step = signum, step

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


# ----------------------------------------------------------------------------- lock

class WorkdirLock:
  """An exclusive ``fcntl`` lock on ``<workdir>/.lock`` holding the owner's PID."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._file = None

  def acquire(self) -> "WorkdirLock":
    import fcntl  # pylint: disable=import-outside-toplevel
    f = open(self.path, "a+")
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise RunLockedError(
          f"workdir {os.path.dirname(self.path)} is in use by process {holder} "
          f"(lock {self.path}); wait for it to finish or use another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      import fcntl  # pylint: disable=import-outside-toplevel
      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ----------------------------------------------------------------------------- identity

RECORD = "run.json"


def read_record(checkpoint_dir: str) -> Optional[dict]:
  """The stored run record (identity, budget, history) or ``None``."""
  path = os.path.join(checkpoint_dir, RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_record(checkpoint_dir: str, record: Mapping[str, Any]) -> None:
  """Atomically writes the run record (process 0 only)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return
  os.makedirs(checkpoint_dir, exist_ok=True)
  path = os.path.join(checkpoint_dir, RECORD)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- metrics

class NullWriter:
  """Writes nothing (processes other than 0)."""

  def open(self, start_step: int) -> None:
    del start_step

  def write(self, step: int, scalars: Mapping[str, float], *, phase: str | None = None) -> None:
    del step, scalars, phase

  def close(self) -> None:
    pass


def _summary_writer_class():
  """tensorboardX's ``SummaryWriter`` without importing torch (about 4 s) when torch is not loaded yet.

  tensorboardX imports torch when it is installed (for graph export, unused
  here); torch is hidden during that import unless the process already has it.
  """
  import sys  # pylint: disable=import-outside-toplevel
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None   # `import torch` raises ImportError while tensorboardX loads
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter(NullWriter):
  """``<workdir>/metrics.jsonl`` + TensorBoard events under ``<workdir>/tensorboard``.

  :meth:`open` must be called with the step training resumes from: rows of
  later steps (written before a crash or preemption) are dropped, so after any
  number of resumes there is exactly one row per logged step.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, "metrics.jsonl")
    self._tensorboard = tensorboard
    self._file = None
    self._tb = None

  def open(self, start_step: int) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    rows: dict[int, str] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut short by a crash
          if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start_step:
            rows[row["step"]] = json.dumps(row)
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(rows[s] + "\n" for s in sorted(rows))
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    if self._tensorboard:
      SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
      self._tb = SummaryWriter(
          os.path.join(self.workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, scalars: Mapping[str, float], *, phase: str | None = None) -> None:
    row = {"step": int(step)}
    if phase is not None:
      row["phase"] = phase
    row.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      prefix = f"{phase}/" if phase else ""
      for k, v in scalars.items():
        self._tb.add_scalar(prefix + k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def metrics_writer(workdir: str, **kwargs) -> NullWriter:
  """A :class:`MetricsWriter` on process 0, a :class:`NullWriter` elsewhere."""
  import jax  # pylint: disable=import-outside-toplevel
  return MetricsWriter(workdir, **kwargs) if jax.process_index() == 0 else NullWriter()


# ----------------------------------------------------------------- compilation cache

def default_compilation_cache() -> str:
  """``$XDG_CACHE_HOME/alignjax/jax_compilation_cache`` (default ``~/.cache``), beside the real-checkpoint assets."""
  import alignjax  # pylint: disable=import-outside-toplevel
  return alignjax.cache_dir("jax_compilation_cache")


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
  """Turns on JAX's persistent compilation cache at ``path``; returns its directory, or None when off.

  ``path`` None: ``$JAX_COMPILATION_CACHE_DIR`` (JAX's own setting) when set, else
  :func:`default_compilation_cache`; nothing changes when the cache was turned off
  (``JAX_ENABLE_COMPILATION_CACHE=false``). ``""``: off. Every program is stored:
  ``jax_persistent_cache_min_compile_time_secs`` is set to 0 unless
  ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` sets it. JAX's default of 1 s left
  out the eval steps and optimizer inits of small models, which a study or a rerun
  then compiled again every run. Entries are keyed by the program, the jax/jaxlib
  version, the backend and the XLA flags, so a stale or foreign entry is never
  used. Like MaxText's ``jax_cache_dir``; the directory is not pruned (delete it to
  reclaim space). Call it before the first compile.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if path is None:
    if not jax.config.jax_enable_compilation_cache:
      return None
    path = jax.config.jax_compilation_cache_dir or default_compilation_cache()
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"compilation_cache: cannot create the directory {path!r} ({e.strerror}).") from None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


# ----------------------------------------------------------------------------- progress

# Dense peak FLOP/s per device by `device_kind` (vendor datasheets).
_PEAK = {
    "H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12},
    "B200": {"bfloat16": 2250e12, "float32": 80e12}, "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 4}, "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12 / 4}, "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12 / 4},
}
_measured: dict[tuple[str, str], "PeakFlops"] = {}


class PeakFlops(float):
  """A peak FLOP/s figure that says where it comes from (``source``: "H200 bfloat16 datasheet", "measured float32")."""

  source: str = ""

  def __new__(cls, value: float, source: str):
    out = super().__new__(cls, value)
    out.source = source
    return out


def peak_flops(dtype: str = "float32", *, remeasure: bool = False) -> PeakFlops:
  """Peak FLOP/s of all local devices: the accelerator's datasheet figure, else a measured matmul.

  GPUs/TPUs in ``_PEAK``: the published dense figure for ``dtype`` times the
  local device count. Otherwise (CPU, other accelerators) the best of a few
  ``n x n`` matmuls in ``dtype`` on the first device, measured once per process
  (CPU: fake devices share the host's cores, so the figure is the host's).
  ``remeasure``: measure again and keep the larger figure (a machine busy at the
  first measurement understates its peak; :class:`Progress` asks for this when a
  step runs faster than the measured peak).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  dev = jax.local_devices()[0]
  kind = getattr(dev, "device_kind", "") or ""
  count = 1 if dev.platform == "cpu" else jax.local_device_count()
  for name, peaks in _PEAK.items():
    if name.lower() in kind.lower():
      d = {"float16": "bfloat16"}.get(dtype, dtype)  # same tensor-core rate
      d = d if d in peaks else "float32"
      return PeakFlops(peaks[d] * count, f"{name} {d} datasheet")
  if (kind, dtype) not in _measured or remeasure:
    n = 1024 if dev.platform == "cpu" else 8192
    a = jax.device_put(jnp.ones((n, n), dtype), dev)
    jnp.dot(a, a).block_until_ready()  # compile, warm up
    best, t_end = float("inf"), time.perf_counter() + 0.1
    while time.perf_counter() < t_end or best == float("inf"):
      t0 = time.perf_counter()
      jnp.dot(a, a).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    value = max(2 * n ** 3 / best * count, float(_measured.get((kind, dtype), 0.0)))
    _measured[(kind, dtype)] = PeakFlops(value, f"measured {dtype}")
  return _measured[(kind, dtype)]


def _hms(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
  """Reports speed and ETA: a tqdm bar when ``stream`` is a terminal, else plain lines.

  Args:
    total: the run's last step.
    start: the step training starts from.
    stream: where lines go (default ``sys.stdout``).
    interactive: force the bar on/off (default: ``stream.isatty()``).
    enabled: ``False`` prints nothing (processes other than 0).
  """

  def __init__(self, total: int, start: int = 0, *, stream=None, interactive: Optional[bool] = None,
               enabled: bool = True):
    self.total, self.start = total, start
    self.stream = sys.stdout if stream is None else stream
    self.enabled = enabled
    isatty = getattr(self.stream, "isatty", lambda: False)()
    self.interactive = isatty if interactive is None else interactive
    self._bar = None
    self._t0 = time.perf_counter()
    self._last_t, self._last_step, self._tokens, self._flops = self._t0, start, 0.0, 0.0
    self._peak = None

  def set_peak_flops(self, value: float) -> None:
    """The peak behind the MFU figure (a :class:`PeakFlops` names its source in the progress line)."""
    self._peak = value

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, file=self.stream, flush=True)

  def step(self, step: int, *, tokens: float, flops: float) -> None:
    """Counts one finished step (``step`` = steps done) of ``tokens`` and ``flops``."""
    self._tokens += tokens
    self._flops += flops
    if self.enabled and self.interactive:
      if self._bar is None:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        self._bar = tqdm(total=self.total, initial=self.start, file=self.stream, dynamic_ncols=True)
      self._bar.update(step - self._bar.n)

  def stats(self, step: int) -> dict[str, float]:
    """Speed since the previous call: steps/s, tokens/s, MFU and ETA (seconds)."""
    now = time.perf_counter()
    dt = max(now - self._last_t, 1e-9)
    steps_s = (step - self._last_step) / dt
    out = {"steps_per_s": steps_s, "tokens_per_s": self._tokens / dt}
    if self._peak:
      out["mfu"] = self._flops / dt / self._peak
      source = getattr(self._peak, "source", "")
      if out["mfu"] > 1 and source.startswith("measured "):   # measured while the machine was busy: again
        self._peak = peak_flops(source.split()[-1], remeasure=True)
        out["mfu"] = self._flops / dt / self._peak
    out["eta_s"] = (self.total - step) / steps_s if steps_s > 0 else float("inf")
    self._last_t, self._last_step, self._tokens, self._flops = now, step, 0.0, 0.0
    return out

  def log(self, step: int, phase: str, scalars: Mapping[str, float], stats: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    speed = f"{stats['steps_per_s']:.1f} steps/s {stats['tokens_per_s']:,.0f} tok/s"
    if "mfu" in stats:
      source = getattr(self._peak, "source", "")
      speed += f" MFU {100 * stats['mfu']:.2f}%" + (f" of {source} peak" if source else "")
    speed += f" ETA {_hms(stats['eta_s'])}"
    text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    if self._bar is not None:
      self._bar.set_postfix_str(f"{phase} loss={scalars.get('loss', float('nan')):.4g}", refresh=False)
    self.message(f"[{phase} {step}/{self.total}] {text} | {speed}")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


# ----------------------------------------------------------------------------- preemption

class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a stop request checked between steps.

  Installed only in the main thread (elsewhere it is inert); previous handlers
  are restored on exit. A second SIGINT raises ``KeyboardInterrupt`` at once.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self.signum: Optional[int] = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self):
    if self.enabled:
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()

  def should_stop(self, step: int) -> Optional[int]:
    """The signal to stop for (agreed by all processes), or ``None``."""
    import jax  # pylint: disable=import-outside-toplevel
    local = self.signum or 0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          local = local or int(signal.SIGTERM)
      except Exception:  # pylint: disable=broad-except  # no preemption service configured
        pass
      local = int(np.max(multihost_utils.process_allgather(np.int32(local))))
    return local or None
