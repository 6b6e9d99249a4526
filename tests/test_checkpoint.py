import jax
import numpy as np
import pytest
from flax import nnx

from alignjax.checkpoint import Checkpointer
from alignjax.models import TinyLM, TinyLMConfig
from alignjax.training import make_optimizer

CFG = TinyLMConfig(vocab_size=10, max_len=8, d_model=16, num_heads=2, d_ff=32, num_layers=1)


def _objects(seed):
  model = TinyLM(CFG, rngs=nnx.Rngs(seed))
  return {"model": model, "opt": make_optimizer(model, learning_rate=1e-3, warmup_steps=1, total_steps=10)}


def _leaves(objs):
  return jax.tree.leaves({k: nnx.state(v) for k, v in objs.items()})


def test_roundtrip_and_partial_save_is_ignored(tmp_path):
  saved = _objects(0)
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, saved)
  ckpt.close()
  # A save interrupted mid-way leaves only a temporary directory behind.
  partial = tmp_path / "2.orbax-checkpoint-tmp"
  partial.mkdir()
  (partial / "garbage").write_bytes(b"\x00" * 10)

  fresh = _objects(1)
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(saved), _leaves(fresh)))
  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 1
  assert ckpt.restore(fresh) == 1
  for a, b in zip(_leaves(saved), _leaves(fresh)):
    np.testing.assert_array_equal(a, b)
  ckpt.close()


def test_restore_without_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(str(tmp_path)).restore(_objects(0))
