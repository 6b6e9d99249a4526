"""Two real processes (jax.distributed, gloo CPU collectives) load one sharded HF model.

Each process has 4 fake CPU devices; the mesh (data=1, fsdp=2, tensor=4) spans
all 8. ``tests/multihost_worker.py`` runs ``models.from_hf(path, mesh=mesh)``
in both processes and writes the logits gathered with
``multihost_utils.process_allgather``. The reference is transformers' torch
model on the same directory (and the single-process alignjax model).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests import hf_fixtures
from tests.conftest import ROOT, coordinator_port, subprocess_env

WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


def _run_two_processes(hf_dir, out_dir, timeout=120):
  port = coordinator_port(29431)
  env = {k: v for k, v in subprocess_env().items() if k != "JAX_PLATFORMS"}
  procs = [
      subprocess.Popen([sys.executable, WORKER, str(i), str(port), hf_dir, out_dir], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return [p.returncode for p in procs], outputs


def test_two_processes_load_sharded_model_and_match_transformers(tmp_path):
  hf_dir = hf_fixtures.make_tiny_hf(
      "llama", str(tmp_path / "hf"), vocab_size=128, hidden_size=64, intermediate_size=128,
      num_attention_heads=8, num_key_value_heads=4, head_dim=8, num_hidden_layers=2)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, size=(4, 9)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0  # left padding
  mask[2, 6:] = 0  # right padding
  np.savez(tmp_path / "inputs.npz", tokens=tokens, mask=mask)

  codes, outputs = _run_two_processes(hf_dir, str(tmp_path))
  if any(c != 0 for c in codes):
    failed = [f for f in os.listdir(tmp_path) if f.startswith("init_failed_")]
    if failed:
      pytest.skip(f"jax.distributed cannot start on this platform: {(tmp_path / failed[0]).read_text()}")
    raise AssertionError(f"worker exit codes {codes}:\n" + "\n----\n".join(o[-4000:] for o in outputs))

  got = [np.load(tmp_path / f"logits_{i}.npy") for i in range(2)]
  np.testing.assert_array_equal(got[0], got[1])

  torch_model = hf_fixtures.load_hf_torch(hf_dir)
  with torch.no_grad():
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    want = torch_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                       attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(got[0][real], want[real], rtol=1e-4, atol=1e-4)

  from alignjax import models

  single = np.asarray(models.from_hf(hf_dir)(tokens, attention_mask=mask))
  np.testing.assert_allclose(got[0][real], single[real], rtol=1e-5, atol=1e-5)

  # Parameters really span both processes, and each process holds only part of them.
  for i in range(2):
    placement = json.loads((tmp_path / f"placement_{i}.json").read_text())
    assert placement["split_across_processes"] > 0, placement
    assert placement["local_bytes"] < placement["global_bytes"], placement
