"""Training objectives: ONE table from loss name to :class:`Objective`.

An objective turns a policy model and a preference batch into per-example
losses. It declares what else it needs, and the step supplies it:

* ``"reference_logps"``: reference sequence log-probabilities of chosen and
  rejected responses (DPO family, GPO functions). Any reference mode works:
  online (a frozen reference model), precomputed (read from the batch) or
  reference-free (zero, SimPO-style).
* ``"reference_logits"``: the full reference next-token distribution at every
  response position (TDPO1/2 need ``KL(pi_ref || pi)`` per token); online only.
* ``"teachers"``: frozen ``dpo`` and ``contrast`` models (AlignDistil).
* ``"none"``: nothing but the policy (SFT).

Every objective returns ``ObjectiveOutput(losses [B], weights [B], metrics)``
with per-example metrics ``[B]``; the step reduces ``sum(w * l) / sum(w)`` over
the whole (possibly accumulated) batch, so gradient accumulation over micro-
batches equals one large batch exactly.

Papers:
  * DPO: Rafailov et al. 2023, arXiv:2305.18290, Eq. 7; cDPO (Mitchell 2023);
    robust DPO: Chowdhury et al. 2024, arXiv:2403.00409, Eq. 6.
  * GPO: Tang et al. 2024, "Generalized Preference Optimization", arXiv:2402.05749,
    Eq. 4 (IPO: Azar et al. 2023, arXiv:2310.12036; SLiC: Zhao et al. 2023,
    arXiv:2305.10425).
  * TDPO: Zeng et al. 2024, "Token-level Direct Preference Optimization",
    arXiv:2404.11999, Eqs. 17-18.
  * AlignDistil: Zhang et al. 2025, arXiv:2503.02832 (ACL 2025).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib

NEEDS = ("reference_logps", "reference_logits", "teachers", "none")
ALIGNDISTIL_MODES = ("aligndistil", "theorem1", "theorem1_contrast", "theorem1_adaptive")
TEACHER_NAMES = ("dpo", "contrast")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
  """Which objective to train with, and its hyper-parameters (validated here).

  Attributes:
    name: a key of :data:`OBJECTIVES` (``dpo``, GPO functions and aliases,
      ``tdpo1``/``tdpo2``, ``aligndistil``, ``sft``).
    beta: inverse temperature / scale of the log-ratio (> 0).
    label_smoothing: cDPO / robust-DPO flip probability (``dpo`` only).
    robust: robust-DPO estimator (``dpo`` only).
    alpha: TDPO2 weight of the rejected sequential KL (>= 0).
    average_log_prob: token-average instead of sum the sequence terms.
    beta2: AlignDistil ``beta2`` (> 0).
    mode: AlignDistil teacher mode, one of :data:`ALIGNDISTIL_MODES`.
    temperature: AlignDistil teacher temperature (> 0).
    length_normalize: AlignDistil per-example mean over tokens (else sum).
    on_policy: AlignDistil on the student's own samples: the student's logits
      are divided by ``temperature`` (the authors' on-policy trainer).
  """

  name: str = "dpo"
  beta: float = 0.1
  label_smoothing: float = 0.0
  robust: bool = False
  alpha: float = 0.5
  average_log_prob: bool = False
  beta2: float = 1.0
  mode: str = "aligndistil"
  temperature: float = 1.0
  length_normalize: bool = True
  on_policy: bool = False

  def __post_init__(self):
    if self.name not in OBJECTIVES:
      raise ValueError(
          f"LossConfig: unknown loss `name` {self.name!r}; expected one of {sorted(OBJECTIVES)}.")
    if not self.beta > 0:
      raise ValueError(f"LossConfig: `beta` must be > 0, got {self.beta}.")
    if (self.label_smoothing or self.robust) and self.name != "dpo":
      raise ValueError(
          f"LossConfig: `label_smoothing`/`robust` apply to the `dpo` loss only, not {self.name!r}.")
    hi_ok = self.label_smoothing < 0.5 if self.robust else self.label_smoothing <= 0.5
    if not (self.label_smoothing >= 0 and hi_ok):
      bound = "[0, 0.5)" if self.robust else "[0, 0.5]"
      raise ValueError(f"LossConfig: `label_smoothing` must be in {bound}, got {self.label_smoothing}.")
    if not self.alpha >= 0:
      raise ValueError(f"LossConfig: `alpha` must be >= 0, got {self.alpha}.")
    if not self.beta2 > 0:
      raise ValueError(f"LossConfig: `beta2` must be > 0, got {self.beta2}.")
    if self.mode not in ALIGNDISTIL_MODES:
      raise ValueError(f"LossConfig: `mode` must be one of {list(ALIGNDISTIL_MODES)}, got {self.mode!r}.")
    if not self.temperature > 0:
      raise ValueError(f"LossConfig: `temperature` must be > 0, got {self.temperature}.")

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any]) -> "LossConfig":
    """Builds from a plain mapping (e.g. an ``ml_collections`` dict); unknown keys fail."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - known
    if unknown:
      raise ValueError(f"LossConfig.from_mapping: unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}.")
    return cls(**dict(cfg))

  @property
  def objective(self) -> "Objective":
    return OBJECTIVES[self.name]


class ObjectiveOutput(NamedTuple):
  """``losses [B]``, ``weights [B]`` (loss = sum(w l)/sum(w)), per-example ``metrics``."""
  losses: jax.Array
  weights: jax.Array
  metrics: dict


class Context(NamedTuple):
  """What the step hands an objective besides the batch.

  Attributes:
    policy: the policy model (trainable; gradients flow).
    frozen: name -> frozen model (outputs must be stop-gradient'ed), e.g.
      ``{"reference": m}`` or ``{"dpo": m, "contrast": m}``; empty if none.
    reference: the :class:`alignjax.training.reference.Reference` mode.
    chunk_size: positions per chunk for label log-probs.
  """
  policy: Any
  frozen: Mapping[str, Any]
  reference: Any
  chunk_size: int


@dataclasses.dataclass(frozen=True)
class Objective:
  """A table entry: a loss over ``(LossConfig, Context, batch)`` and what it needs.

  Attributes:
    name: the table key.
    needs: one of :data:`NEEDS`.
    fn: ``fn(cfg, ctx, batch) -> ObjectiveOutput``.
    reference_free_ok: may run with a zero reference (SimPO-style).
  """
  name: str
  needs: str
  fn: Callable[[LossConfig, Context, Mapping[str, jax.Array]], ObjectiveOutput]
  reference_free_ok: bool = False


# ---------------------------------------------------------------- forwards

def features(model, tokens, attention):
  """``(h [N,T,D], unembed)`` if the model supports ``return_hidden``, else ``(logits, identity)``.

  The one switch between memory-lean hidden states + chunked unembedding and
  full logits (for models without ``return_hidden``/``unembed``).
  """
  if hasattr(model, "unembed"):
    return model(tokens, attention, return_hidden=True), model.unembed
  return model(tokens, attention), lambda x: x


def label_logprobs(model, tokens, attention, *, chunk_size: int) -> jax.Array:
  """Next-token log-probs ``[N, T-1]`` float32 of ``tokens[:, 1:]`` (chunked, no f32 [N,T,V])."""
  h, unembed = features(model, tokens, attention)
  return L.chunked_token_logprobs(h[:, :-1], tokens[:, 1:], unembed, chunk_size=chunk_size)


def pair_inputs(batch):
  """``(tokens, attention, response_mask[:, 1:])`` of ``[chosen; rejected]``, ``[2B, T]``."""
  tokens = batch_lib.concat_pair(batch, "tokens")
  attention = batch_lib.concat_pair(batch, "attention")
  mask = batch_lib.concat_pair(batch, "response")[:, 1:].astype(jnp.float32)
  return tokens, attention, mask


def _reduce(lp, mask, average):
  return L.masked_mean(lp, mask) if average else L.masked_sum(lp, mask)


def _preference_metrics(out, policy_seq_logps):
  pc, pr = batch_lib.split_pair(jax.lax.stop_gradient(policy_seq_logps))
  return {
      "rewards/chosen": out.chosen_rewards,
      "rewards/rejected": out.rejected_rewards,
      "rewards/margins": out.margins,
      "rewards/accuracy": out.accuracies,
      "logps/chosen": pc,
      "logps/rejected": pr,
      "policy/preference_accuracy": (pc > pr).astype(jnp.float32),
  }


# ---------------------------------------------------------------- objectives

def _sequence_objective(loss: Callable) -> Callable:
  """Objective over sequence log-probs: ``loss(pc, pr, rc, rr, cfg) -> (losses, PreferenceOutput)``."""

  def fn(cfg: LossConfig, ctx: Context, batch) -> ObjectiveOutput:
    from alignjax.training import reference as reference_lib  # circular-free at call time
    tokens, attention, mask = pair_inputs(batch)
    lp = label_logprobs(ctx.policy, tokens, attention, chunk_size=ctx.chunk_size)
    seq = _reduce(lp, mask, cfg.average_log_prob)
    pc, pr = batch_lib.split_pair(seq)
    rc, rr = reference_lib.sequence_logps(
        ctx.reference, ctx.frozen, batch, average=cfg.average_log_prob, chunk_size=ctx.chunk_size)
    losses, out = loss(pc, pr, rc, rr, cfg)
    return ObjectiveOutput(losses, jnp.ones_like(losses), _preference_metrics(out, _reduce(lp, mask, False)))

  return fn


def _dpo(pc, pr, rc, rr, cfg):
  return L.dpo_loss(pc, pr, rc, rr, beta=cfg.beta, label_smoothing=cfg.label_smoothing, robust=cfg.robust)


def _gpo(loss_type: str):
  def loss(pc, pr, rc, rr, cfg):
    return L.gpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=loss_type)
  return loss


