"""One process of the two-process test in tests/test_multihost.py (not a test itself).

  python tests/multihost_worker.py PROCESS_ID PORT HF_DIR OUT_DIR

Joins ``jax.distributed`` (2 processes, 4 fake CPU devices each, gloo
collectives), loads ``HF_DIR`` with ``models.from_hf(..., mesh=...)`` sharded
over all 8 devices, runs a padded batch and writes the gathered logits and a
summary of the parameter placement to ``OUT_DIR/process_<id>.npz``/``.json``.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
from tests import process_cache  # noqa: E402

process_cache.store_every_process()


def main():
  process_id, port, hf_dir, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  try:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
  except Exception as e:  # reported to the test, which skips only on this
    with open(os.path.join(out_dir, f"init_failed_{process_id}.txt"), "w") as f:
      f.write(repr(e))
    raise

  import numpy as np
  from flax import nnx
  from jax.experimental import multihost_utils

  from alignjax import models, sharding

  data = np.load(os.path.join(out_dir, "inputs.npz"))
  tokens, mask = data["tokens"], data["mask"]
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  model = models.from_hf(hf_dir, mesh=mesh)

  placement = {"num_params": 0, "split_across_processes": 0, "local_bytes": 0, "global_bytes": 0}
  for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)):
    placement["num_params"] += 1
    placement["global_bytes"] += leaf.nbytes
    procs = {d.process_index for d in leaf.sharding.device_set}
    if procs != {0, 1}:
      raise RuntimeError(f"parameter on processes {procs}, expected both")
    if not leaf.is_fully_addressable:
      placement["split_across_processes"] += int(
          leaf.sharding.shard_shape(leaf.shape) != leaf.shape)
    # Bytes of distinct slices this process holds (a replicated leaf counts in full).
    held = {}
    for shard in leaf.addressable_shards:
      held[tuple((sl.start, sl.stop) for sl in shard.index)] = shard.data.nbytes
    placement["local_bytes"] += sum(held.values())

  batch = sharding.batch_sharding(mesh)
  g_tokens = jax.make_array_from_callback(tokens.shape, batch, lambda i: tokens[i])
  g_mask = jax.make_array_from_callback(mask.shape, batch, lambda i: mask[i])
  logits = model(g_tokens, attention_mask=g_mask)
  gathered = multihost_utils.process_allgather(logits, tiled=True)
  np.save(os.path.join(out_dir, f"logits_{process_id}.npy"), np.asarray(gathered, np.float32))
  with open(os.path.join(out_dir, f"placement_{process_id}.json"), "w") as f:
    json.dump(placement, f)
  multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
  main()
