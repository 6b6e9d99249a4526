"""SparsePO's learned mask network (the authors' ``SparseTrainer``) against float64 NumPy and transformers.

References: the authors' ``SimpleMaskAllLayers`` (``mask_models.py``) written out
in float64 NumPy with explicit loops (LayerNorm with the biased variance, per-layer
``Linear(d, 1)`` + ReLU, bias-free mixer + ReLU); its inputs are transformers'
``output_hidden_states[1:]`` of the ``to_hf`` reference (not this library's
forward); the loss is ``SparseTrainer.get_batch_loss_metrics`` in NumPy (masked
log-ratios and ``KL(pi_ref || pi)`` from plain logits, L1 halved for one common
mask); with every mask 1 it is TDPO1 of tests/numpy_reference.py; one AdamW update
is checked against the NumPy update of Loshchilov & Hutter (arXiv:1711.05101).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import models
from alignjax.sharding import path_key
from alignjax.training import algorithms, config as config_lib, loop, reference
from alignjax.training.algorithms import sparsepo
from tests import numpy_reference as ref_np
from tests.algorithm_helpers import TINY_RUN, accumulated_loss, tiny_run
from tests.hf_fixtures import load_hf_torch
from tests.test_steps import make_batch, numpy_loss, plain_logits, tiny_model

SIDES = ("chosen", "rejected")


def _randomize(net, seed, *, scale=1.0):
  """Mask-network weights of order 1 (the 0.02 init gives masks ~1e-4), biases partly negative."""
  rng = np.random.default_rng(seed)
  d = net.layer_kernel.shape[-1]
  net.layer_kernel[...] = jnp.asarray(rng.normal(0, scale / np.sqrt(d), net.layer_kernel.shape), jnp.float32)
  net.layer_bias[...] = jnp.asarray(rng.normal(0.2, 0.5, net.layer_bias.shape), jnp.float32)
  net.mixer[...] = jnp.asarray(rng.normal(0.5, 0.5, net.mixer.shape), jnp.float32)
  net.norm_scale[...] = jnp.asarray(rng.normal(1.0, 0.1, net.norm_scale.shape), jnp.float32)
  net.norm_bias[...] = jnp.asarray(rng.normal(0.0, 0.1, net.norm_bias.shape), jnp.float32)


def numpy_mask(net, hiddens):
  """``SimpleMaskAllLayers.forward`` (relu/relu, dropout off) in float64 with loops: ``[N, T]``."""
  W = np.asarray(net.layer_kernel[...], np.float64)
  b = np.asarray(net.layer_bias[...], np.float64)
  v = np.asarray(net.mixer[...], np.float64)
  g, beta = np.asarray(net.norm_scale[...], np.float64), np.asarray(net.norm_bias[...], np.float64)
  N, T, _ = hiddens[0].shape
  out = np.zeros((N, T))
  for n in range(N):
    for t in range(T):
      per_layer = []
      for l, h in enumerate(hiddens):
        x = np.asarray(h[n, t], np.float64)
        y = (x - x.mean()) / np.sqrt(((x - x.mean()) ** 2).mean() + net.eps) * g + beta
        per_layer.append(max(0.0, float(y @ W[l] + b[l])))
      out[n, t] = max(0.0, float(np.dot(v, per_layer)))
  return out


def hf_hidden_states(model, tokens, attention, tmp_path, name):
  """transformers' ``hidden_states[1:]`` of the ``to_hf`` model (float64), position ids as alignjax counts them."""
  import torch
  hf = load_hf_torch(models.to_hf(model, str(tmp_path / name)))
  pos = torch.tensor(np.clip(np.cumsum(attention, -1) - 1, 0, None))
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(tokens.astype(np.int64)), attention_mask=torch.tensor(attention.astype(np.int64)),
             position_ids=pos, output_hidden_states=True)
  return [h.double().numpy() for h in out.hidden_states[1:]]


