"""Sharded equals unsharded, on 8 fake CPU devices.

For meshes (data, fsdp, tensor) = (8,1,1), (2,2,2), (1,2,4), a tiny HF model
loaded with ``from_hf(path, mesh=mesh)`` (and a randomly initialised one
placed with ``shard_model``) must give the single-device model's logits, the
same gradients of a token-log-prob loss and the same parameters after one
optax AdamW step; transformers' torch model anchors the logits. Parameter
placements are checked against ``sharding.RULES`` read directly.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from alignjax import losses, models, sharding
from tests import hf_fixtures

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
# Every sharded dimension divisible by 8 so any mesh axis (or pair) divides it.
_DIMS = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=8,
             num_key_value_heads=8, head_dim=8, num_hidden_layers=1)
B, T = 8, 8


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharding")
  llama = hf_fixtures.make_tiny_hf("llama", str(root / "llama"), **_DIMS)
  qwen3 = hf_fixtures.make_tiny_hf("qwen3", str(root / "qwen3"), **_DIMS)
  return {"llama": llama, "qwen3": qwen3}


_SINGLE_DEVICE = {}


def _single_device_step(path):
  """The unsharded reference step, computed once per model directory."""
  if path not in _SINGLE_DEVICE:
    _SINGLE_DEVICE[path] = _forward_grads_update(models.from_hf(path), *_batch())
  return _SINGLE_DEVICE[path]


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, _DIMS["vocab_size"], size=(B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, :3] = 0  # left padding
  mask[2, 5:] = 0  # right padding
  return tokens, mask


def _loss(model, tokens, mask):
  """Mean next-token NLL over real positions, label log-probs by chunks; hidden as aux."""
  hidden = model(tokens, attention_mask=mask, return_hidden=True)
  lp = losses.chunked_token_logprobs(hidden[:, :-1], tokens[:, 1:], model.unembed, chunk_size=3)
  m = mask[:, 1:].astype(jnp.float32)
  return -jnp.sum(lp * m) / jnp.sum(m), hidden


def _forward_grads_update(model, tokens, mask):
  """logits, loss, grads and AdamW-updated params (NumPy pytrees) of one training step."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # eps well above float32 noise in tiny gradients: Adam's first step is g / (|g| + eps).
  opt = optax.adamw(1e-2, eps=1e-4, weight_decay=0.1)

  @jax.jit
  def step(params, rest, tokens, mask):
    def loss_fn(p):
      return _loss(nnx.merge(graphdef, p, rest), tokens, mask)

    (loss, hidden), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = opt.update(grads, opt.init(params), params)
    logits = nnx.merge(graphdef, params, rest).unembed(hidden)
    return logits, loss, grads, optax.apply_updates(params, updates)

  out = step(params, rest, tokens, mask)
  return jax.tree_util.tree_map(np.asarray, out)


def _assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _expected_spec(names, mesh):
  """Mesh axes per dimension from the rule table read directly (independent of logical_to_spec).

  Mesh axes of size 1 shard nothing and are left out; every test dimension is divisible
  by every mesh axis, so nothing else is dropped.
  """
  spec = []
  for name in names:
    axes = sharding.RULES[name] if name is not None else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    spec.append(tuple(a for a in axes if mesh.shape[a] > 1))
  return spec


def _normalize(spec, ndim):
  out = []
  for entry in list(spec) + [None] * (ndim - len(spec)):
    out.append(() if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry)))
  return out


def _check_rule_table(model, mesh):
  """Every parameter's placement equals the rule table's; returns how many are split."""
  checked = split = 0
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Param):
      continue
    names = var.get_metadata().get("out_sharding")
    assert names is not None, f"{path}: parameter without logical axis names"
    value = var.get_value()
    got = _normalize(value.sharding.spec, value.ndim)
    want = _normalize(_expected_spec(names, mesh), value.ndim)
    assert got == want, (path, names, got, want)
    checked += 1
    split += value.sharding.shard_shape(value.shape) != value.shape
  assert checked > 5
  return split


@pytest.mark.parametrize("family, mesh_shape", [("llama", m) for m in MESHES] + [("qwen3", (1, 2, 4))])
def test_from_hf_sharded_matches_single_device_and_transformers(hf_dirs, family, mesh_shape):
  path = hf_dirs[family]
  tokens, mask = _batch()
  want = _single_device_step(path)

  mesh = sharding.make_mesh(*mesh_shape)
  model = models.from_hf(path, mesh=mesh)
  split = _check_rule_table(model, mesh)
  if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
    assert split > 0, "no parameter is split across devices"
  batch_sharding = sharding.batch_sharding(mesh)
  got = _forward_grads_update(model, jax.device_put(tokens, batch_sharding),
                              jax.device_put(mask, batch_sharding))
  logits, loss, grads, updated = got
  np.testing.assert_allclose(logits, want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, want[1], rtol=1e-5, atol=1e-6)
  _assert_trees_close(grads, want[2], rtol=1e-4, atol=1e-6)
  _assert_trees_close(updated, want[3], rtol=1e-5, atol=1e-5)  # Adam amplifies tiny-grad noise

  # Independent anchor: transformers on the same directory, positions from the mask.
  torch_model = hf_fixtures.load_hf_torch(path)
  with torch.no_grad():
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = torch_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)),
                      position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(logits[real], ref[real], rtol=1e-4, atol=1e-4)


def test_shard_model_in_place_matches_single_device(hf_dirs):
  """An unsharded model moved with shard_model: rule-table placement, same step results."""
  path = hf_dirs["llama"]
  want = _single_device_step(path)
  mesh = sharding.make_mesh(2, 2, 2)
  model = models.from_hf(path)
  assert sharding.shard_model(model, mesh) is model
  assert _check_rule_table(model, mesh) > 0
  shardings = sharding.model_shardings(model, mesh)
  leaves = jax.tree_util.tree_leaves(shardings)
  values = jax.tree_util.tree_leaves(nnx.state(model))
  assert len(leaves) == len(values)
  for s, v in zip(leaves, values):
    assert isinstance(s, jax.sharding.NamedSharding)
    assert v.sharding.is_equivalent_to(s, v.ndim)
  tokens, mask = _batch()
  logits, loss, grads, updated = _forward_grads_update(model, tokens, mask)
  np.testing.assert_allclose(logits, want[0], rtol=1e-5, atol=1e-5)
  _assert_trees_close(grads, want[2], rtol=1e-4, atol=1e-6)
  _assert_trees_close(updated, want[3], rtol=1e-5, atol=1e-5)
