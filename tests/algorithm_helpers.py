"""Shared helpers of tests/test_algorithms_<method>.py: accumulated objectives, TRL labels, tiny runs."""

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.training import algorithms, config as config_lib, loop, reference

TINY_RUN = {
    "data.train_examples": 32, "data.eval_examples": 8, "model.hidden_size": 16, "model.intermediate_size": 32,
    "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 8,
    "sft.steps": 0, "dpo.steps": 3, "dpo.warmup_steps": 1, "batch_size": 4, "eval_batch_size": 8, "log_every": 1,
}


def accumulated_loss(loss, policy, frozen, batch, *, k=2, ref_spec=None, chunk_size=4):
  """``sum(w l) / sum(w)`` over ``k`` micro-batches (rows i, i+k, ...), as the step accumulates.

  Every micro-batch's objective gets the algorithm's ``batch_statistics`` of the
  whole batch (``ctx.statistics``), as :func:`alignjax.training.steps.make_train_step`
  passes them. Returns ``(loss, per-row metrics of micro-batch 0)``.
  """
  spec = ref_spec if ref_spec is not None else (reference.online(frozen["reference"])[0] if frozen
                                                else reference.none()[0])
  algo = loss.algorithm

  def run(batch):
    ctx = algorithms.Context(policy, frozen, spec, chunk_size)
    stats = algo.batch_statistics(loss.hparams, ctx, batch) if algo.batch_statistics else None
    lw, w, first = 0.0, 0.0, None
    for i in range(k):
      mb = {name: v[i::k] for name, v in batch.items()}
      out = algo.objective(loss.hparams, algorithms.Context(policy, frozen, spec, chunk_size, stats), mb)
      lw, w = lw + jnp.sum(out.losses * out.weights), w + jnp.sum(out.weights)
      first = out.metrics if first is None else first
    return lw / w, first
  value, metrics = jax.jit(run)({name: jnp.asarray(v) for name, v in batch.items()})
  return float(value), jax.tree.map(np.asarray, metrics)


def trl_labels(batch, side, *, prompt=False):
  """TRL's labels of ``side``: ``input_ids`` with -100 off the response (or, ``prompt``, off the attended tokens)."""
  tokens = np.asarray(batch[f"{side}_tokens"]).astype(np.int64)
  keep = np.asarray(batch[f"{side}_attention" if prompt else f"{side}_response"], bool)
  return np.where(keep, tokens, -100)


def tiny_run(tmp_path, name, **fields):
  """A test-size :func:`alignjax.training.loop.run` of ``name`` on generated sorting pairs."""
  cfg = config_lib.build(None, **{**TINY_RUN, "loss.name": name, **fields})
  return loop.run(cfg, workdir=str(tmp_path), handle_signals=False)
