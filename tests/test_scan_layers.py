"""Scanned layers (`ModelConfig.scan_layers`): stacked block parameters under `nnx.scan`.

References: transformers' torch models (fp32, eager) built locally by tests/hf_fixtures.py,
and the same checkpoint loaded per layer (an unscanned alignjax model, itself checked against
transformers in tests/test_models.py). Depth independence is checked on the lowered HLO text
of a gradient step (deterministic); compile times are in bench/scan_layers_compile.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alignjax import sharding
from alignjax.models import ModelConfig, from_hf, to_hf
from alignjax.models import checkpoint_io
from alignjax.models.transformer import stack_layers, unstack_layers
from tests.hf_fixtures import load_hf_torch, make_tiny_hf, torch_logits

TOL = 1e-5
FAMILIES = ("llama", "gemma2")  # gemma2: alternating sliding/full layers, soft-caps, post-norms


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_scan")
  return {f: make_tiny_hf(f, str(root / f)) for f in FAMILIES}


def _batch(seed=0, B=3, T=9, V=101):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, :3] = 0  # left-padded
  mask[2, 6:] = 0  # right-padded
  return tokens, mask


def _loss(model, tokens, mask):
  logits = model(tokens, attention_mask=mask).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:]).sum()


@nnx.jit
def _grad(model, tokens, mask):
  return nnx.grad(_loss)(model, tokens, mask)


def _close(actual, expected):
  """float32 gradients equal up to summation order: 1e-5 of the largest entry."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4,
                             atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_logits_and_gradients_equal_unscanned(hf_dirs, family):
  path = hf_dirs[family]
  tokens, mask = _batch()
  flat = from_hf(path)
  scanned = from_hf(path, scan_layers=True)
  assert scanned.config.scan_layers and not flat.config.scan_layers
  L = flat.config.num_layers
  assert scanned.layers.attn.q.shape == (L,) + flat.layers[0].attn.q.shape
  assert scanned.layers.attn.q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
  ref = torch_logits(load_hf_torch(path), tokens, mask)
  out_flat = np.asarray(flat(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  out_scan = np.asarray(scanned(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(out_scan, out_flat, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(out_scan[real], ref[real], atol=1e-4, rtol=1e-4)

  g_flat = _grad(flat, jnp.asarray(tokens), jnp.asarray(mask))
  for remat in ({"llama": "none", "gemma2": "full"}[family],):  # both scan bodies, one each
    model = stack_layers(from_hf(path, remat=remat))
    g_scan = _grad(model, jnp.asarray(tokens), jnp.asarray(mask))
    for name in ("q", "k", "v", "o"):
      stacked = np.stack([np.asarray(g_flat.layers[i].attn[name][...]) for i in range(L)])
      _close(g_scan.layers.attn[name][...], stacked)
    _close(g_scan.layers.mlp.down[...], np.stack([g_flat.layers[i].mlp.down[...] for i in range(L)]))
    _close(g_scan.embed[...], g_flat.embed[...])


@pytest.mark.parametrize("family,dtype", [(f, "float32") for f in FAMILIES] + [("llama", "bfloat16")])
def test_scanned_kv_cache_decoding_matches_full_forward(hf_dirs, family, dtype):
  """Prefill + decode steps through the cache equal the cache-free forward (bf16: the cache writes of 16-bit floats)."""
  path = hf_dirs[family]
  model = from_hf(path, scan_layers=True, dtype=dtype)
  tol = 1e-5 if dtype == "float32" else 3e-2
  tokens, mask = _batch(seed=1)
  tokens = jnp.asarray(tokens)
  mask = jnp.asarray(mask)
  mask = mask.at[:, 6:].set(1)  # real tokens at the decoded positions
  full = np.asarray(model(tokens, attention_mask=mask), np.float32)
  cache = model.init_cache(3, 12)
  L = model.config.num_layers
  K, Dh = model.config.num_kv_heads, model.config.head_dim
  assert cache.k.shape == (L, 3, K, Dh, 12) and cache.v.shape == (L, 3, K, 12, Dh)
  out, cache = model(tokens[:, :6], attention_mask=mask[:, :6], cache=cache)
  steps = [np.asarray(out, np.float32)]
  for t in range(6, 9):
    out, cache = model(tokens[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache)
    steps.append(np.asarray(out, np.float32))
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.concatenate(steps, axis=1)[real], full[real], atol=tol, rtol=tol)
  # The stacked cache holds what the per-layer model's cache holds.
  flat = unstack_layers(model)
  fcache = flat.init_cache(3, 12)
  _, fcache = flat(tokens, attention_mask=mask, cache=fcache)
  for i in range(L):  # slots of real tokens (padded slots hold values no query reads)
    for ours, theirs, order in ((cache.k[i], fcache.k[i], (0, 3, 1, 2)),  # k [B, K, Dh, S] -> [B, S, K, Dh]
                                (cache.v[i], fcache.v[i], (0, 2, 1, 3))):  # v [B, K, S, Dh] -> [B, S, K, Dh]
      np.testing.assert_allclose(np.asarray(ours, np.float32).transpose(order)[:, :9][real],
                                 np.asarray(theirs, np.float32).transpose(order)[:, :9][real], atol=tol)
  with pytest.raises(ValueError, match="stacked cache"):
    model(tokens[:, :1], cache=fcache)


def test_greedy_generate_with_scanned_model_equals_unscanned(hf_dirs):
  from alignjax import decoding
  path = hf_dirs["llama"]
  tokens, mask = _batch(seed=2)
  outs = [decoding.generate(from_hf(path, scan_layers=scan), tokens, mask, max_new_tokens=5)
          for scan in (False, True)]
  np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
  np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_to_hf_from_scanned_model_loads_in_transformers(hf_dirs, family, tmp_path):
  path = hf_dirs[family]
  scanned = from_hf(path, scan_layers=True)
  out_dir = to_hf(scanned, tmp_path / "out")
  tokens, mask = _batch(seed=3)
  real = mask.astype(bool)
  ref = torch_logits(load_hf_torch(path), tokens, mask)
  again = torch_logits(load_hf_torch(out_dir), tokens, mask)
  np.testing.assert_array_equal(again, ref)  # the same tensors, per layer, on disk
  import json
  with open(f"{out_dir}/config.json") as f:
    assert "scan_layers" not in json.load(f)


def test_sharded_scanned_load_follows_rule_table(hf_dirs):
  path = hf_dirs["llama"]
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = from_hf(path, scan_layers=True, mesh=mesh)
  q = model.layers.attn.q[...]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)  # layers replicated
  assert model.layers.mlp.down[...].sharding.spec == P(None, "tensor", "fsdp")
  flat = from_hf(path)
  tokens, mask = _batch(seed=4, B=4)
  np.testing.assert_allclose(np.asarray(model(tokens, attention_mask=mask)),
                             np.asarray(flat(tokens, attention_mask=mask)), atol=TOL, rtol=TOL)
  for i in range(flat.config.num_layers):
    np.testing.assert_array_equal(np.asarray(q[i]), np.asarray(flat.layers[i].attn.q[...]))
  stacked = stack_layers(sharding.shard_model(from_hf(path), mesh))
  assert stacked.layers.attn.q[...].sharding.spec == P(None, "fsdp", "tensor", None)


def test_orbax_checkpoint_of_scanned_model_is_per_layer(hf_dirs, tmp_path):
  path = hf_dirs["gemma2"]
  scanned = from_hf(path, scan_layers=True)
  ckpt = checkpoint_io.save_model(scanned, str(tmp_path / "ckpt"))
  flat = checkpoint_io.load_model(ckpt, scan_layers=False)
  reference = from_hf(path)
  for i in range(reference.config.num_layers):
    np.testing.assert_array_equal(np.asarray(flat.layers[i].mlp.up[...]),
                                  np.asarray(reference.layers[i].mlp.up[...]))
  again = checkpoint_io.load_model(ckpt)  # the stored config says scan_layers=True
  assert again.config.scan_layers
  np.testing.assert_array_equal(np.asarray(again.layers.attn.k[...]), np.asarray(scanned.layers.attn.k[...]))
  with pytest.raises(ValueError, match="scan_layers"):
    ModelConfig.llama_tiny(scan_layers=1)


def _planner_step_hlo(num_layers: int) -> str:
  """The planner's DPO step (alignjax.aot, online reference, remat full) lowered for 4 fake CPU devices."""
  from alignjax import aot
  exp = aot.Experiment(algorithm="dpo", model=ModelConfig.llama_tiny(num_layers=num_layers, scan_layers=True),
                       batch_size=8, prompt_len=8, response_len=8, dtype="float32", frozen_dtype="float32")
  built = aot.build_step(exp, aot.get_topology("v5e:2x2", backend="cpu"), (1, 4, 1), remat="full")
  assert built.model_config.scan_layers
  return built.step.lower(*built.args).as_text()


def test_planner_step_size_does_not_grow_with_depth():
  small, deep = _planner_step_hlo(2), _planner_step_hlo(32)
  # Only the stacked shapes' leading 2 -> 32 differ: the same text length up to digits.
  assert abs(len(deep) - len(small)) <= 0.01 * len(small)
  assert small.count("stablehlo.while") == deep.count("stablehlo.while") >= 2  # fwd + bwd scans
