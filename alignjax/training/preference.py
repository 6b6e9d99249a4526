"""Preference-optimisation training steps over any causal LM ``model(tokens, mask)``.

Batches are dicts with ``{chosen,rejected}_{tokens,attention,response}`` arrays
(see :mod:`alignjax.data.synthetic`). Chosen and rejected sequences go through
one forward pass, concatenated on the batch axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from alignjax import losses as L

SEQUENCE_LOSSES = ("dpo",) + tuple(sorted(set(L.GPO_FUNCTIONS) | set(L.GPO_ALIASES) - {"dpo"}))
TOKEN_LOSSES = ("tdpo1", "tdpo2")
LOSS_NAMES = SEQUENCE_LOSSES + TOKEN_LOSSES


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which preference loss to train with, and its hyperparameters.

  Attributes:
    name: ``dpo``; a GPO function or alias (``ipo``, ``slic``, ``hinge``,
      ``squared``, ``exponential``, ``truncated_quadratic``, ``savage``,
      ``logistic``); or ``tdpo1`` / ``tdpo2``.
    beta: inverse temperature / scale of the log-ratio difference.
    label_smoothing: cDPO / robust-DPO flip probability (``dpo`` only).
    robust: robust-DPO estimator (``dpo`` only).
    alpha: TDPO2 sequential-KL weight.
    average_log_prob: token-average instead of sum the sequence terms.
  """

  name: str = "dpo"
  beta: float = 0.1
  label_smoothing: float = 0.0
  robust: bool = False
  alpha: float = 0.5
  average_log_prob: bool = False

  def __post_init__(self):
    if self.name not in LOSS_NAMES:
      raise ValueError(f"LossConfig: unknown loss `name` {self.name!r}; expected one of {list(LOSS_NAMES)}.")
    if self.name != "dpo" and (self.label_smoothing or self.robust):
      raise ValueError(
          f"LossConfig: `label_smoothing`/`robust` apply to the `dpo` loss only, not {self.name!r}."
      )

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any]) -> "LossConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - known
    if unknown:
      raise ValueError(f"LossConfig: unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}.")
    return cls(**dict(cfg))


BATCH_KEYS = tuple(
    f"{side}_{field}" for side in ("chosen", "rejected") for field in ("tokens", "attention", "response")
)


def check_batch(batch: Mapping[str, Any]) -> None:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"preference batch is missing keys {missing}; it needs {list(BATCH_KEYS)}.")
  shape = jnp.shape(batch["chosen_tokens"])
  for k in BATCH_KEYS:
    if jnp.shape(batch[k]) != shape:
      raise ValueError(f"preference batch: `{k}` has shape {jnp.shape(batch[k])}, expected {shape}.")


def _forward(model, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Shifted logits, labels and response mask for [chosen; rejected]."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  attention = jnp.concatenate([batch["chosen_attention"], batch["rejected_attention"]])
  response = jnp.concatenate([batch["chosen_response"], batch["rejected_response"]])
  logits = model(tokens, attention)
  return L.shift_for_next_token(logits, tokens, response)


def preference_loss(policy, reference, batch, cfg: LossConfig):
  """Mean preference loss and metrics. Only ``policy`` receives gradients."""
  logits, labels, mask = _forward(policy, batch)
  ref_logits = jax.lax.stop_gradient(_forward(reference, batch)[0])
  B = batch["chosen_tokens"].shape[0]
  if cfg.name in TOKEN_LOSSES:
    losses, out = L.tdpo_loss(
        logits[:B], logits[B:], ref_logits[:B], ref_logits[B:],
        labels[:B], labels[B:], mask[:B], mask[B:],
        beta=cfg.beta, alpha=cfg.alpha, variant=cfg.name,
        average_log_prob=cfg.average_log_prob,
    )
    extra = {"chosen_seq_kl": out.chosen_seq_kl.mean(), "rejected_seq_kl": out.rejected_seq_kl.mean()}
  else:
    logps = L.sequence_logprobs(logits, labels, mask, average=cfg.average_log_prob)
    ref_logps = L.sequence_logprobs(ref_logits, labels, mask, average=cfg.average_log_prob)
    args = (logps[:B], logps[B:], ref_logps[:B], ref_logps[B:])
    if cfg.name == "dpo":
      losses, out = L.dpo_loss(*args, beta=cfg.beta, label_smoothing=cfg.label_smoothing, robust=cfg.robust)
    else:
      losses, out = L.gpo_loss(*args, beta=cfg.beta, loss_type=cfg.name)
    extra = {}
  policy_logps = jax.lax.stop_gradient(L.sequence_logprobs(logits, labels, mask))
  metrics = {
      "loss": losses.mean(),
      "rewards/chosen": out.chosen_rewards.mean(),
      "rewards/rejected": out.rejected_rewards.mean(),
      "rewards/margins": out.margins.mean(),
      "rewards/accuracy": out.accuracies.mean(),
      "logps/chosen": policy_logps[:B].mean(),
      "logps/rejected": policy_logps[B:].mean(),
      # Does the policy itself rank the pair correctly (no reference)?
      "policy/preference_accuracy": (policy_logps[:B] > policy_logps[B:]).mean(),
      **extra,
  }
  return losses.mean(), metrics


def sft_loss(policy, batch):
  """Token-averaged negative log-likelihood of the chosen responses."""
  logits, labels, mask = L.shift_for_next_token(
      policy(batch["chosen_tokens"], batch["chosen_attention"]),
      batch["chosen_tokens"], batch["chosen_response"],
  )
  lp = L.token_logprobs(logits, labels)
  m = mask.astype(jnp.float32)
  nll = -(lp * m).sum() / jnp.maximum(m.sum(), 1.0)
  return nll, {"loss": nll}


def make_optimizer(
    model, *, learning_rate: float, warmup_steps: int, total_steps: int,
    weight_decay: float = 0.0, max_grad_norm: float = 1.0,
) -> nnx.Optimizer:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
      end_value=0.1 * learning_rate,
  )
  tx = optax.chain(
      optax.clip_by_global_norm(max_grad_norm),
      optax.adamw(schedule, weight_decay=weight_decay),
  )
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def make_preference_step(cfg: LossConfig) -> Callable:
  @nnx.jit
  def step(policy, optimizer, reference, batch):
    (_, metrics), grads = nnx.value_and_grad(
        lambda p: preference_loss(p, reference, batch, cfg), has_aux=True
    )(policy)
    optimizer.update(policy, grads)
    metrics["grad_norm"] = optax.global_norm(grads)
    return metrics

  return step


def make_preference_eval(cfg: LossConfig) -> Callable:
  @nnx.jit
  def evaluate(policy, reference, batch):
    return preference_loss(policy, reference, batch, cfg)[1]

  return evaluate


@nnx.jit
def sft_step(policy, optimizer, batch):
  (_, metrics), grads = nnx.value_and_grad(lambda p: sft_loss(p, batch), has_aux=True)(policy)
  optimizer.update(policy, grads)
  metrics["grad_norm"] = optax.global_norm(grads)
  return metrics
