"""alignjax.models vs transformers: logits parity per family and option, KV cache, HF I/O,
bad input, and parameter shardings. References: transformers 5.x torch models (fp32, eager
attention) built locally by tests/hf_fixtures.py, and the rule table read independently."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alignjax import sharding
from alignjax.models import ModelConfig, Transformer, config_from_hf, from_hf, to_hf
from tests.hf_fixtures import load_hf_torch, make_tiny_hf, torch_logits

TOL = 1e-4

# (case id, family, HF config overrides): every non-default option appears at least once.
CASES = [
    ("llama", "llama", {}),
    ("llama_tied_llama3_rope_bias", "llama", dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    ("llama_linear_rope_mha", "llama", dict(
        num_key_value_heads=4, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    ("mistral_sliding", "mistral", {}),  # window 4 < sequence length 11
    ("qwen2", "qwen2", {}),
    ("qwen2_sliding", "qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    ("qwen3_qknorm_headdim", "qwen3", {}),  # head_dim 16 != 48 / 4
    ("gemma", "gemma", {}),
    ("gemma_legacy_gelu", "gemma", dict(hidden_act="gelu")),
    ("gemma2_softcap_local_global", "gemma2", {}),
    ("gpt2", "gpt2", {}),
    ("gpt2_untied_relu", "gpt2", dict(tie_word_embeddings=False, activation_function="relu")),
]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  cache = {}

  def get(case_id):
    if case_id not in cache:
      _, family, overrides = next(c for c in CASES if c[0] == case_id)
      cache[case_id] = make_tiny_hf(family, str(root / case_id), **overrides)
    return cache[case_id]
  return get


def _batch(seed=0, B=4, T=11, V=101):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, :4] = 0   # left-padded
  mask[2, 7:] = 0   # right-padded
  mask[3, :2] = 0   # left- and right-padded
  mask[3, 9:] = 0
  return tokens, mask


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_logits_match_transformers_left_and_right_padded(hf_dirs, case_id):
  path = hf_dirs(case_id)
  tokens, mask = _batch()
  hf_model = load_hf_torch(path)
  ref = torch_logits(hf_model, tokens, mask)
  model = from_hf(path)
  out = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=TOL, rtol=TOL)
  # A left-padded row scores exactly like the unpadded row (transformers on the bare row).
  row = tokens[1:2, 4:]
  ref_row = torch_logits(hf_model, row, np.ones_like(row))
  np.testing.assert_allclose(out[1, 4:], ref_row[0], atol=TOL, rtol=TOL)
  # return_hidden + unembed is the same computation as the logits.
  hidden = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask), return_hidden=True)
  np.testing.assert_allclose(np.asarray(model.unembed(hidden))[real], ref[real], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("case_id", ["mistral_sliding", "gemma2_softcap_local_global"])
def test_kv_cache_prefill_and_decode_match_transformers(hf_dirs, case_id):
  path = hf_dirs(case_id)
  tokens, _ = _batch(seed=1, T=12)
  tokens = tokens[:3]
  P_len = 7
  mask = np.ones_like(tokens)
  mask[0, :3] = 0  # left-padded prompt
  mask[2, :5] = 0
  ref = torch_logits(load_hf_torch(path), tokens, mask)
  model = from_hf(path)
  cache = model.init_cache(3, 16)
  step = nnx.jit(lambda m, t, k, c: m(t, k, cache=c))  # one compilation for all decode steps
  out, cache = step(model, jnp.asarray(tokens[:, :P_len]), jnp.asarray(mask[:, :P_len]), cache)
  real = mask[:, :P_len].astype(bool)
  np.testing.assert_allclose(np.asarray(out)[real], ref[:, :P_len][real], atol=TOL, rtol=TOL)
  for t in range(P_len, 12):
    out, cache = step(model, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
    np.testing.assert_allclose(np.asarray(out)[:, 0], ref[:, t], atol=TOL, rtol=TOL)
  assert int(cache.length) == 12
  np.testing.assert_array_equal(np.asarray(cache.positions)[0, 3:12], np.arange(9))


def test_kv_cache_holds_the_keys_and_values_of_transformers_cache(hf_dirs):
  """The prefilled cache holds transformers' own cache (post-RoPE keys); keys [B, Hkv, Dh, S], values [B, Hkv, S, Dh]."""
  import torch  # pylint: disable=import-outside-toplevel
  path = hf_dirs("llama_tied_llama3_rope_bias")
  tokens, mask = _batch(seed=2, T=10)  # left-, right- and both-padded rows
  model = from_hf(path)
  cache = model.init_cache(4, 12)
  _, cache = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask), cache=cache)
  mask_t = torch.as_tensor(mask.astype(np.int64))
  with torch.no_grad():
    hf = load_hf_torch(path)(input_ids=torch.as_tensor(tokens, dtype=torch.long), attention_mask=mask_t,
                             position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0), use_cache=True)
  real = mask.astype(bool)
  K, Dh = model.config.num_kv_heads, model.config.head_dim
  for i, layer in enumerate(hf.past_key_values.layers):
    assert cache.k[i].shape == (4, K, Dh, 12) and cache.v[i].shape == (4, K, 12, Dh)
    for ours, theirs in ((np.swapaxes(np.asarray(cache.k[i]), 2, 3), layer.keys), (np.asarray(cache.v[i]), layer.values)):
      ours = np.swapaxes(ours[:, :, :10], 1, 2)  # [B, K, S, Dh] -> [B, S, K, Dh] to pick the real slots
      np.testing.assert_allclose(ours[real], np.swapaxes(theirs.numpy(), 1, 2)[real], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_cache_write_puts_the_update_at_its_slots_exactly(dtype):
  """`_cache_write` (16-bit floats on CPU through their bits) equals NumPy's slice assignment, bit for bit."""
  from alignjax.models.transformer import _cache_write  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  cache = jnp.asarray(rng.standard_normal((2, 3, 4, 7)), dtype)
  update = jnp.asarray(rng.standard_normal((2, 3, 4, 2)), dtype)
  for index in (0, 3, 5):
    got = jax.jit(lambda c, u, i: _cache_write(c, u, (0, 0, 0, i)))(cache, update, index)
    want = np.array(cache)
    want[..., index:index + 2] = np.asarray(update)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("case_id", ["llama_tied_llama3_rope_bias", "qwen2_sliding",
                                     "qwen3_qknorm_headdim", "gemma2_softcap_local_global",
                                     "gpt2"])
def test_to_hf_round_trip_loads_in_transformers(hf_dirs, case_id, tmp_path):
  path = hf_dirs(case_id)
  tokens, mask = _batch(seed=2)
  ref = torch_logits(load_hf_torch(path), tokens, mask)
  model = from_hf(path)
  out_dir = to_hf(model, tmp_path / "export")
  exported = torch_logits(load_hf_torch(out_dir), tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(exported[real], ref[real], atol=TOL, rtol=TOL)
  again = from_hf(out_dir)
  for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, _params(model))),
                  jax.tree.leaves(jax.tree.map(np.asarray, _params(again)))):
    np.testing.assert_array_equal(a, b)


