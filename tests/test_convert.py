"""launch/convert.py: HF directory -> Orbax -> HF directory, checked against transformers.

The reference is the original torch model built by transformers from the
source directory: the directory written after the round trip must load in
transformers and give the same logits (and the same tensors) as the original.
"""

import json
import os
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch

from launch import convert as convert_launcher
from tests import hf_fixtures, launcher_zygote
from tests.conftest import ROOT

_TOKENS = np.array([[3, 17, 5, 9, 22, 1, 8], [4, 4, 30, 2, 11, 7, 19]], np.int64)


def _torch_logits(path):
  model = hf_fixtures.load_hf_torch(path)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(_TOKENS)).logits.float().numpy()


def _tensors(path):
  out = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      out.update(safetensors.numpy.load_file(os.path.join(path, name)))
  return out


def _run_launcher(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = launcher_zygote.run([sys.executable, "-m", "launch.convert", *args], cwd=ROOT, env=env, timeout=300)
  return proc


def test_launcher_round_trip_llama_matches_transformers(tmp_path):
  src = hf_fixtures.make_tiny_hf("llama", str(tmp_path / "hf"))
  ckpt, out = str(tmp_path / "orbax"), str(tmp_path / "hf_out")
  proc = _run_launcher("--direction=to_orbax", f"--src={src}", f"--dst={ckpt}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The config travels inside the checkpoint, next to the parameters.
  stored = json.loads((tmp_path / "orbax" / "model_config" / "metadata").read_text())
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert stored["vocab_size"] == hf_config["vocab_size"]
  assert stored["num_layers"] == hf_config["num_hidden_layers"]
  proc = _run_launcher("--direction=to_hf", f"--src={ckpt}", f"--dst={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]

  np.testing.assert_allclose(_torch_logits(out), _torch_logits(src), rtol=1e-5, atol=1e-5)
  want, got = _tensors(src), _tensors(out)
  # Every tensor transformers needs is written, with identical values.
  for name, value in got.items():
    np.testing.assert_array_equal(value, want[name], err_msg=name)
  assert set(want) - set(got) <= {"lm_head.weight"}  # tied heads may be stored once


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_round_trip_other_families_match_transformers(tmp_path, family):
  src = hf_fixtures.make_tiny_hf(family, str(tmp_path / "hf"))
  ckpt, out = str(tmp_path / "orbax"), str(tmp_path / "hf_out")
  convert_launcher.convert("to_orbax", src, ckpt)
  convert_launcher.convert("to_hf", ckpt, out)
  np.testing.assert_allclose(_torch_logits(out), _torch_logits(src), rtol=1e-5, atol=1e-5)


def test_dtype_flag_casts_stored_parameters(tmp_path):
  src = hf_fixtures.make_tiny_hf("llama", str(tmp_path / "hf"))
  ckpt, out = str(tmp_path / "orbax"), str(tmp_path / "hf_out")
  convert_launcher.convert("to_orbax", src, ckpt)
  convert_launcher.convert("to_hf", ckpt, out, dtype="bfloat16")
  want = _tensors(src)
  with open(os.path.join(out, "model.safetensors"), "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  got_dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
  assert set(got_dtypes.values()) == {"BF16"}
  # Values are the float32 originals rounded to bfloat16 (torch does the rounding here).
  from safetensors.torch import load_file

  for name, value in load_file(os.path.join(out, "model.safetensors")).items():
    expected = torch.from_numpy(want[name]).to(torch.bfloat16)
    assert torch.equal(value, expected), name


def test_bad_arguments_raise_value_error(tmp_path):
  with pytest.raises(ValueError, match="--src .* is not a directory"):
    convert_launcher.convert("to_orbax", str(tmp_path / "missing"), str(tmp_path / "x"))
  src = hf_fixtures.make_tiny_hf("llama", str(tmp_path / "hf"))
  with pytest.raises(ValueError, match="--dst .* exists"):
    convert_launcher.convert("to_orbax", src, src)
  with pytest.raises(ValueError, match="--direction"):
    convert_launcher.convert("sideways", src, str(tmp_path / "y"))
  with pytest.raises(ValueError, match="is not a model checkpoint"):
    convert_launcher.convert("to_hf", src, str(tmp_path / "z"))


def test_sharded_conversion_restores_onto_mesh(tmp_path):
  """--mesh: weights saved from shards and restored onto shards still match transformers."""
  from flax import nnx

  from alignjax import sharding
  from alignjax.models import checkpoint_io

  src = hf_fixtures.make_tiny_hf("llama", str(tmp_path / "hf"), num_attention_heads=4,
                                 num_key_value_heads=4, hidden_size=48, vocab_size=104)
  ckpt, out = str(tmp_path / "orbax"), str(tmp_path / "hf_out")
  mesh = sharding.make_mesh(1, 2, 4)
  convert_launcher.convert("to_orbax", src, ckpt, mesh=mesh)
  model = checkpoint_io.load_model(ckpt, mesh=mesh)
  split = 0
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      value = var.get_value()
      assert value.sharding.is_equivalent_to(sharding.variable_sharding(var, mesh), value.ndim)
      split += value.sharding.shard_shape(value.shape) != value.shape
  assert split > 0
  convert_launcher.convert("to_hf", ckpt, out, mesh=mesh)
  np.testing.assert_allclose(_torch_logits(out), _torch_logits(src), rtol=1e-5, atol=1e-5)


def test_checkpoint_not_matching_its_config_is_refused(tmp_path):
  from alignjax.models import checkpoint_io

  src = hf_fixtures.make_tiny_hf("llama", str(tmp_path / "hf"))
  ckpt = str(tmp_path / "orbax")
  convert_launcher.convert("to_orbax", src, ckpt)
  meta = tmp_path / "orbax" / "model_config" / "metadata"
  stored = json.loads(meta.read_text())
  meta.write_text(json.dumps(dict(stored, hidden_size=stored["hidden_size"] * 2)))
  with pytest.raises(ValueError, match="load_model: checkpoint .* does not match its config"):
    checkpoint_io.load_model(ckpt)
  meta.write_text(json.dumps(dict(stored, not_a_field=1)))
  with pytest.raises(ValueError, match="unknown ModelConfig fields \\['not_a_field'\\]"):
    checkpoint_io.load_model(ckpt)
  with pytest.raises(ValueError, match="load_model: `param_dtype`"):
    checkpoint_io.load_model(ckpt, param_dtype="int8")


def test_loads_of_one_checkpoint_are_independent_models_holding_the_saved_tensors(tmp_path):
  """load_model builds its abstract model once per config; each load is still a model of its own."""
  from alignjax.models import checkpoint_io

  src = hf_fixtures.make_tiny_hf("llama", str(tmp_path / "hf"))
  ckpt = str(tmp_path / "orbax")
  convert_launcher.convert("to_orbax", src, ckpt)
  first, second = checkpoint_io.load_model(ckpt), checkpoint_io.load_model(ckpt)
  embed = _tensors(src)["model.embed_tokens.weight"]
  first.embed.set_value(first.embed.get_value() * 0)
  np.testing.assert_array_equal(np.asarray(second.embed.get_value()), embed)
  np.testing.assert_array_equal(np.asarray(checkpoint_io.load_model(ckpt).embed.get_value()), embed)
  assert not np.any(np.asarray(first.embed.get_value()))
