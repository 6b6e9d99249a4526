"""The library loop over a device mesh: the same run as on one device, resumable,
and the same across two processes.

Reference: the single-device, single-process, uninterrupted run of the same config.
"""

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from alignjax.training import config as config_lib
from alignjax.training import loop
from alignjax.training import runtime as run_lib
from tests import launcher_zygote
from tests.conftest import coordinator_port, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "data.train_examples": 128, "data.eval_examples": 32, "model.hidden_size": 32,
    "model.intermediate_size": 64, "model.head_dim": 8, "model.num_heads": 4, "model.num_kv_heads": 2,
    "sft.steps": 4, "dpo.steps": 8, "batch_size": 8, "eval_batch_size": 16,
    "log_every": 4, "checkpoint_every": 100,  # checkpoints: the final one and the one written on preemption
}


def _cfg(**overrides):
  return config_lib.build(None, **{**BASE, **overrides})


def _close(got, want):
  for key, value in want["eval_after"].items():
    np.testing.assert_allclose(got["eval_after"][key], value, rtol=2e-4, atol=2e-5, err_msg=key)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  return loop.run(_cfg(), workdir=str(tmp_path_factory.mktemp("single")), handle_signals=False)


# The 2x2x2 mesh's run is the preempted-and-resumed one below (and the two processes' one).
@pytest.mark.parametrize("mesh", [(1, 2, 4)], ids=lambda m: "x".join(map(str, m)))
def test_sharded_run_matches_single_device(tmp_path, single, mesh):
  d, f, t = mesh
  got = loop.run(_cfg(**{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t}), workdir=str(tmp_path),
                 handle_signals=False)
  _close(got, single)
  np.testing.assert_allclose(got["eval_before"]["loss"], single["eval_before"]["loss"], rtol=1e-6)


def test_sharded_preempted_run_resumes_to_the_same_result(tmp_path, single, monkeypatch):
  cfg = _cfg(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  real = run_lib.PreemptionGuard.should_stop
  monkeypatch.setattr(run_lib.PreemptionGuard, "should_stop",
                      lambda self, step: int(signal.SIGTERM) if step == 7 else real(self, step))
  with pytest.raises(run_lib.Preempted):
    loop.run(cfg, workdir=str(tmp_path), handle_signals=False)
  monkeypatch.setattr(run_lib.PreemptionGuard, "should_stop", real)
  resumed = loop.run(cfg, workdir=str(tmp_path), handle_signals=False)
  assert resumed["resumed_from"] == 7
  _close(resumed, single)


def test_mesh_must_divide_the_batches():
  with pytest.raises(config_lib.ConfigError, match=r"config.batch_size \(8\) must be divisible by .* \(3\)"):
    _cfg(**{"mesh.data": 3})
  with pytest.raises(config_lib.ConfigError, match="config.mesh.tensor must be >= 1"):
    _cfg(**{"mesh.tensor": 0})


_WORKER = r"""
import os, sys, json
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.path.insert(0, sys.argv[5])
from tests import process_cache
process_cache.store_every_process()
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from alignjax.training import config as config_lib, loop
checked = []   # sizes of the values jax checked for equality across processes (barriers check a scalar)
_assert_equal = multihost_utils.assert_equal
def assert_equal(x, *args, **kwargs):
  checked.extend(int(np.size(leaf)) for leaf in jax.tree.leaves(x))
  return _assert_equal(x, *args, **kwargs)
multihost_utils.assert_equal = assert_equal
cfg = config_lib.build(None, **json.loads(sys.argv[3]))
result = loop.run(cfg, workdir=sys.argv[4], handle_signals=False)
if jax.process_index() == 0:
  with open(os.path.join(sys.argv[4], "result.json"), "w") as f:
    json.dump({"eval_after": result["eval_after"], "checked": checked}, f)
"""


def test_two_processes_train_like_one(tmp_path, single):
  port = coordinator_port(29531)
  overrides = {**BASE, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  env = subprocess_env()
  procs = [launcher_zygote.popen(
      [sys.executable, "-c", _WORKER, f"127.0.0.1:{port}", str(i), json.dumps(overrides), str(tmp_path), str(ROOT)],
      env=env, stderr_to_stdout=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  got = json.loads((tmp_path / "result.json").read_text())
  _close(got, single)
  # Weights, train states and the reference were placed shard by shard (sharding.put), never
  # allgathered from every process to check their equality: only the barriers' scalars were.
  assert got["checked"] and max(got["checked"]) == 1, got["checked"]
  # Only process 0 writes metrics: one row per logged step.
  rows = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [4, 8, 12]
