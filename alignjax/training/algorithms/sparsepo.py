"""SparsePO: the authors' learned mask network (``SparseTrainer``) and fixed activation masks (MaPO).

Christopoulou et al. 2024, "SparsePO: Controlling Preference Alignment of LLMs
via Sparse Token Masks", arXiv:2410.05102, Sec. 3 (the masked token-level
objective with L1 terms on the masks). Per side, over the response
labels, ``U = sum_t m^u_t (log pi - log pi_ref)(y_t)`` and
``K = sum_t m^d_t KL_t(pi_ref || pi)``;
``loss = -log sigma(beta ((U_w - U_l) - (K_l - K_w))) + l1_u sum m^u + l1_d sum m^d``
(L1 over the response labels of both sides; no stop-gradient on either KL, as
TDPO1); logged rewards ``beta (U - K)``, as ``SparseTrainer.get_batch_loss_metrics``
and ``MAPOTrainer`` of ``huawei-noah/HEBO/SparsePO/src/trainers/`` compute them
(their ``token_kl = sum p_ref (log pi - log pi_ref) = -KL``).

``mask="learned"`` (default: the authors' main method, ``SparseTrainer`` with
``mask_model="simple_all"``, ``src/masks/mask_models.py::SimpleMaskAllLayers``):
the masks come from a small network trained jointly with the policy
(:class:`MaskNetwork`). Its inputs are every layer's output of the FROZEN
reference at the positions that predict the labels -- transformers'
``output_hidden_states[1:]`` (embeddings excluded; the last one after the final
norm), ``[:, :-1]`` -- each through one shared LayerNorm, a per-layer
``Linear(d, 1)`` and ReLU; a bias-free ``Linear(L, 1)`` mixes the layers, then
ReLU. ``kl_mask="common"`` (sparse-common, their ``rw_kl_independent=False``
default) uses one network for both masks and halves both L1 coefficients
(``l1_reward``, ``l1_kl``: their ``l1_norm_param_u`` / ``_d``, default 0);
``"independent"`` (sparse-indp) trains a second network for ``m^d``. As the
authors' ``create_optimizer``, the network's Linear weights have their own AdamW
weight decay ``mask_weight_decay`` (0.01) and its biases and LayerNorm none;
the policy keeps ``config.weight_decay``. Initialised as transformers'
``_init_weights`` fills the mask keys missing from the pretrained checkpoint:
Linear weights ``N(0, 0.02)``, biases 0, LayerNorm (1, 0); LayerNorm epsilon
is the model's ``norm_eps`` (theirs: ``config.layer_norm_eps``). Dropout: their
``mask_dropout=0.01`` is switched off by their default ``disable_dropout=True``
(TRL's ``disable_dropout_in_model`` zeroes every Dropout of the policy, the mask
network's included), so the default here is 0 and a value > 0 is refused (the
functional step carries no dropout rng). The run trains a
:class:`SparsePOModel` (the policy Transformer with the network beside it, the
``make_model`` hook) and saves the plain policy as its final model (``export``).
Online reference, per-layer models (``model.scan_layers=False``), no LoRA. The
masks of their ``mask_on_reward``/``mask_on_kl`` flags are both on, as by default.

Fixed masks (their ``MAPOTrainer``, Sec. 3.2, model activation-based masks): ONE
mask for both terms, computed from the reference's activations at the position
that predicts the token (no gradient), with the authors' ``zn_rescale`` mapping:
the feature-mean of the activation, z-normalised and min-max rescaled over the
row's response tokens, i.e. ``(a_t - min a) / (max a - min a)`` in [0, 1] (the
z-normalisation cancels), averaged over activation sources:

* ``"activations"``: the sources this library's model exposes of the authors'
  default ``activation_hook="all"`` -- the final normed hidden states (their
  ``resid.post_ln_f`` hook) and the logits; their MLP, attention and per-layer
  residual hooks are not available here (a documented difference);
* ``"hidden"`` / ``"logits"``: one source;
* ``"uniform"``: every mask 1 (their ``activation_hook="uniform"``): TDPO1.

Where the authors' code divides by zero (a row with one response token, or
constant activations) the fixed mask here is 1. The loss from full logits is
:func:`alignjax.losses.sparsepo_loss`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base

FIXED_MASKS = ("activations", "hidden", "logits", "uniform")
MASKS = ("learned",) + FIXED_MASKS
KL_MASKS = ("common", "independent")
MASK_NETS = ("mask", "kl_mask")          # the SparsePOModel attributes holding the mask networks
DECAYED = ("layer_kernel", "mixer")      # their Linear weights (biases and LayerNorm: no decay)


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsePOHParams:
  """SparsePO hyper-parameters (the authors' ``SparseConfig`` defaults)."""
  beta: float = base.field(0.1, "inverse temperature of the log-ratio difference (> 0)")
  mask: str = base.field("learned", "SparsePO token masks: 'learned' (the authors' mask network on every reference "
                         "layer, trained with the policy), or fixed from the reference's activations (MaPO): "
                         "'activations' (final hidden states and logits), 'hidden', 'logits', 'uniform' (all 1: TDPO1)")
  kl_mask: str = base.field("common", "learned masks: 'common' (one network for the reward and KL masks, L1 "
                            "coefficients halved: sparse-common) or 'independent' (two networks: sparse-indp)")
  l1_reward: float = base.field(0.0, "learned masks: L1 coefficient of the reward mask (>= 0; l1_norm_param_u)",
                                static=True)
  l1_kl: float = base.field(0.0, "learned masks: L1 coefficient of the KL mask (>= 0; l1_norm_param_d)",
                            static=True)
  mask_weight_decay: float = base.field(0.01, "learned masks: AdamW weight decay of the mask network's weights (>= 0)")
  mask_dropout: float = base.field(0.0, "learned masks: dropout of the mask network (only 0: the authors' default "
                                   "disable_dropout=True switches theirs off; the step carries no dropout rng)")

  def __post_init__(self):
    base.check(_number(self.beta) and self.beta > 0, f"loss: `beta` must be a finite number > 0, got {self.beta}.")
    base.check(self.mask in MASKS, f"loss: `mask` must be one of {list(MASKS)}, got {self.mask!r}.")
    base.check(self.kl_mask in KL_MASKS, f"loss: `kl_mask` must be one of {list(KL_MASKS)}, got {self.kl_mask!r}.")
    for name in ("l1_reward", "l1_kl", "mask_weight_decay"):
      v = getattr(self, name)
      base.check(_number(v) and v >= 0, f"loss: `{name}` must be a finite number >= 0, got {v}.")
    base.check(self.mask_dropout == 0, f"loss: `mask_dropout` must be 0 (the training step carries no dropout rng; "
               f"the authors' disable_dropout=True also switches it off), got {self.mask_dropout}.")
    if self.mask != "learned":
      base.check(self.kl_mask == "common" and self.l1_reward == 0 and self.l1_kl == 0,
                 f"loss: `kl_mask`, `l1_reward` and `l1_kl` apply to mask='learned', not the fixed mask {self.mask!r}.")


# ---------------------------------------------------------------------------- the learned masks

def _param(value, names):
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class MaskNetwork(nnx.Module):
  """The authors' ``SimpleMaskAllLayers`` (relu layer and mixer activations, as their defaults).

  Christopoulou et al. 2024, arXiv:2410.05102, Sec. 3 (learned masks), as
  ``huawei-noah/HEBO/SparsePO/src/masks/mask_models.py`` computes it:
  ``m = relu(sum_l v_l relu(w_l . LN(h_l) + b_l))`` with one LayerNorm shared by
  the layers, ``w_l`` the weight of layer ``l``'s ``Linear(d, 1)`` (rows of
  ``layer_kernel [L, D]``, biases ``layer_bias [L]``) and ``v`` the bias-free
  ``Linear(L, 1)`` mixer ``[L]``. Math in float32. Dropout is not applied (see
  the module docstring).
  """

  def __init__(self, num_layers: int, hidden_size: int, *, eps: float, rngs, param_dtype="float32"):
    dt = jnp.dtype(param_dtype)
    normal = lambda shape: (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dt)
    self.eps = float(eps)
    self.norm_scale = _param(jnp.ones((hidden_size,), dt), ("norm",))
    self.norm_bias = _param(jnp.zeros((hidden_size,), dt), ("norm",))
    self.layer_kernel = _param(normal((num_layers, hidden_size)), ("layers", "norm"))
    self.layer_bias = _param(jnp.zeros((num_layers,), dt), ("layers",))
    self.mixer = _param(normal((num_layers,)), ("layers",))

  def __call__(self, hiddens: Sequence[jax.Array]) -> jax.Array:
    """``[N, T]`` non-negative masks from ``num_layers`` hidden states ``[N, T, D]``."""
    kernel = self.layer_kernel[...].astype(jnp.float32)
    if len(hiddens) != kernel.shape[0]:
      raise ValueError(f"MaskNetwork: expected {kernel.shape[0]} layers' hidden states, got {len(hiddens)}.")
    scale, shift = (v[...].astype(jnp.float32) for v in (self.norm_scale, self.norm_bias))
    bias, mixer = self.layer_bias[...].astype(jnp.float32), self.mixer[...].astype(jnp.float32)
    out = 0.0
    for l, h in enumerate(hiddens):   # one layer at a time: no stacked float32 [N, T, L, D]
      x = h.astype(jnp.float32)
      mean = x.mean(-1, keepdims=True)
      x = (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + self.eps)
      out = out + mixer[l] * jax.nn.relu((x * scale + shift) @ kernel[l] + bias[l])
    return jax.nn.relu(out)


class SparsePOModel(nnx.Module):
  """The policy Transformer with SparsePO's mask network(s) beside it: what a learned-mask run trains.

  Calls, ``unembed`` and ``config`` are the policy's, so the SFT warm-up and the
  steps see a language model; ``mask`` (and ``kl_mask`` for sparse-indp, else
  None) are :class:`MaskNetwork` s over the policy's ``num_layers`` layers.
  """

  def __init__(self, policy, *, rngs, independent: bool = False):
    cfg = policy.config
    self.config = cfg
    self.policy = policy
    net = lambda: MaskNetwork(cfg.num_layers, cfg.hidden_size, eps=cfg.norm_eps, rngs=rngs,
                              param_dtype=cfg.param_dtype)
    self.mask = net()
    self.kl_mask = net() if independent else None

  def __call__(self, *args, **kwargs):
    return self.policy(*args, **kwargs)

  def unembed(self, hidden: jax.Array) -> jax.Array:
    return self.policy.unembed(hidden)


def make_model(policy, rngs, hparams=None):
  """A :class:`SparsePOModel` on ``policy`` for ``mask="learned"`` (fresh mask networks), else ``policy``."""
  from alignjax.models import Transformer  # pylint: disable=import-outside-toplevel
  if hparams is None or hparams.mask != "learned" or isinstance(policy, SparsePOModel):
    return policy
  if not isinstance(policy, Transformer):
    raise TypeError(f"sparsepo.make_model: `policy` must be an alignjax Transformer, got {type(policy).__name__}.")
  return SparsePOModel(nnx.clone(policy), rngs=rngs, independent=hparams.kl_mask == "independent")


def export(model):
  """The policy Transformer of a :class:`SparsePOModel` (the run's final policy); other models as they are."""
  return model.policy if isinstance(model, SparsePOModel) else model


def param_decay(hp, path) -> Optional[float]:
  """The mask networks' AdamW decay: ``mask_weight_decay`` on their Linear weights, 0 on biases and LayerNorm.

  As the authors' ``SparseTrainer.create_optimizer``: the ``*_mask`` parameters
  among transformers' decay parameter names (no bias, no LayerNorm) form a group
  with ``mask_weight_decay``. None (the policy's ``config.weight_decay``) elsewhere.
  """
  if not path or path[0] not in MASK_NETS:
    return None
  return float(hp.mask_weight_decay) if path[-1] in DECAYED else 0.0


def validate_run(cfg) -> None:
  """Learned masks: no LoRA (the mask networks train beside the full policy), per-layer models."""
  if getattr(cfg.loss, "mask", None) != "learned":
    return
  base.check(not cfg.lora.enabled, "config.lora: SparsePO's learned masks (loss.mask='learned') train a mask "
             "network beside the full policy; use a fixed loss.mask or no LoRA.")
  base.check(not cfg.model.scan_layers, "config.model.scan_layers must be False for SparsePO's learned masks "
             "(loss.mask='learned' reads every layer's output of the reference).")


# ---------------------------------------------------------------------------- fixed masks (MaPO)

def zn_rescale(activation, mask):
  """The authors' ``zn_rescale`` of a ``[N, T]`` feature-mean activation over the ``mask`` positions, in [0, 1]."""
  on = mask > 0
  lo = jnp.min(jnp.where(on, activation, jnp.inf), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(on, activation, -jnp.inf), axis=-1, keepdims=True)
  spread = hi - lo
  ok = jnp.isfinite(spread) & (spread > 0)
  scaled = jnp.where(ok, (activation - jnp.where(ok, lo, 0.0)) / jnp.where(ok, spread, 1.0), 1.0)
  return scaled * mask


def activation_masks(mask: str, reference_hidden, reference_unembed, response, *, chunk_size: int):
  """``[N, T]`` fixed token masks (no gradient) from the reference's label-aligned hidden states."""
  if mask == "uniform":
    return response
  sources = []
  if mask in ("activations", "hidden"):
    sources.append(jnp.mean(reference_hidden.astype(jnp.float32), axis=-1))
  if mask in ("activations", "logits"):
    sources.append(L.chunked_map(lambda h: jnp.mean(reference_unembed(h).astype(jnp.float32), axis=-1),
                                 (reference_hidden,), chunk_size=chunk_size))
  masks = [zn_rescale(a, response) for a in sources]
  return jax.lax.stop_gradient(sum(masks) / len(masks))


# ---------------------------------------------------------------------------- objective

def _learned_masks(hp, ctx: base.Context, tokens, attention):
  """``(m^u, m^d, reference hidden [N, T-1, D], reference unembed)`` of the policy's mask network(s)."""
  model = ctx.policy
  if not isinstance(model, SparsePOModel):
    raise ValueError("sparsepo: loss.mask='learned' trains the mask network beside the policy; the policy must be "
                     f"a SparsePOModel (sparsepo.make_model), got {type(model).__name__}.")
  if (hp.kl_mask == "independent") != (model.kl_mask is not None):
    raise ValueError(f"sparsepo: loss.kl_mask={hp.kl_mask!r} but the SparsePOModel was built with "
                     f"{'two mask networks' if model.kl_mask is not None else 'one mask network'}.")
  ref = ctx.frozen["reference"]
  layers = [jax.lax.stop_gradient(h[:, :-1]) for h in ref(tokens, attention, all_hidden=True)]
  reward = model.mask(layers)
  kl = model.kl_mask(layers) if model.kl_mask is not None else reward
  return reward, kl, layers[-1], ref.unembed


def objective(hp, ctx: base.Context, batch) -> base.ObjectiveOutput:
  """SparsePO per pair (Christopoulou et al. 2024, arXiv:2410.05102, Sec. 3; see the module docstring).

  ``-log sigma(beta ((U_w - U_l) - (K_l - K_w)))`` plus, for learned masks, the
  L1 terms of both sides (halved for one common mask, as ``SparseTrainer``).
  Metrics: the preference metrics, ``sparsepo/{,kl_}mask_mean_*`` and
  ``sparsepo/{,kl_}sparsity_*`` (share of response labels whose mask is 0; ``kl_``
  for sparse-indp), ``sparsepo/{reward,kl}_mask_l1`` and ``kl/*_masked``.
  """
  tokens, attention, response = base.pair_inputs(batch)
  h, unembed = base.features(ctx.policy, tokens, attention)
  if hp.mask == "learned":
    m_u, m_d, h_ref, unembed_ref = _learned_masks(hp, ctx, tokens, attention)
    common = ctx.policy.kl_mask is None
    m_u = m_u * response
    m_d = m_u if common else m_d * response
    halve = 0.5 if common else 1.0    # sparse-common: one mask counted in both L1 terms
    l1_u, l1_d = halve * hp.l1_reward, halve * hp.l1_kl
  else:
    h_ref, unembed_ref = base.features(ctx.frozen["reference"], tokens, attention)
    h_ref = jax.lax.stop_gradient(h_ref[:, :-1])
    m_u = m_d = activation_masks(hp.mask, h_ref, unembed_ref, response, chunk_size=ctx.chunk_size)
    l1_u = l1_d = 0.0
  st = L.chunked_token_stats(h[:, :-1], tokens[:, 1:], unembed, chunk_size=ctx.chunk_size,
                             reference_hidden=h_ref, reference_unembed=unembed_ref,
                             needed=response > 0)   # the masks are 0 off the response
  u = jnp.sum(m_u * (st.logprobs - st.reference_logprobs), axis=-1)
  k = jnp.sum(m_d * st.kl, axis=-1)
  (u_c, u_r), (k_c, k_r) = batch_lib.split_pair(u), batch_lib.split_pair(k)
  logits = (u_c - u_r) - (k_r - k_c)
  losses = -jax.nn.log_sigmoid(hp.beta * logits)
  norm_u, norm_d = (sum(batch_lib.split_pair(jnp.sum(jnp.abs(m), axis=-1))) for m in (m_u, m_d))
  if l1_u or l1_d:
    losses = losses + l1_u * norm_u + l1_d * norm_d
  sg = jax.lax.stop_gradient
  chosen_rewards, rejected_rewards = sg(hp.beta * (u_c - k_c)), sg(hp.beta * (u_r - k_r))
  out = L.PreferenceOutput(chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                           (chosen_rewards > rejected_rewards).astype(jnp.float32), sg(logits))
  metrics = base.preference_metrics(out, base.reduce(st.logprobs, response, False))
  count = jnp.maximum(response.sum(axis=-1), 1.0)
  for name, m in (("", m_u),) + ((("kl_", m_d),) if m_d is not m_u else ()):
    mean = sg(m).sum(axis=-1) / count
    zero = ((m <= 0) & (response > 0)).sum(axis=-1) / count
    (mm_c, mm_r), (z_c, z_r) = batch_lib.split_pair(mean), batch_lib.split_pair(zero)
    metrics.update({f"sparsepo/{name}mask_mean_chosen": mm_c, f"sparsepo/{name}mask_mean_rejected": mm_r,
                    f"sparsepo/{name}sparsity_chosen": z_c, f"sparsepo/{name}sparsity_rejected": z_r})
  metrics.update({"kl/chosen_masked": sg(k_c), "kl/rejected_masked": sg(k_r),
                  "sparsepo/reward_mask_l1": sg(norm_u), "sparsepo/kl_mask_l1": sg(norm_d)})
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), metrics)


base.register(base.Algorithm(
    "sparsepo", SparsePOHParams, objective, needs="reference_logits", make_model=make_model, export=export,
    param_decay=param_decay, validate_run=validate_run,
    description="SparsePO (Christopoulou et al. 2024): the authors' learned mask network (default) or fixed "
                "activation masks (MaPO), online reference",
    study={"methods": {"sparsepo": {}, "sparsepo_mapo": {"mask": "activations"}}}))