def numpy_sparsepo(policy, ref_model, wrapper, batch, hidden, *, beta, l1_u, l1_d):
  """Per-pair losses of the authors' ``get_batch_loss_metrics`` (mask_on_reward/kl, L1 as given): float64."""
  common = wrapper.kl_mask is None
  terms = {}
  for side in SIDES:
    tokens, att, resp = (batch[f"{side}_{f}"] for f in ("tokens", "attention", "response"))
    layers = [h[:, :-1] for h in hidden[side]]
    m_u = numpy_mask(wrapper.mask, layers)
    m_d = m_u if common else numpy_mask(wrapper.kl_mask, layers)
    zp = plain_logits(policy, tokens, att)[:, :-1]
    zr = plain_logits(ref_model, tokens, att)[:, :-1]
    labels, m = tokens[:, 1:], resp[:, 1:]
    u, k, nu, nd = (np.zeros(len(tokens)) for _ in range(4))
    for b in range(len(tokens)):
      for t in range(labels.shape[1]):
        if m[b, t]:
          lp, lr = ref_np.log_softmax(zp[b, t]), ref_np.log_softmax(zr[b, t])
          u[b] += m_u[b, t] * (lp[labels[b, t]] - lr[labels[b, t]])
          k[b] += m_d[b, t] * ref_np.kl(zr[b, t], zp[b, t])
          nu[b] += abs(m_u[b, t])
          nd[b] += abs(m_d[b, t])
    terms[side] = (u, k, nu, nd)
  (u_c, k_c, nu_c, nd_c), (u_r, k_r, nu_r, nd_r) = terms["chosen"], terms["rejected"]
  half = 0.5 if common else 1.0
  return np.array([-ref_np.log_sigmoid(beta * x) for x in (u_c - u_r) - (k_r - k_c)]) + half * (
      l1_u * (nu_c + nu_r) + l1_d * (nd_c + nd_r))


@pytest.fixture(scope="module")
def setup():
  policy, ref_model = tiny_model(80, num_layers=2), tiny_model(81, num_layers=2)
  batch = make_batch(np.random.default_rng(12), B=4, T=12)
  return policy, ref_model, batch


def _wrapper(policy, kl_mask, seed):
  hp = algorithms.loss("sparsepo", kl_mask=kl_mask).hparams
  w = sparsepo.make_model(policy, nnx.Rngs(seed), hp)
  _randomize(w.mask, seed)
  if w.kl_mask is not None:
    _randomize(w.kl_mask, seed + 1)
  return w


