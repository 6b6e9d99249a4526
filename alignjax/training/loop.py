"""The train/eval loop as a library function: :func:`run`.

Launchers and notebooks call it the same way::

  cfg = config.build(config_dict)                   # validated, typed, frozen
  result = loop.run(cfg, workdir="runs/x", writer=run_lib.metrics_writer("runs/x"))

What a run guarantees (every caller gets it):

* Identity: the config that defines the run (:func:`config.identity`) is stored
  with the checkpoints; resuming with a different one raises
  :class:`IdentityMismatch` listing the fields (``fresh=True`` starts a new run
  in a new workdir instead). The step budget (``dpo.steps``) may be extended;
  the change is recorded. Callers that pass ``explicit`` (the fields the user
  set) resume a partial run with its stored budget when the budget was not set.
* Finite checks inside the jitted step: a step whose loss, gradient norm or
  updated parameters are not finite is not applied; the run stops with
  :class:`run_lib.TrainingFailed` (or, with ``on_nonfinite="skip"``, goes on and
  counts ``skipped_updates``). A loss above ``max_loss`` stops it too. Nothing
  non-finite is ever checkpointed.
* Checkpoints are verified before old ones are rotated; on restore a damaged
  latest step is reported and the newest readable one is used.
* SIGTERM/SIGINT finish the current step, write a checkpoint and raise
  :class:`run_lib.Preempted`.
* One ``.lock`` per workdir; ``metrics.jsonl`` has one row per logged step
  across resumes; TensorBoard events next to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterable, Mapping, Optional

from alignjax.training import config as config_lib
from alignjax.training import run as run_lib
from alignjax.training.config import ConfigError, RunConfig

__all__ = ["IdentityMismatch", "evaluate", "run"]


class IdentityMismatch(ConfigError):
  """The workdir holds a run with a different identity."""


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def _has_steps(checkpoint_dir: str) -> bool:
  return os.path.isdir(checkpoint_dir) and any(p.isdigit() for p in os.listdir(checkpoint_dir))


def fresh_workdir(workdir: str) -> str:
  """``workdir`` if it holds no run, else the first ``workdir-N`` (N = 2, 3, ...) that holds none."""
  candidate, n = workdir, 1
  while _has_steps(os.path.join(candidate, "checkpoints")) or os.path.exists(
      os.path.join(candidate, "checkpoints", run_lib.RECORD)):
    n += 1
    candidate = f"{workdir}-{n}"
  return candidate


def optimizer(phase: config_lib.PhaseConfig, *, weight_decay: float) -> Any:
  """AdamW with linear warm-up and cosine decay to 10% of ``phase.learning_rate``.

  Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
  arXiv:1711.05101. Gradient clipping is done by the train step.
  """
  import optax  # pylint: disable=import-outside-toplevel
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, phase.learning_rate, max(phase.warmup_steps, 1), max(phase.steps, phase.warmup_steps + 1),
      end_value=0.1 * phase.learning_rate)
  return optax.adamw(schedule, weight_decay=weight_decay)


def first_on_process_zero(fn, name: str):
  """``fn()`` on process 0, then (after a barrier) on the others: builds shared files once."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return out if jax.process_index() == 0 else fn()


def make_mesh(spec: config_lib.MeshSpec):
  """The run's ``jax.sharding.Mesh`` (None when every axis is 1: one device, no mesh)."""
  if not spec.enabled:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      raise ConfigError(f"config.mesh: a run over {jax.process_count()} processes needs a mesh "
                        "(set config.mesh.data/fsdp/tensor so their product is the device count).")
    return None
  from alignjax import sharding  # pylint: disable=import-outside-toplevel
  try:
    return sharding.make_mesh(spec.data, spec.fsdp, spec.tensor)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None


def global_batch(mesh) -> Any:
  """``fn(host_batch) -> batch`` the step takes: host arrays, or global arrays over ``mesh``.

  Every process holds the same global batch (the data order is a function of the
  seed and the step); each places only the rows its own devices hold.
  """
  if mesh is None:
    return lambda batch: batch
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from alignjax import sharding  # pylint: disable=import-outside-toplevel

  def put(x):
    x = np.asarray(x)
    s = sharding.batch_sharding(mesh, ndim=x.ndim) if x.ndim else jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec())
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return lambda batch: {k: put(v) for k, v in batch.items()}


