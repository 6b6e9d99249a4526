r"""Preference-optimisation launcher.

Runs supervised warm-up (optional) and then a preference loss (DPO, cDPO,
robust DPO, any GPO function, TDPO1/TDPO2) on the generated sorting
preference set, with Orbax checkpoints in ``--workdir``. Re-running with the
same ``--workdir`` resumes from the latest checkpoint.

  python -m launch.train                                   # embedded default
  python -m launch.train --config=configs/dpo_tiny.py \
      --config.loss.name=tdpo2 --config.loss.alpha=0.5 --workdir=runs/tdpo2
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(ROOT / "configs" / "dpo_tiny.py"), "Training configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/dpo_tiny", "Directory for checkpoints, metrics.jsonl and final_metrics.json."
)


def _validate(config) -> None:
  for section, key in [("sft", "steps"), ("dpo", "steps")]:
    if config[section][key] < 0:
      raise ValueError(f"config.{section}.{key} must be >= 0, got {config[section][key]}.")
  if config.sft.steps + config.dpo.steps == 0:
    raise ValueError("config.sft.steps + config.dpo.steps is 0: nothing to train.")
  for key in ("batch_size", "eval_batch_size", "log_every", "checkpoint_every"):
    if config[key] <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items()}


def evaluate(eval_fn, policy, reference, data, batch_size: int) -> dict[str, float]:
  n = len(data["chosen_tokens"])
  totals: dict[str, float] = {}
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in data.items()}
    size = len(batch["chosen_tokens"])
    for k, v in _scalars(eval_fn(policy, reference, batch)).items():
      totals[k] = totals.get(k, 0.0) + v * size
  return {k: v / n for k, v in totals.items()}


def train(config, workdir: str) -> dict[str, Any]:
  """Runs the job described by ``config``; returns the final evaluation."""
  import jax
  from flax import nnx

  from alignjax.checkpoint import Checkpointer
  from alignjax.data import SortingTask, preference_batches, sorting_preferences, to_arrays
  from alignjax.models import TinyLM, TinyLMConfig
  from alignjax import training

  _validate(config)
  loss_cfg = training.LossConfig.from_mapping(config.loss.to_dict())
  task = SortingTask(config.data.num_symbols, config.data.min_len, config.data.max_len)
  train_source, eval_source = sorting_preferences(
      task, train_examples=config.data.train_examples, eval_examples=config.data.eval_examples,
      seed=config.seed, data_dir=config.data.dir or os.path.join(workdir, "data"),
  )
  train_ds = preference_batches(train_source, config.batch_size, seed=config.seed)
  eval_data = to_arrays(eval_source)

  model_cfg = TinyLMConfig(
      vocab_size=task.vocab_size, max_len=task.seq_len, d_model=config.model.d_model,
      num_layers=config.model.num_layers, num_heads=config.model.num_heads, d_ff=config.model.d_ff,
  )
  policy = TinyLM(model_cfg, rngs=nnx.Rngs(config.seed))
  reference = nnx.clone(policy)
  sft_steps, total = config.sft.steps, config.sft.steps + config.dpo.steps
  common = dict(weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
  sft_opt = training.make_optimizer(
      policy, learning_rate=config.sft.learning_rate, warmup_steps=config.sft.warmup_steps,
      total_steps=config.sft.steps, **common)
  pref_opt = training.make_optimizer(
      policy, learning_rate=config.dpo.learning_rate, warmup_steps=config.dpo.warmup_steps,
      total_steps=config.dpo.steps, **common)
  objects = {"policy": policy, "reference": reference, "sft_opt": sft_opt, "pref_opt": pref_opt}

  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.max_checkpoints)
  start = 0
  if ckpt.latest_step() is not None:
    start = ckpt.restore(objects)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
    print(f"resumed from step {start}", flush=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  pref_step = training.make_preference_step(loss_cfg)
  pref_eval = training.make_preference_eval(loss_cfg)
  print(
      f"alignjax: {loss_cfg.name} on sorting preferences | devices={jax.devices()} | "
      f"params={sum(x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param))):,} | "
      f"steps: sft {sft_steps} + preference {config.dpo.steps}",
      flush=True,
  )
  before = None
  if start >= sft_steps:
    before_path = os.path.join(workdir, "eval_before.json")
    if os.path.exists(before_path):
      with open(before_path) as f:
        before = json.load(f)
  metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
  t0, last_log = time.time(), start
  try:
    for step in range(start, total):
      if step == sft_steps:
        nnx.update(reference, nnx.state(policy))  # the SFT model is the reference
        before = evaluate(pref_eval, policy, reference, eval_data, config.eval_batch_size)
        with open(os.path.join(workdir, "eval_before.json"), "w") as f:
          json.dump(before, f)
        print(f"[eval @ {step}] reference: " + _fmt(before), flush=True)
      batch = train_ds[step]
      phase = "sft" if step < sft_steps else loss_cfg.name
      if step < sft_steps:
        metrics = training.sft_step(policy, sft_opt, batch)
      else:
        metrics = pref_step(policy, pref_opt, reference, batch)
      done = step + 1
      if done % config.log_every == 0 or done == total or done == sft_steps:
        m = _scalars(metrics)
        if not all(math.isfinite(v) for v in m.values()):
          raise FloatingPointError(f"non-finite metrics at step {done} ({phase}): {m}")
        rate = (done - last_log) / max(time.time() - t0, 1e-9)
        t0, last_log = time.time(), done
        print(f"[{phase} {done}/{total}] " + _fmt(m) + f" | {rate:.1f} steps/s", flush=True)
        metrics_file.write(json.dumps({"step": done, "phase": phase, **m}) + "\n")
        metrics_file.flush()
      if done % config.checkpoint_every == 0 or done == total or done == sft_steps:
        ckpt.save(done, objects)
  finally:
    metrics_file.close()
    ckpt.close()

  after = evaluate(pref_eval, policy, reference, eval_data, config.eval_batch_size)
  print(f"[eval @ {total}] policy:    " + _fmt(after), flush=True)
  result = {"loss": loss_cfg.name, "steps": total, "eval_before": before, "eval_after": after}
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  if before is not None:
    print(
        "held-out preference accuracy of the policy (log pi(y_w) > log pi(y_l)): "
        f"{before['policy/preference_accuracy']:.3f} (reference) -> "
        f"{after['policy/preference_accuracy']:.3f} (after {loss_cfg.name})",
        flush=True,
    )
  return result


def _fmt(m: Mapping[str, float]) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in m.items())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
