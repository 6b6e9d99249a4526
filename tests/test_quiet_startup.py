"""What a user sees on start-up: nothing from libtpu on a machine without a TPU.

The ``tpu`` extra installs libtpu for the planner (alignjax.aot); JAX would load it
as a backend and libtpu print "could not determine TPU accelerator type" and an
``INVALID_ARGUMENT`` line, and write log files into the temp directory. Checked in a
fresh interpreter without JAX_PLATFORMS, with TMPDIR pointing at an empty directory.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_import_alignjax_then_jax_prints_nothing_without_a_tpu(tmp_path):
  from jax._src import hardware_utils
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    pytest.skip("this machine has a TPU")
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_FORCE_TPU_INIT", "LIBTPU_INIT_ARGS")}
  env["TMPDIR"] = str(tmp_path)  # where libtpu's glog would write its tpu_driver.* files
  code = ("import jax, alignjax, jax.numpy as jnp\n"
          "from alignjax import aot\n"
          "print(jax.default_backend(), float(jax.jit(lambda x: 2 * x)(jnp.ones(())).item()))\n"
          "print(len(aot.get_topology('v5e:2x2', backend='tpu').devices))\n"
          "import os; print(os.environ.get('LIBTPU_INIT_ARGS'))\n")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  # LIBTPU_INIT_ARGS is back as it was: JAX hashes it into every compilation-cache key.
  assert out.stdout.split() == ["cpu", "2.0", "4", "None"]
  assert out.stderr == "", out.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # and writes no log files
