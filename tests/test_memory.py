"""alignjax.memory: peak device/host memory and XLA's compiled memory plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import memory


def _status_kb(key):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  raise KeyError(key)


def test_peak_memory_on_cpu_is_host_high_water_mark():
  before = memory.peak_memory()
  assert before.source == "host_rss" and before.per_device == ()
  block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB touched
  after = memory.peak_memory()
  assert after.bytes == _status_kb("VmHWM") * 1024
  assert after.bytes >= _status_kb("VmRSS") * 1024
  assert after.bytes >= before.bytes
  assert after.bytes >= block.nbytes
  del block


def test_compiled_memory_counts_arguments_outputs_and_aliases():
  x = jnp.ones((64, 128), jnp.float32)
  y = jnp.ones((128, 32), jnp.float32)
  compiled = jax.jit(lambda a, b: a @ b).lower(x, y).compile()
  m = memory.compiled_memory(compiled)
  assert m.argument == 4 * (64 * 128 + 128 * 32)
  assert m.output == 4 * 64 * 32
  assert m.alias == 0
  assert m.total == m.argument + m.output + m.temp + m.generated_code
  donated = jax.jit(lambda a: a * 2.0, donate_argnums=0).lower(x).compile()
  d = memory.compiled_memory(donated)
  assert d.argument == d.output == d.alias == 4 * 64 * 128
  assert d.total == d.argument + d.temp + d.generated_code


def test_compiled_memory_bad_input():
  with pytest.raises(TypeError, match="compiled_memory: `compiled`"):
    memory.compiled_memory(object())


def test_format_bytes():
  assert memory.format_bytes(512) == "512 B"
  assert memory.format_bytes(3 * 1024 ** 3) == "3.00 GiB"
  assert memory.format_bytes(None) == "n/a"