def _tdpo_token_stats(h, unembed, h_ref, unembed_ref, labels, chunk_size):
  """Per-token ``(log pi, log pi_ref, KL(pi_ref || pi))`` ``[N, T]``, chunked over T with remat."""
  n, t, _ = h.shape
  c = max(1, min(chunk_size, t))
  k = -(-t // c)
  pad = k * c - t
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    h_ref = jnp.pad(h_ref, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))
  chunks = lambda x: x.reshape((n, k, c) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def stats(hc, hrc, lab):
    logp = jax.nn.log_softmax(unembed(hc).astype(jnp.float32), axis=-1)
    logq = jax.lax.stop_gradient(jax.nn.log_softmax(unembed_ref(hrc).astype(jnp.float32), axis=-1))
    take = lambda a: jnp.take_along_axis(a, lab[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    return take(logp), take(logq), kl

  _, out = jax.lax.scan(lambda _, xs: (None, stats(*xs)), None,
                        (chunks(h), chunks(h_ref), chunks(labels)))
  return tuple(x.swapaxes(0, 1).reshape(n, k * c)[:, :t] for x in out)


def _tdpo(variant: str) -> Callable:
  def fn(cfg: LossConfig, ctx: Context, batch) -> ObjectiveOutput:
    tokens, attention, mask = pair_inputs(batch)
    h, unembed = features(ctx.policy, tokens, attention)
    h_ref, unembed_ref = features(ctx.frozen["reference"], tokens, attention)
    h_ref = jax.lax.stop_gradient(h_ref)
    labels = tokens[:, 1:]
    lp, ref_lp, kl = _tdpo_token_stats(h[:, :-1], unembed, h_ref[:, :-1], unembed_ref, labels, ctx.chunk_size)
    red = lambda x: _reduce(x, mask, cfg.average_log_prob)
    stats = L.TDPOStats(logratio=red(lp - ref_lp), seq_kl=red(kl), policy_logps=red(lp))
    chosen, rejected = batch_lib.split_pair(stats)
    losses, out = L.tdpo_loss_from_stats(chosen, rejected, beta=cfg.beta, alpha=cfg.alpha, variant=variant)
    metrics = _preference_metrics(out, _reduce(lp, mask, False))
    metrics["kl/chosen_seq"] = out.chosen_seq_kl
    metrics["kl/rejected_seq"] = out.rejected_seq_kl
    return ObjectiveOutput(losses, jnp.ones_like(losses), metrics)
  return fn


def _aligndistil(cfg: LossConfig, ctx: Context, batch) -> ObjectiveOutput:
  """AlignDistil (Zhang et al. 2025, arXiv:2503.02832) on the CHOSEN rows of the batch.

  As the authors' trainers: off-policy, the chosen responses of the preference
  set are distilled (their off-policy trainer reads the chosen side only);
  on-policy (``cfg.on_policy``), the chosen rows hold the student's own samples
  and the student's logits are divided by ``cfg.temperature`` first, as their
  on-policy trainer does. The rejected rows are not read. Per-example metrics
  are the authors' logged ones (mean weight, expected token rewards, KL to the
  DPO and contrast models).
  """
  tokens = jnp.asarray(batch[batch_lib.key("chosen", "tokens")])
  attention = batch[batch_lib.key("chosen", "attention")]
  mask = jnp.asarray(batch[batch_lib.key("chosen", "response")])[:, 1:].astype(jnp.float32)
  h, unembed = features(ctx.policy, tokens, attention)
  hd, ud = features(ctx.frozen["dpo"], tokens, attention)
  hc, uc = features(ctx.frozen["contrast"], tokens, attention)
  h, hd, hc = h[:, :-1], jax.lax.stop_gradient(hd[:, :-1]), jax.lax.stop_gradient(hc[:, :-1])
  n, t, _ = h.shape
  c = max(1, min(ctx.chunk_size, t))
  k = -(-t // c)
  pad = k * c - t
  padt = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x
  chunks = lambda x: padt(x).reshape((n, k, c) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_loss(hs, hdc, hcc, m):
    zs = unembed(hs)
    if cfg.on_policy:
      zs = zs.astype(jnp.float32) / cfg.temperature
    losses, out = L.aligndistil_loss(
        zs, ud(hdc), uc(hcc), m, beta=cfg.beta, beta2=cfg.beta2, mode=cfg.mode,
        temperature=cfg.temperature, length_normalize=False)
    stats = jnp.stack([jnp.sum(out.weights * m, axis=-1), out.expected_reward, out.dpo_expected_reward,
                       out.seq_kl_dpo, out.seq_kl_contrast], axis=-1)
    return losses, jax.lax.stop_gradient(stats)

  _, (per_chunk, stats) = jax.lax.scan(lambda _, xs: (None, chunk_loss(*xs)), None,
                                       (chunks(h), chunks(hd), chunks(hc), chunks(mask)))
  summed, stats = per_chunk.sum(axis=0), stats.sum(axis=0)        # [B], [B, 5]
  count = mask.sum(axis=-1)
  denom = jnp.maximum(count, 1.0)
  losses = summed / denom if cfg.length_normalize else summed
  return ObjectiveOutput(losses, jnp.ones_like(losses), {
      "distil/loss": jax.lax.stop_gradient(losses),
      "distil/mean_weight": stats[:, 0] / denom,
      "distil/expected_reward": stats[:, 1],
      "distil/dpo_expected_reward": stats[:, 2],
      "distil/seq_kl_dpo": stats[:, 3],
      "distil/token_kl_dpo": stats[:, 3] / denom,
      "distil/seq_kl_contrast": stats[:, 4],
      "distil/token_kl_contrast": stats[:, 4] / denom,
  })


def _sft(cfg: LossConfig, ctx: Context, batch) -> ObjectiveOutput:
  """Token-averaged NLL of the chosen responses over the whole batch (weights = token counts)."""
  del cfg
  tokens = jnp.asarray(batch[batch_lib.key("chosen", "tokens")])
  attention = batch[batch_lib.key("chosen", "attention")]
  mask = jnp.asarray(batch[batch_lib.key("chosen", "response")])[:, 1:].astype(jnp.float32)
  lp = label_logprobs(ctx.policy, tokens, attention, chunk_size=ctx.chunk_size)
  count = mask.sum(axis=-1)
  nll = -L.masked_sum(lp, mask) / jnp.maximum(count, 1.0)
  return ObjectiveOutput(nll, count, {"nll/chosen": jax.lax.stop_gradient(nll)})


def _table() -> dict[str, Objective]:
  table = {"dpo": Objective("dpo", "reference_logps", _sequence_objective(_dpo), reference_free_ok=True)}
  for name in sorted(set(L.GPO_FUNCTIONS) | set(L.GPO_ALIASES)):
    if name != "dpo":
      table[name] = Objective(name, "reference_logps", _sequence_objective(_gpo(name)), reference_free_ok=True)
  for variant in ("tdpo1", "tdpo2"):
    table[variant] = Objective(variant, "reference_logits", _tdpo(variant))
  table["aligndistil"] = Objective("aligndistil", "teachers", _aligndistil)
  table["sft"] = Objective("sft", "none", _sft)
  return table


OBJECTIVES: dict[str, Objective] = _table()
LOSS_NAMES = tuple(sorted(OBJECTIVES))


def get(name: str) -> Objective:
  """``OBJECTIVES[name]``; an unknown name raises a ValueError listing the valid names."""
  if name not in OBJECTIVES:
    raise ValueError(f"objectives.get: unknown loss `name` {name!r}; expected one of {sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]
