"""The suite's own machinery in tests/conftest.py: pruning the persistent compilation cache, XLA_FLAGS.

Reference: files with access times set by ``os.utime``; the survivors are worked out
by hand from those times and sizes, not by the pruning code.
"""

import os

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
