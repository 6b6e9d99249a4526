"""LoRA adapters (alignjax.models.lora): counts, training only adapters, adapters off,
merged export, sharding.

References: the closed-form adapter size r·(in + out) per weight (Hu et al. 2021,
arXiv:2106.09685); the base model before adapters were added; transformers (torch) loading
the merged export; the unsharded model.
"""

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alignjax import sharding
from alignjax.models import ModelConfig, Transformer, from_hf, lora, to_hf, transformer
from tests.hf_fixtures import load_hf_torch, make_tiny_hf, torch_logits

TARGETS = r"layers/\d+/attn/(q|v)|layers/1/mlp/down"


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  return make_tiny_hf("llama", str(tmp_path_factory.mktemp("hf_lora") / "llama"))


def _batch(seed=0, B=4, T=9, V=101):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, :3] = 0
  return jnp.asarray(tokens), jnp.asarray(mask)


def _perturb_adapters(model, seed=1, scale=0.2):
  """B starts at zero (adapted == base); give the adapters random values for the checks."""
  graphdef, adapters, _ = lora.split(model)
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


@nnx.jit
def _forward(model, tokens, mask):
  return model(tokens, attention_mask=mask)


def test_trainable_count_and_adapter_off_equals_base(hf_path):
  model = from_hf(hf_path)
  cfg = model.config
  tokens, mask = _batch()
  base = np.asarray(_forward(model, tokens, mask))
  lora.apply_lora(model, rank=4, alpha=8.0, targets=TARGETS)
  D, F, H, K, Dh, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                       cfg.head_dim, cfg.num_layers)
  r = 4
  expected = L * r * ((D + H * Dh) + (D + K * Dh)) + r * (F + D)  # q, v in every layer; one down
  assert lora.num_trainable(model) == expected
  assert model.layers[0].attn.q_lora_a.shape == (D, r)
  assert model.layers[0].attn.q_lora_b.shape == (r, H, Dh)
  assert not hasattr(model.layers[0].mlp, "down_lora_a") and hasattr(model.layers[1].mlp, "down_lora_a")
  # B = 0 at init: the adapted model is the base model.
  np.testing.assert_array_equal(np.asarray(_forward(model, tokens, mask)), base)
  _perturb_adapters(model)
  adapted = np.asarray(_forward(model, tokens, mask))
  assert np.abs(adapted - base).max() > 1e-2
  with lora.adapters_off(model):
    np.testing.assert_array_equal(np.asarray(_forward(model, tokens, mask)), base)
  np.testing.assert_array_equal(np.asarray(_forward(model, tokens, mask)), adapted)


def test_only_adapters_train_and_base_weights_stay(hf_path):
  model = lora.apply_lora(from_hf(hf_path), rank=2, alpha=4.0, targets=TARGETS)
  graphdef, adapters, base = lora.split(model)
  base_before = jax.tree.map(np.asarray, base)
  tokens, mask = _batch(seed=2)
  tx = optax.adam(1e-2)
  opt_state = tx.init(adapters)
  # The optimizer state holds only adapter-shaped moments.
  assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * lora.num_trainable(model) + 1

  def loss_fn(adapters):
    logits = nnx.merge(graphdef, adapters, base)(tokens, attention_mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

  @jax.jit
  def step(adapters, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  losses = []
  for _ in range(4):
    adapters, opt_state, loss = step(adapters, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base_before)
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adapters))  # B moved off 0


def test_merged_export_loads_in_transformers(hf_path, tmp_path):
  model = _perturb_adapters(lora.apply_lora(from_hf(hf_path), rank=3, alpha=6.0,
                                            targets=r".*attn/(q|k|v|o)|.*mlp/(gate|up|down)"))
  tokens, mask = _batch(seed=3)
  adapted = np.asarray(_forward(model, tokens, mask))
  merged = lora.merge_lora(model)
  assert not lora.has_lora(merged) and lora.num_trainable(merged) == 0
  out_dir = to_hf(merged, tmp_path / "merged")
  ref = torch_logits(load_hf_torch(out_dir), np.asarray(tokens), np.asarray(mask))
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(adapted[real], ref[real], atol=1e-4, rtol=1e-4)
  # to_hf of the adapted model itself writes the same merged weights.
  direct = to_hf(model, tmp_path / "direct")
  again = torch_logits(load_hf_torch(direct), np.asarray(tokens), np.asarray(mask))
  np.testing.assert_array_equal(again, ref)
  # The original checkpoint (base) differs: the export holds the merged weights.
  base = torch_logits(load_hf_torch(hf_path), np.asarray(tokens), np.asarray(mask))
  assert np.abs(base[real] - ref[real]).max() > 1e-2