def _params(model):
  return nnx.state(model, nnx.Param)


def test_sharded_safetensors_index_both_ways(hf_dirs, tmp_path):
  src = make_tiny_hf("llama", str(tmp_path / "src"), max_shard_size="20KB")
  assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
  tokens, mask = _batch(seed=3)
  ref = torch_logits(load_hf_torch(src), tokens, mask)
  model = from_hf(src)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))[real],
                             ref[real], atol=TOL, rtol=TOL)
  out = to_hf(model, tmp_path / "out", max_shard_size=20_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1
  np.testing.assert_allclose(torch_logits(load_hf_torch(out), tokens, mask)[real], ref[real],
                             atol=TOL, rtol=TOL)


def test_config_4x_and_5x_spellings_agree(hf_dirs, tmp_path):
  path = hf_dirs("llama_tied_llama3_rope_bias")
  d5 = json.load(open(os.path.join(path, "config.json")))
  assert "rope_parameters" in d5
  d4 = dict(d5)
  rope = dict(d4.pop("rope_parameters"))
  d4["rope_theta"] = rope.pop("rope_theta")
  rope["type"] = rope.pop("rope_type")  # oldest spelling of the rope type key
  d4["rope_scaling"] = rope
  d4["torch_dtype"] = d4.pop("dtype", None) or "float32"
  assert config_from_hf(d4) == config_from_hf(d5)
  cfg = config_from_hf(d5)
  assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor) == ("llama3", 50000.0, 8.0)
  # A 4.x-spelled directory loads and matches transformers.
  legacy = tmp_path / "legacy"
  shutil.copytree(path, legacy)
  json.dump(d4, open(legacy / "config.json", "w"))
  tokens, mask = _batch(seed=4)
  ref = torch_logits(load_hf_torch(str(legacy)), tokens, mask)
  out = np.asarray(from_hf(str(legacy))(jnp.asarray(tokens), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=TOL, rtol=TOL)


def _rewrite(src, dst, *, drop=None, config_edit=None):
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  if drop:
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    del tensors[drop]
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  if config_edit:
    d = json.load(open(os.path.join(dst, "config.json")))
    config_edit(d)
    json.dump(d, open(os.path.join(dst, "config.json"), "w"))
  return str(dst)


def test_bad_input_raises_clear_value_errors(hf_dirs, tmp_path):
  path = hf_dirs("llama")
  with pytest.raises(ValueError, match="model_type.*'bert'"):
    config_from_hf({"model_type": "bert"})
  with pytest.raises(ValueError, match="missing.*q_proj"):
    from_hf(_rewrite(path, tmp_path / "a", drop="model.layers.1.self_attn.q_proj.weight"))
  with pytest.raises(ValueError, match="shape"):
    from_hf(_rewrite(path, tmp_path / "b", config_edit=lambda d: d.update(intermediate_size=64)))
  with pytest.raises(ValueError, match="dtype"):
    from_hf(path, dtype="float33")
  with pytest.raises(ValueError, match="param_dtype"):
    from_hf(path, param_dtype="int8")
  with pytest.raises(ValueError, match="yarn"):
    from_hf(_rewrite(path, tmp_path / "c", config_edit=lambda d: d.update(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})))
  with pytest.raises(ValueError, match="hidden_act"):
    from_hf(_rewrite(path, tmp_path / "d", config_edit=lambda d: d.update(hidden_act="mish")))
  with pytest.raises(ValueError, match="directory"):
    from_hf(str(tmp_path / "nope"))
  with pytest.raises(ValueError) as err:
    config_from_hf({"model_type": "bert"})
  assert "\n" not in str(err.value) and "config_from_hf" in str(err.value)