def evaluate(eval_fn, params, frozen, data: Mapping[str, Any], batch_size: int, *,
             to_device=lambda b: b) -> dict[str, float]:
  """Example-weighted mean of ``eval_fn(params, batch, frozen)`` metrics over ``data`` in batches.

  ``eval_fn`` is a :func:`alignjax.training.steps.make_eval_step` function;
  ``to_device`` places each host batch (see :func:`global_batch`).
  """
  n = len(data["chosen_tokens"])
  totals: dict[str, float] = {}
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in data.items()}
    size = len(batch["chosen_tokens"])
    for k, v in eval_fn(params, to_device(batch), frozen).items():
      totals[k] = totals.get(k, 0.0) + float(v) * size
  return {k: v / n for k, v in totals.items()}


def _fmt(m: Mapping[str, float]) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in m.items())


def run(
    cfg: RunConfig,
    *,
    workdir: str,
    writer: Optional[run_lib.NullWriter] = None,
    progress: Optional[run_lib.Progress] = None,
    fresh: bool = False,
    explicit: Optional[Iterable[str]] = None,
    handle_signals: bool = True,
) -> dict[str, Any]:
  """Trains (SFT warm-up, then the preference loss) and evaluates; resumes from ``workdir``.

  Args:
    cfg: a validated :class:`~alignjax.training.config.RunConfig`.
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard events, final metrics
      (relative paths resolve against the current directory).
    writer: metrics sink (default :func:`run_lib.metrics_writer` of ``workdir``).
    progress: progress reporter (default: plain lines / tqdm on stdout).
    fresh: if ``workdir`` holds a run, start a new one in ``workdir-N`` instead.
    explicit: dotted names of the fields the user set; a resumed run keeps its
      stored step budget unless ``dpo.steps`` is among them (``None``: ``cfg``
      is authoritative).
    handle_signals: install the SIGTERM/SIGINT handlers (main thread only).

  Returns:
    ``{"loss", "steps", "eval_before", "eval_after", "workdir", "resumed_from",
    "skipped_updates", "budget_history"}``.

  Raises:
    ConfigError / IdentityMismatch: bad config, or a workdir of another run.
    run_lib.RunLockedError: another process holds the workdir.
    run_lib.TrainingFailed: non-finite values or divergence.
    run_lib.Preempted: SIGTERM/SIGINT; a checkpoint of the last step was written.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if not isinstance(cfg, RunConfig):
    raise TypeError(f"loop.run: `cfg` must be a RunConfig (see alignjax.training.config.build), got {type(cfg).__name__}.")
  config_lib.validate(cfg)
  workdir = os.path.abspath(workdir)
  if fresh:
    new = fresh_workdir(workdir)
    if new != workdir:
      _warn(f"--fresh: {workdir} holds another run (left untouched); starting a new run in {new}")
    workdir = new
  os.makedirs(workdir, exist_ok=True)
  lock = run_lib.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, run_lib.PreemptionGuard(handle_signals) as guard:
    return _run(cfg, workdir, writer, progress, explicit, guard)


def _resolve_identity(cfg: RunConfig, workdir: str, ckpt_dir: str, explicit) -> tuple[RunConfig, dict]:
  """Checks ``cfg`` against the stored run; returns the config to run and the record."""
  record = run_lib.read_record(ckpt_dir)
  now = {"identity": config_lib.identity(cfg), "budget": {f: config_lib.flatten(cfg)[f] for f in config_lib.BUDGET_FIELDS},
         "history": []}
  if not _has_steps(ckpt_dir):
    return cfg, now
  if record is None:
    _warn(f"{ckpt_dir} has checkpoints but no {run_lib.RECORD}; adopting the given config as the run's identity")
    return cfg, now
  diff = config_lib.identity_diff(record["identity"], cfg)
  if diff:
    raise IdentityMismatch(
        f"workdir {workdir} holds a run with a different config; refusing to resume "
        "(pass the stored values, use another --workdir, or --fresh to start a new run in a new workdir):\n"
        + "\n".join(diff))
  explicit = None if explicit is None else set(explicit)
  keep = {f: v for f, v in record.get("budget", {}).items() if explicit is not None and f not in explicit}
  if keep:
    cfg = config_lib.replace(cfg, **keep)
  return cfg, record


def _run(cfg: RunConfig, workdir: str, writer, progress, explicit, guard) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from alignjax.data import SortingTask, preference_batches, sorting_preferences, to_arrays  # pylint: disable=import-outside-toplevel
  from alignjax.models import Transformer  # pylint: disable=import-outside-toplevel
  from alignjax.training import objectives  # pylint: disable=import-outside-toplevel
  from alignjax.training import reference as reference_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import steps as steps_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  main = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, "checkpoints")
  stored_budget = None
  cfg, record = _resolve_identity(cfg, workdir, ckpt_dir, explicit)
  if record.get("budget"):
    stored_budget = dict(record["budget"])

  loss_cfg = objectives.LossConfig.from_mapping(dict(config_lib.flatten(cfg.loss)))
  task = SortingTask(cfg.data.num_symbols, cfg.data.min_len, cfg.data.max_len)
  data_dir = os.path.abspath(cfg.data.dir) if cfg.data.dir else os.path.join(workdir, "data")
  train_source, eval_source = first_on_process_zero(lambda: sorting_preferences(
      task, train_examples=cfg.data.train_examples, eval_examples=cfg.data.eval_examples,
      seed=cfg.seed, data_dir=data_dir), "alignjax-data")
  train_ds = preference_batches(train_source, cfg.batch_size, seed=cfg.seed)
  eval_data = to_arrays(eval_source)

  mesh = make_mesh(cfg.mesh)
  policy = Transformer(cfg.model.model_config(task.vocab_size), rngs=nnx.Rngs(cfg.seed))
  sft_steps, total = cfg.sft.steps, cfg.sft.steps + cfg.dpo.steps
  sft_tx = optimizer(cfg.sft, weight_decay=cfg.weight_decay)
  pref_tx = optimizer(cfg.dpo, weight_decay=cfg.weight_decay)
  ref_mode, frozen = reference_lib.online(policy, mesh=mesh)
  # Everything a resumed run needs, as pytrees: both phases' train states and the
  # frozen reference (the policy at the end of SFT); sharded over the mesh if any.
  objects = {"sft": steps_lib.init_state(policy, sft_tx, mesh=mesh),
             "pref": steps_lib.init_state(policy, pref_tx, mesh=mesh),
             "reference": jax.tree.map(jnp.copy, frozen["reference"])}
  to_device = global_batch(mesh)

  ckpt = Checkpointer(ckpt_dir, max_to_keep=cfg.max_checkpoints, warn=_warn if main else (lambda m: None))
  writer = run_lib.metrics_writer(workdir) if writer is None else writer
  try:
    start = ckpt.restore_latest_valid(objects) or 0
    if start > total:
      raise ConfigError(
          f"config.dpo.steps={cfg.dpo.steps} gives a budget of {total} steps, below the restored step {start}; "
          "pass a larger --config.dpo.steps.")
    history = list(record.get("history", []))
    if not history or start == 0:
      history = [{"event": "start", "step": 0, "total": total}]
    elif stored_budget is not None and stored_budget.get("dpo.steps") != cfg.dpo.steps:
      history.append({"event": "budget", "step": start, "total": total,
                      "dpo.steps": [stored_budget.get("dpo.steps"), cfg.dpo.steps]})
    record = {"identity": config_lib.identity(cfg),
              "budget": {f: config_lib.flatten(cfg)[f] for f in config_lib.BUDGET_FIELDS},
              "history": history, "config": config_lib.flatten(cfg)}
    run_lib.write_record(ckpt_dir, record)
    if main:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_lib.flatten(cfg), f, indent=2)
    writer.open(start)
    progress = progress or run_lib.Progress(total, start, enabled=main)
    n_params = sum(x.size for x in jax.tree.leaves(objects["sft"].params))
    progress.set_peak_flops(run_lib.peak_flops("float32"))
    if start:
      progress.message(f"resumed from step {start} of {total} ({ckpt_dir})")
    progress.message(
        f"alignjax: {loss_cfg.name} on sorting preferences | devices={jax.devices()} | params={n_params:,} | "
        f"steps: sft {sft_steps} + preference {cfg.dpo.steps}")

    # Non-finite updates are never applied (skip_nonfinite); the loop then stops or goes on.
    step_kwargs = dict(max_grad_norm=cfg.max_grad_norm, skip_nonfinite=True, mesh=mesh)
    sft_step = steps_lib.make_train_step(
        policy, sft_tx, objectives.LossConfig(name="sft"), reference_lib.none()[0], **step_kwargs)
    pref_step = steps_lib.make_train_step(policy, pref_tx, loss_cfg, ref_mode, **step_kwargs)
    pref_eval = steps_lib.make_eval_step(policy, loss_cfg, ref_mode, mesh=mesh)

    def start_preference_phase():
      """The policy after SFT starts the preference phase and is its frozen reference."""
      params = objects["sft"].params
      objects["pref"] = steps_lib.TrainState(
          objects["pref"].step * 0, jax.tree.map(jnp.copy, params), jax.jit(pref_tx.init)(params),
          objects["pref"].skipped * 0)
      objects["reference"] = jax.tree.map(jnp.copy, params)

    before = None
    before_path = os.path.join(workdir, "eval_before.json")
    if start >= sft_steps and start > 0 and os.path.exists(before_path):
      with open(before_path) as f:
        before = json.load(f)
    skipped, last_saved, good = 0, start if start else None, None
    for step in range(start, total):
      if step == sft_steps:
        start_preference_phase()
        before = evaluate(pref_eval, objects["pref"].params, {"reference": objects["reference"]},
                          eval_data, cfg.eval_batch_size, to_device=to_device)
        if main:
          with open(before_path, "w") as f:
            json.dump(before, f)
        progress.message(f"[eval @ {step}] reference: " + _fmt(before))
      host_batch = train_ds[step]
      batch = to_device(host_batch)
      sft = step < sft_steps
      phase = "sft" if sft else loss_cfg.name
      if sft:
        objects["sft"], metrics = sft_step(objects["sft"], batch, {})
        tokens = float(np.sum(host_batch["chosen_attention"]))
        flops = 6.0 * n_params * np.size(host_batch["chosen_tokens"])
      else:
        objects["pref"], metrics = pref_step(objects["pref"], batch, {"reference": objects["reference"]})
        tokens = float(np.sum(host_batch["chosen_attention"]) + np.sum(host_batch["rejected_attention"]))
        flops = 8.0 * n_params * 2 * np.size(host_batch["chosen_tokens"])  # policy fwd+bwd, reference fwd
      loss, finite = (float(x) for x in jax.device_get((metrics["loss"], metrics["finite"])))
      done = step + 1
      progress.step(done, tokens=tokens, flops=flops)
      if not finite:
        if cfg.on_nonfinite == "stop":
          raise run_lib.TrainingFailed(
              f"non-finite loss, gradients or parameters at step {done} ({phase}, loss={loss}); the update was "
              f"not applied and nothing non-finite was saved (last checkpoint: step {last_saved}). "
              "Lower the learning rate, or set config.on_nonfinite=skip.", step=done)
        skipped += 1
      elif loss > cfg.max_loss:
        raise run_lib.TrainingFailed(
            f"training diverged at step {done} ({phase}): loss {loss:.4g} > config.max_loss={cfg.max_loss:g}; "
            f"stopped without saving this step (last checkpoint: step {last_saved}). Lower the learning rate.",
            step=done)
      else:
        good = metrics
      if done % cfg.log_every == 0 or done == total or done == sft_steps:
        scalars = {} if good is None else {
            k: float(v) for k, v in jax.device_get(good).items() if k not in ("finite", "skipped", "step")}
        if cfg.on_nonfinite == "skip":
          scalars["skipped_updates"] = float(skipped)
        writer.write(done, scalars, phase=phase)
        progress.log(done, phase, scalars, progress.stats(done))
      stop = guard.should_stop(done)
      if done % cfg.checkpoint_every == 0 or done == total or done == sft_steps or stop:
        ckpt.save(done, objects)
        last_saved = done
      if stop:
        import signal  # pylint: disable=import-outside-toplevel
        progress.message(
            f"{signal.Signals(stop).name}: stopped after step {done}; checkpoint saved in {ckpt_dir}; "
            "re-run the same command to resume.")
        raise run_lib.Preempted(stop, done)
    progress.close()

    final = objects["pref"] if total > sft_steps else objects["sft"]
    after = evaluate(pref_eval, final.params, {"reference": objects["reference"]}, eval_data, cfg.eval_batch_size,
                     to_device=to_device)
    progress.message(f"[eval @ {total}] policy:    " + _fmt(after))
    result = {"loss": loss_cfg.name, "steps": total, "eval_before": before, "eval_after": after,
              "workdir": workdir, "resumed_from": start, "skipped_updates": skipped,
              "budget_history": record["history"]}
    if main:
      with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    if before is not None:
      progress.message(
          "held-out preference accuracy of the policy (log pi(y_w) > log pi(y_l)): "
          f"{before['policy/preference_accuracy']:.3f} (reference) -> "
          f"{after['policy/preference_accuracy']:.3f} (after {loss_cfg.name})")
    return result
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    ckpt.close()