def test_mask_network_forward_matches_numpy():
  net = sparsepo.MaskNetwork(3, 16, eps=1e-5, rngs=nnx.Rngs(0))
  _randomize(net, 1)
  net.mixer[...] = jnp.asarray([1.0, -1.5, 0.8])    # a negative mix: the outer ReLU cuts some positions
  rng = np.random.default_rng(2)
  hiddens = [rng.normal(0, 1 + l, (2, 5, 16)).astype(np.float32) for l in range(3)]
  got = np.asarray(net([jnp.asarray(h) for h in hiddens]))
  want = numpy_mask(net, hiddens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert (want == 0).any() and (want > 0).any()    # the ReLUs are exercised both ways


def test_authors_initialisation():
  """transformers' ``_init_weights`` for the missing mask keys: Linear N(0, 0.02), zero biases, LayerNorm (1, 0)."""
  net = sparsepo.MaskNetwork(4, 256, eps=1e-5, rngs=nnx.Rngs(0))
  kernel = np.asarray(net.layer_kernel[...])
  assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
  np.testing.assert_array_equal(net.layer_bias[...], 0.0)
  np.testing.assert_array_equal(net.norm_scale[...], 1.0)
  np.testing.assert_array_equal(net.norm_bias[...], 0.0)
  assert net.mixer.shape == (4,)


@pytest.mark.parametrize("kl_mask", ["common", "independent"])
def test_learned_loss_matches_numpy(setup, kl_mask, tmp_path):
  policy, ref_model, batch = setup
  w = _wrapper(policy, kl_mask, 5)
  loss = algorithms.loss("sparsepo", beta=0.6, kl_mask=kl_mask, l1_reward=0.03, l1_kl=0.02)
  got, metrics = accumulated_loss(loss, w, {"reference": ref_model}, batch)
  hidden = {s: hf_hidden_states(ref_model, batch[f"{s}_tokens"], batch[f"{s}_attention"], tmp_path, s)
            for s in SIDES}
  # The reference's every-layer outputs are transformers' hidden_states[1:] (the last one final-normed).
  mine = ref_model(jnp.asarray(batch["chosen_tokens"]), jnp.asarray(batch["chosen_attention"]), all_hidden=True)
  assert len(mine) == 2
  for a, b in zip(mine, hidden["chosen"]):
    att = batch["chosen_attention"]
    np.testing.assert_allclose(np.asarray(a)[att], b[att], rtol=2e-4, atol=2e-5)
  want = numpy_sparsepo(policy, ref_model, w, batch, hidden, beta=0.6, l1_u=0.03, l1_d=0.02)
  np.testing.assert_allclose(got, want.mean(), rtol=2e-4, atol=2e-5)
  mask_c = numpy_mask(w.mask, [h[:, :-1] for h in hidden["chosen"]])[0::2]   # micro-batch 0: rows 0, 2
  m = batch["chosen_response"][:, 1:][0::2]
  np.testing.assert_allclose(metrics["sparsepo/mask_mean_chosen"], (mask_c * m).sum(-1) / m.sum(-1),
                             rtol=2e-4, atol=2e-5)
  assert ("sparsepo/kl_mask_mean_chosen" in metrics) == (kl_mask == "independent")


def _flat(tree):
  """``{path tuple: array}`` of a parameter tree."""
  return {path_key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _objective_fn(hp, model, ref_model, batch):
  """``fn(params) -> mean loss`` of the objective with ``model``'s parameters replaced."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  spec = reference.online(ref_model)[0]

  def fn(params):
    ctx = algorithms.Context(nnx.merge(graphdef, params, rest), {"reference": ref_model}, spec, 4)
    return jnp.mean(sparsepo.objective(hp, ctx, batch).losses)
  return fn


def test_mask_gradients_and_unit_masks_equal_tdpo1(setup):
  policy, ref_model, batch = setup
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  hp = algorithms.loss("sparsepo", beta=0.6, l1_reward=0.01).hparams
  w = _wrapper(policy, "common", 7)
  grads = _flat(jax.jit(jax.grad(_objective_fn(hp, w, ref_model, jbatch)))(nnx.state(w, nnx.Param)))
  for name in ("layer_kernel", "layer_bias", "mixer", "norm_scale"):
    assert np.abs(grads[("mask", name)]).max() > 0, name
  assert np.abs(grads[("policy", "embed")]).max() > 0
  # Masks fixed at 1 (kernel 0, bias 1, mixer 1/L), no L1: TDPO1 exactly (no stop-gradient on either KL).
  unit = nnx.clone(w)
  unit.mask.layer_kernel[...] = jnp.zeros_like(unit.mask.layer_kernel[...])
  unit.mask.layer_bias[...] = jnp.ones_like(unit.mask.layer_bias[...])
  unit.mask.mixer[...] = jnp.full_like(unit.mask.mixer[...], 0.5)
  hp0 = dataclasses.replace(hp, l1_reward=0.0)
  value = jax.jit(_objective_fn(hp0, unit, ref_model, jbatch))(nnx.state(unit, nnx.Param))
  np.testing.assert_allclose(float(value), numpy_loss("tdpo1", policy, ref_model, batch, beta=0.6), rtol=2e-5,
                             atol=2e-6)


def test_trains_end_to_end_and_saves_a_plain_policy(tmp_path):
  algo = algorithms.get("sparsepo")
  captured = {}

  def capture(model):
    captured["mask"] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.mask, nnx.Param)))
    return algo.export(model)
  algorithms.register(dataclasses.replace(algo, export=capture), replace=True)
  try:
    out = tiny_run(tmp_path, "sparsepo", **{"model.num_layers": 2, "sft.steps": 1, "dpo.learning_rate": 1e-2,
                                            "loss.mask_weight_decay": 0.1})
  finally:
    algorithms.register(algo, replace=True)
  assert out["steps"] == 4 and np.isfinite(out["eval_after"]["loss"])
  assert "sparsepo/mask_mean_chosen" in out["eval_after"]
  cfg = config_lib.build(None, **{**TINY_RUN, "loss.name": "sparsepo", "model.num_layers": 2})
  init = sparsepo.MaskNetwork(2, cfg.model.hidden_size, eps=1e-5, rngs=nnx.Rngs(cfg.seed + 1))
  init = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init, nnx.Param)))
  # Biases have no weight decay: they move only through the loss's gradient.
  assert not np.allclose(captured["mask"]["layer_bias"], init["layer_bias"])
  assert not np.allclose(captured["mask"]["mixer"], init["mixer"])
  final = loop.load_policy(str(tmp_path))
  assert isinstance(final, models.Transformer) and not hasattr(final, "mask")


def _adamw_numpy(p, grads, lrs, rate, b1=0.9, b2=0.999, eps=1e-8):
  p, m, v = np.asarray(p, np.float64), 0.0, 0.0
  for i, (g, lr) in enumerate(zip(grads, lrs), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = (m / (1 - b1 ** i)) / (np.sqrt(v / (1 - b2 ** i)) + eps) + rate * p
    p = p - lr * update
  return p


@pytest.mark.parametrize("owned", [True, False])
def test_mask_weight_decay_matches_numpy_adamw(owned):
  """The preference phase decays mask weights at mask_weight_decay (biases, LayerNorm: 0), the policy at
  config.weight_decay; the SFT phase (owned=False) leaves the mask network undecayed."""
  hp = algorithms.loss("sparsepo", mask_weight_decay=0.3).hparams
  model = sparsepo.make_model(tiny_model(3, num_layers=2, vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_heads=2, num_kv_heads=1, head_dim=4), nnx.Rngs(1), hp)
  params = nnx.state(model, nnx.Param)
  phase = config_lib.PhaseConfig(steps=10, learning_rate=0.05, warmup_steps=1)
  tx = loop.optimizer(phase, weight_decay=0.1,
                      decay=loop._decay(algorithms.get("sparsepo"), hp, 0.1, owned=owned))  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params) for _ in range(2)]
  state, p = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  lrs = [0.0, 0.05]          # the warm-up schedule: 0 at the first update, the peak at the second
  want_rates = {("mask", "layer_kernel"): 0.3 if owned else 0.0, ("mask", "mixer"): 0.3 if owned else 0.0,
                ("mask", "layer_bias"): 0.0, ("mask", "norm_scale"): 0.0, ("mask", "norm_bias"): 0.0,
                ("policy", "embed"): 0.1, ("policy", "final_norm", "scale"): 0.1}
  got, start, gs = _flat(p), _flat(params), [_flat(g) for g in grads]
  for path, rate in want_rates.items():
    want = _adamw_numpy(start[path], [g[path] for g in gs], lrs, rate)
    np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=2e-6, err_msg=str(path))   # decay: ~6e-4


def test_bad_settings_raise_one_line_errors():
  for kwargs, match in (({"mask_dropout": 0.01}, "mask_dropout"), ({"mask": "hidden", "l1_reward": 0.1}, "l1_reward"),
                        ({"kl_mask": "both"}, "kl_mask"), ({"mask_weight_decay": -1.0}, "mask_weight_decay")):
    with pytest.raises(ValueError, match=match) as e:
      algorithms.loss("sparsepo", **kwargs)
    assert "\n" not in str(e.value)
  for field, match in (({"model.scan_layers": True}, "scan_layers"), ({"lora.rank": 4}, "lora")):
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      config_lib.build(None, **{"loss.name": "sparsepo", **field})
    assert "\n" not in str(e.value)
  config_lib.build(None, **{"loss.name": "sparsepo", "loss.mask": "activations", "model.scan_layers": True})


def test_mask_default_changes_only_sparsepo_identities():
  """loss.mask's default moved from 'activations' to 'learned': stored runs of other methods still match."""
  for name, differs in (("dpo", False), ("sparsepo", True)):
    cfg = config_lib.build(None, **{**TINY_RUN, "loss.name": name})
    stored = dict(config_lib.identity(cfg), **{"loss.mask": "activations"})
    diff = config_lib.identity_diff(stored, cfg)
    assert diff == (["config.loss.mask: stored 'activations', given 'learned'"] if differs else []), diff