def test_parameter_shardings_follow_rule_table_on_2x2x2_mesh(hf_dirs):
  from flax import nnx
  mesh = sharding.make_mesh(2, 2, 2)
  path = hf_dirs("gemma2_softcap_local_global")  # hidden 48, heads 4, kv 2, head_dim 16
  model = from_hf(path, mesh=mesh)
  # Independent expectation: embed -> fsdp, heads/kv_heads/mlp/vocab -> tensor, rest replicated.
  expected = {
      "embed": P(None, "fsdp"),  # vocab 101 is odd: the tensor axis cannot split it
      ("layers", 0, "attn", "q"): P("fsdp", "tensor", None),
      ("layers", 0, "attn", "k"): P("fsdp", "tensor", None),
      ("layers", 0, "attn", "o"): P("tensor", None, "fsdp"),
      ("layers", 0, "mlp", "gate"): P("fsdp", "tensor"),
      ("layers", 0, "mlp", "down"): P("tensor", "fsdp"),
      ("layers", 0, "attn_norm", "scale"): P(None),
  }
  for key, spec in expected.items():
    obj = model
    for k in (key if isinstance(key, tuple) else (key,)):
      obj = obj[k] if isinstance(k, int) else getattr(obj, k)
    assert obj[...].sharding.spec == spec, (key, obj[...].sharding.spec)
  # Every parameter is on the spec the rule table gives its logical names.
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      names = var.get_metadata()["out_sharding"]
      assert var[...].sharding.spec == sharding.logical_to_spec(names, shape=var[...].shape, mesh=mesh)
  assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  tokens, mask = _batch(seed=5, B=4)
  ref = torch_logits(load_hf_torch(path), tokens, mask)
  out = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=TOL, rtol=TOL)


def test_bfloat16_params_export_in_their_dtype(hf_dirs, tmp_path):
  import torch
  path = hf_dirs("llama")
  model = from_hf(path, dtype="bfloat16")
  assert model.embed[...].dtype == jnp.bfloat16
  tokens, mask = _batch(seed=6)
  out = model(jnp.asarray(tokens), jnp.asarray(mask))
  assert out.dtype == jnp.float32  # bf16 compute, float32 logits (tests/test_bf16.py)
  out_dir = to_hf(model, tmp_path / "bf16")
  assert json.load(open(os.path.join(out_dir, "config.json")))["torch_dtype"] == "bfloat16"
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto")
  assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      hf.model.embed_tokens.weight.detach().float().numpy(), np.asarray(model.embed[...].astype(jnp.float32)))
  # A bfloat16 checkpoint (BF16 safetensors) loads into float32 params exactly.
  src = make_tiny_hf("qwen2", str(tmp_path / "bf16_src"), torch_dtype="bfloat16")
  hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
  up = from_hf(src, dtype="float32")
  np.testing.assert_array_equal(np.asarray(up.layers[1].attn.q_bias[...]).reshape(-1),
                                hf_bf16.model.layers[1].self_attn.q_proj.bias.detach().float().numpy())
  # bf16 logits stay close to the fp32 reference.
  ref = torch_logits(load_hf_torch(path), tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[real], ref[real], atol=0.1)


