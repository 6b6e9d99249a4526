"""The suite's own machinery: pruning the persistent compilation cache, XLA_FLAGS, the launcher zygote.

Reference: files with access times set by ``os.utime``; the survivors are worked out
by hand from those times and sizes, not by the pruning code. The zygote's children are
compared with the same commands run as real subprocesses.
"""

import os

import pytest

from tests import conftest


def _files(path, spec):
  for name, (atime, size) in spec.items():
    file = path / name
    file.write_bytes(b"x" * size)
    os.utime(file, (atime, atime))


def test_prune_deletes_least_recently_read_files_down_to_three_quarters(tmp_path):
  # 10 files of 100 bytes (1000 in all), read at times 1..10; a 900-byte bound: delete the
  # oldest until at most 675 bytes remain -> the four oldest go (600 remain).
  _files(tmp_path, {f"entry{t:02d}-cache": (1_000_000 + t, 100) for t in range(1, 11)})
  assert conftest.prune_compilation_cache(str(tmp_path), max_bytes=900) == 400
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"entry{t:02d}-cache" for t in range(5, 11)]


def test_prune_leaves_a_cache_within_its_bound_and_a_missing_one_alone(tmp_path):
  _files(tmp_path, {"a-cache": (1_000_000, 300), "b-cache": (2_000_000, 300)})
  assert conftest.prune_compilation_cache(str(tmp_path), max_bytes=600) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a-cache", "b-cache"]
  assert conftest.prune_compilation_cache(str(tmp_path / "absent"), max_bytes=1) == 0


def test_xla_flags_keep_the_callers_and_add_the_compile_flags_and_devices_once():
  got = conftest.xla_flags(4, "--xla_backend_optimization_level=2 --xla_dump_to=/tmp/x").split()
  assert got[:2] == ["--xla_backend_optimization_level=2", "--xla_dump_to=/tmp/x"]  # the caller's win
  assert "--xla_force_host_platform_device_count=4" in got
  names = [f.split("=")[0] for f in got]
  assert len(names) == len(set(names))
  assert set(conftest.FAST_COMPILE_XLA_FLAGS) - {"--xla_backend_optimization_level=1"} <= set(got)
  assert conftest.xla_flags(2, "--xla_force_host_platform_device_count=8").split().count(
      "--xla_force_host_platform_device_count=8") == 1
  assert "device_count" not in conftest.subprocess_env()["XLA_FLAGS"]


def test_two_process_workers_store_process_1s_programs_too(monkeypatch):
  # JAX's own _cache_write stores nothing for process 1 (tests/process_cache.py); with the
  # hook it hands process 1's executable to the cache's put, as process 0's. A JAX that
  # renamed either function fails here rather than making the two-process tests slow.
  from jax._src import compilation_cache, compiler, distributed  # pylint: disable=import-outside-toplevel
  from tests import process_cache  # pylint: disable=import-outside-toplevel
  stored = []
  monkeypatch.setattr(compilation_cache, "put_executable_and_time", lambda *args: stored.append(args))
  monkeypatch.setattr(compilation_cache, "is_cache_used", lambda backend: True)
  monkeypatch.setattr(distributed.global_state, "process_id", 1)
  monkeypatch.setattr(compiler, "_cache_write", compiler._cache_write)  # restored after the test
  args = ("key", 1e6, "jit_step", "backend", "executable", [])
  compiler._cache_write(*args)
  assert not stored  # JAX alone: process 1 writes nothing
  assert process_cache.store_every_process()
  compiler._cache_write(*args)
  assert stored == [("key", "jit_step", "executable", "backend", 1_000_000)]
  compiler._cache_write("key2", 1e6, "jit_cb", "backend", "executable", ["host callback"])
  assert len(stored) == 1  # host callbacks: JAX's rule (never stored) still applies


_PROBE = """
import atexit, json, os, sys, threading, time
devices = __import__("jax").device_count() if sys.argv[1] == "3" else None  # a real process importing JAX: ~2 s
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "probe": os.environ.get("PROBE"),
                  "devices": devices, "name": __name__}))
atexit.register(print, "atexit ran")  # after the thread: the interpreter joins threads first
threading.Thread(target=lambda: (time.sleep(0.05), print("thread done"))).start()
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
  raise ValueError("boom")
if sys.argv[1] == "wait":
  print("waiting", flush=True)
  time.sleep(120)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.skipif(os.environ.get("ALIGNJAX_TEST_ZYGOTE") == "0", reason="ALIGNJAX_TEST_ZYGOTE=0: no zygote")
def test_launcher_zygote_children_behave_like_subprocesses(tmp_path):
  # Reference: the same commands as real subprocesses. The forked child takes the request's
  # argv, cwd, sys.path[0], environment (XLA_FLAGS too: 3 fake devices, not the zygote's) and
  # exit code; an uncaught exception prints its traceback and exits 1; threads are joined and
  # exit handlers run before it exits (without the modules' teardown); signals reach it.
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from tests import launcher_zygote  # pylint: disable=import-outside-toplevel
  (tmp_path / "probe_mod.py").write_text(_PROBE)
  env = dict(conftest.subprocess_env(JAX_PLATFORMS="cpu", PROBE="yes", PYTHONPATH=str(conftest.ROOT)),
             XLA_FLAGS=conftest.xla_flags(3))
  outs = []
  for args in (["-m", "probe_mod", "3"], [str(tmp_path / "probe_mod.py"), "0"], ["-c", _PROBE, "4"],
               ["-m", "probe_mod", "raise"]):
    want = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    proc = launcher_zygote.popen([sys.executable, *args], cwd=tmp_path, env=env)
    assert isinstance(proc, launcher_zygote.Process), f"the suite fell back to subprocesses: {launcher_zygote.disabled}"
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out) == (want.returncode, want.stdout)
    assert err.splitlines()[-1] == want.stderr.splitlines()[-1]
    outs.append(out)
  assert '"devices": 3' in outs[0] and '"probe": "yes"' in out and out.endswith("thread done\natexit ran\n")
  assert "ValueError: boom" in err
  merged = launcher_zygote.popen([sys.executable, "-m", "probe_mod", "5"], cwd=tmp_path, env=env, stderr_to_stdout=True)
  out, err = merged.communicate(timeout=120)
  assert merged.returncode == 5 and err is None and "to stderr" in out.splitlines() and '"probe": "yes"' in out
  proc = launcher_zygote.popen([sys.executable, "-m", "probe_mod", "wait"], cwd=tmp_path, env=env)
  while "waiting" not in proc.stdout.read():
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.05)
  assert proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == -signal.SIGTERM