def test_scanned_lora_matches_per_layer_lora(hf_path):
  flat = _perturb_adapters(lora.apply_lora(from_hf(hf_path), rank=2, alpha=2.0,
                                           targets=r".*attn/(q|o)|.*mlp/up"))
  scanned = lora.apply_lora(from_hf(hf_path, scan_layers=True), rank=2, alpha=2.0,
                            targets=r".*attn/(q|o)|.*mlp/up")
  assert lora.num_trainable(scanned) == lora.num_trainable(flat)
  L = flat.config.num_layers
  for mod, name in (("attn", "q"), ("attn", "o"), ("mlp", "up")):  # copy flat's adapters, stacked
    for part in ("a", "b"):
      attr = f"{name}_lora_{part}"
      stacked = jnp.stack([getattr(getattr(flat.layers[i], mod), attr).get_value() for i in range(L)])
      getattr(getattr(scanned.layers, mod), attr).set_value(stacked)
  tokens, mask = _batch(seed=4)
  want = np.asarray(_forward(flat, tokens, mask))
  np.testing.assert_allclose(np.asarray(_forward(scanned, tokens, mask)), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(_forward(lora.merge_lora(scanned), tokens, mask)), want, atol=1e-5)
  with pytest.raises(ValueError, match="only some layers"):
    lora.apply_lora(from_hf(hf_path, scan_layers=True), rank=2, alpha=2.0, targets=r"layers/0/attn/k")


def test_lora_model_shards_on_8_devices_with_same_logits(hf_path):
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  tokens, mask = _batch(seed=5)
  ref_model = _perturb_adapters(lora.apply_lora(from_hf(hf_path), rank=4, alpha=8.0, targets=TARGETS))
  want = np.asarray(_forward(ref_model, tokens, mask))
  model = lora.apply_lora(from_hf(hf_path, mesh=mesh), rank=4, alpha=8.0, targets=TARGETS)
  attn = model.layers[0].attn
  assert attn.q_lora_a[...].sharding.spec == P("fsdp", None)          # W's input axis (embed)
  assert attn.q_lora_b[...].sharding.spec == P(None, "tensor", None)  # W's output axes (heads)
  assert model.layers[1].mlp.down_lora_a[...].sharding.spec == P("tensor", None)
  nnx.update(model, jax.tree.map(lambda ref, cur: jax.device_put(ref, cur.sharding),
                                 nnx.state(ref_model, lora.TRAINABLE), nnx.state(model, lora.TRAINABLE)))
  shardings = sharding.model_shardings(model, mesh)  # the rule table agrees with the placement
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam):
      spec = sharding.variable_sharding(var, mesh).spec
      assert var.get_value().sharding.spec == spec, path
  del shardings
  got = np.asarray(_forward(model, jax.device_put(tokens, sharding.batch_sharding(mesh)),
                            jax.device_put(mask, sharding.batch_sharding(mesh))))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_input_one_line_errors():
  model = Transformer(ModelConfig.llama_tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"apply_lora: `lora.targets` 'nothing/.\*' matches no parameter path"):
    lora.apply_lora(model, rank=2, alpha=2.0, targets="nothing/.*")
  with pytest.raises(ValueError, match="`lora.rank`"):
    lora.apply_lora(model, rank=0, alpha=2.0, targets=".*")
  with pytest.raises(ValueError, match="`lora.targets`.*not a valid regex"):
    lora.apply_lora(model, rank=2, alpha=2.0, targets="(")
  with pytest.raises(ValueError, match="no LoRA adapters"):
    with lora.adapters_off(model):
      pass
  assert "layers/1/mlp/gate" in lora.adaptable_paths(model)


def _einsum_product(x, w, n_in):
  """The model's weight product as one einsum on the unreshaped weight (what qwix intercepts)."""
  ins, outs = "ijk"[:n_in], "pqr"[:w.ndim - n_in]
  return jnp.einsum(f"...{ins},{ins}{outs}->...{outs}", x, w)


def test_adapters_compute_what_qwix_computes(monkeypatch):
  """qwix's LoraProvider (what Tunix uses) on the attention modules is the reference.

  qwix adapts every weight its rule's *module* path reaches (here q, k, v, o of each
  attention module); the same targets by parameter path, with qwix's adapter values copied
  in, give the same logits. qwix finds a weight by tracing the einsum operand back to the
  parameter, which the model's flattened 2-D product (reshaped weights) hides from it, so
  the reference model contracts the unreshaped weight (the same sums).
  """
  qwix = pytest.importorskip("qwix")
  cfg = ModelConfig.llama_tiny()
  tokens, mask = _batch(seed=6, V=cfg.vocab_size)
  with monkeypatch.context() as patch:
    patch.setattr(transformer, "_weight_product", _einsum_product)
    reference = qwix.apply_lora_to_model(
        Transformer(cfg, rngs=nnx.Rngs(0)), qwix.LoraProvider(module_path=r"layers/\d+/attn", rank=2, alpha=4.0),
        tokens, rngs=nnx.Rngs(1))
    qwix_adapters = nnx.state(reference, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(qwix_adapters)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(reference, jax.tree.unflatten(
        treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
    want = np.asarray(_forward(reference, tokens, mask))
  ours = lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)), rank=2, alpha=4.0, targets=r".*attn/(q|k|v|o)")
  theirs = {tuple(p): v.get_value() for p, v in nnx.iter_graph(reference) if isinstance(v, nnx.LoRAParam)}
  mine = {tuple(p): v for p, v in nnx.iter_graph(ours) if isinstance(v, nnx.LoRAParam)}
  assert set(theirs) == set(mine)  # same names and shapes: <weight>_lora_a [in..., r], _lora_b [r, out...]
  for path, var in mine.items():
    assert var.get_value().shape == theirs[path].shape
    var.set_value(theirs[path])
  got = np.asarray(_forward(ours, tokens, mask))
  base = np.asarray(_forward(Transformer(cfg, rngs=nnx.Rngs(0)), tokens, mask))
  assert np.abs(want - base).max() > 1e-2
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