def test_presets_and_remat_gradients_match():
  cfg = ModelConfig.llama_tiny()
  assert 1e5 < cfg.num_params < 1e6
  assert 9e7 < ModelConfig.llama_100m().num_params < 1.1e8
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
  grads = []
  for remat in ("none", "full"):
    small = ModelConfig.llama_tiny(remat=remat, vocab_size=64, num_layers=1, intermediate_size=64)
    model = Transformer(small, rngs=nnx.Rngs(0))
    g = nnx.jit(nnx.grad(lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])))(model)
    grads.append(jax.tree.leaves(g))
  for other in grads[1:]:
    for a, b in zip(grads[0], other):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with pytest.raises(ValueError, match="remat"):
    ModelConfig.llama_tiny(remat="sometimes")


def test_4x_configs_without_layer_types_use_transformers_default_patterns():
  # Gemma 2 configs written by transformers 4.x have no `layer_types`: even layers are local.
  gemma2 = dict(model_type="gemma2", vocab_size=101, hidden_size=48, intermediate_size=96,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                rope_theta=10000.0, sliding_window=4, query_pre_attn_scalar=24,
                hidden_activation="gelu_pytorch_tanh", torch_dtype="bfloat16")
  cfg = config_from_hf(gemma2)
  assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
  assert [cfg.layer_window(i) for i in range(4)] == [4, None, 4, None]
  assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.tie_embeddings) == (50.0, 30.0, True)
  # Qwen2.5-style: sliding only with use_sliding_window, from layer max_window_layers on.
  qwen = dict(model_type="qwen2", vocab_size=101, hidden_size=48, intermediate_size=96,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              rope_theta=1e6, use_sliding_window=False, sliding_window=32768, max_window_layers=1)
  assert config_from_hf(qwen).sliding_window is None
  qwen["use_sliding_window"] = True
  assert config_from_hf(qwen).layer_types == ("full_attention",) + ("sliding_attention",) * 2
  # Legacy Gemma `hidden_act: "gelu"` with `hidden_activation: null` is the tanh approximation.
  gemma = dict(gemma2, model_type="gemma", hidden_act="gelu", hidden_activation=None)
  assert config_from_hf(gemma).activation == "gelu_tanh"


def test_gpt2_hub_layout_without_prefix_and_with_attention_buffers(hf_dirs, tmp_path):
  from safetensors.numpy import load_file, save_file
  path = hf_dirs("gpt2")
  legacy = tmp_path / "gpt2_hub"
  shutil.copytree(path, legacy)
  tensors = load_file(os.path.join(legacy, "model.safetensors"))
  tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old causal buffer
  save_file(tensors, os.path.join(legacy, "model.safetensors"), metadata={"format": "pt"})
  tokens, mask = _batch(seed=7)
  ref = torch_logits(load_hf_torch(path), tokens, mask)
  out = np.asarray(from_hf(str(legacy))(jnp.asarray(tokens), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=TOL, rtol=TOL)


def test_make_mesh_and_create_sharded_follow_rule_table():
  with pytest.raises(ValueError, match="make_mesh"):
    sharding.make_mesh(3, 1, 1)
  mesh = sharding.make_mesh(1, 2, 4)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  cfg = ModelConfig.llama_tiny(num_heads=4, num_kv_heads=4)  # vocab 256, hidden 64, mlp 256
  model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  assert model.embed[...].sharding.spec == P("tensor", "fsdp")
  assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")
  assert model.layers[0].attn.k[...].sharding.spec == P("fsdp", "tensor", None)
  assert model.layers[1].mlp.down[...].sharding.spec == P("tensor", "fsdp")
  assert model.final_norm.scale[...].sharding.spec == P(None)
  with pytest.raises(ValueError, match="unknown logical axis"):
    sharding.logical_to_spec(("embedding",))


def test_to_hf_refuses_options_the_family_cannot_express(tmp_path):
  for cfg, field in [(ModelConfig.llama_tiny(final_logit_softcap=30.0), "final_logit_softcap"),
                     (ModelConfig.llama_tiny(qk_norm=True), "qk_norm"),
                     (ModelConfig.llama_tiny(family="qwen3"), "qk_norm"),
                     (ModelConfig.llama_tiny(sliding_window=8), "sliding_window")]:
    with pytest.raises(ValueError, match=field):
      to_hf(Transformer(cfg, rngs=nnx.Rngs(0)), tmp_path / field)
