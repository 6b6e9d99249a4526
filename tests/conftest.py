"""Shared test configuration: CPU JAX with 8 fake devices, repo root importable, mask helpers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


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
