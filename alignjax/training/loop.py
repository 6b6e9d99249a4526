"""The train/eval loop as a library function: :func:`run`; :func:`evaluate_run` re-evaluates its steps.

Launchers and notebooks call it the same way::

  cfg = config.build(config_dict)                   # validated, typed, frozen
  result = loop.run(cfg, workdir="runs/x", writer=run_lib.metrics_writer("runs/x"))
  evals = loop.evaluate_run("runs/x", steps=[0, 100])   # any checkpointed step, as the run evaluates

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
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Optional

from alignjax.training import algorithms
from alignjax.training import config as config_lib
from alignjax.training import runtime as run_lib
from alignjax.training.checkpoint import FINAL_POLICY, load_policy
from alignjax.training.config import ConfigError, RunConfig

__all__ = ["FINAL_POLICY", "IdentityMismatch", "evaluate", "load_policy", "make_policy", "open_data", "run"]



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


def warmup_cosine(count, peak, warmup_steps, total_steps, *, xp=None):
  """optax's ``warmup_cosine_decay_schedule(0, peak, warmup_steps, total_steps, end_value=0.1 * peak)``.

  Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to
  10% of ``peak`` at ``total_steps`` (``0 < warmup_steps < total_steps``, as
  :func:`optimizer` passes them). Written with ``jnp`` (``xp``, default) so
  that every argument may be traced (optax's takes the step counts as Python
  numbers); ``xp=numpy`` evaluates it on the host.
  """
  if xp is None:
    import jax.numpy as xp  # pylint: disable=import-outside-toplevel
  f32 = lambda x: xp.asarray(x, xp.float32)
  count, peak, warmup, total = f32(count), f32(peak), f32(warmup_steps), f32(total_steps)
  warm = peak * xp.minimum(count, warmup) / warmup
  t = xp.minimum(count - warmup, total - warmup) / (total - warmup)
  cosine = peak * (f32(0.9 * 0.5) * (1 + xp.cos(f32(xp.pi) * t)) + f32(0.1))
  return xp.where(count < warmup, warm, cosine)


def optimizer(phase: config_lib.PhaseConfig, *, weight_decay: float, decay: Optional[Callable] = None) -> Any:
  """AdamW with linear warm-up and cosine decay to 10% of ``phase.learning_rate``.

  Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
  arXiv:1711.05101. Gradient clipping is done by the train step. ``decay``:
  ``fn(path) -> rate`` per parameter (a tuple of names) instead of one
  ``weight_decay`` (optax's ``adamw`` chain with a per-parameter rate).

  The learning rate, the schedule's step counts and ``weight_decay`` are
  ``optax.inject_hyperparams`` values, kept in the optimizer state: runs that
  differ only in them (a learning-rate sweep, a longer budget) run one compiled
  step. :func:`set_schedule` puts a config's values into a restored state.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  def adamw(learning_rate, warmup_steps, total_steps, weight_decay):
    schedule = lambda count: warmup_cosine(count, learning_rate, warmup_steps, total_steps)
    if decay is None:
      return optax.adamw(schedule, weight_decay=weight_decay)
    from alignjax.sharding import path_key  # pylint: disable=import-outside-toplevel

    def update(updates, state, params):
      add = lambda path, u, p: u + decay(path_key(path)) * p
      return jax.tree_util.tree_map_with_path(add, updates, params), state
    per_parameter = optax.GradientTransformation(lambda params: optax.EmptyState(), update)
    return optax.chain(optax.scale_by_adam(), per_parameter, optax.scale_by_learning_rate(schedule))

  return optax.inject_hyperparams(adamw, hyperparam_dtype=jax.numpy.float32)(**_schedule_values(phase, weight_decay))


def _schedule_values(phase: config_lib.PhaseConfig, weight_decay: float) -> dict[str, float]:
  return {"learning_rate": float(phase.learning_rate), "warmup_steps": float(max(phase.warmup_steps, 1)),
          "total_steps": float(max(phase.steps, phase.warmup_steps + 1)), "weight_decay": float(weight_decay)}


def set_schedule(state, phase: config_lib.PhaseConfig, weight_decay: float):
  """``state`` (a train state of :func:`optimizer`) with ``phase``'s schedule values (a resumed run's config)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from alignjax import sharding  # pylint: disable=import-outside-toplevel
  opt = state.opt_state
  values = {k: sharding.put(np.asarray(v, opt.hyperparams[k].dtype), opt.hyperparams[k].sharding)
            for k, v in _schedule_values(phase, weight_decay).items()}
  return state._replace(opt_state=opt._replace(hyperparams=values))


def _decay(algo, hparams, weight_decay: float, *, owned: bool) -> Optional[Callable]:
  """``fn(path) -> rate`` of ``algo.param_decay`` (``owned=False``: 0 for the algorithm's own parameters)."""
  if algo.param_decay is None:
    return None

  def rate(path):
    r = algo.param_decay(hparams, path)
    return weight_decay if r is None else (r if owned else 0.0)
  return rate


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
  from alignjax.data import batch as batch_lib  # pylint: disable=import-outside-toplevel
  n = batch_lib.num_examples(data)
  totals: dict[str, float] = {}
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in data.items()}
    size = batch_lib.num_examples(batch)
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


def stored_config(workdir: str) -> RunConfig:
  """The config of the run in ``workdir``: the one stored with its checkpoints (else its ``config.json``)."""
  workdir = os.path.abspath(workdir)
  record = run_lib.read_record(os.path.join(workdir, "checkpoints")) or {}
  flat = record.get("config")
  if flat is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise ConfigError(f"workdir: {workdir} holds no run (no checkpoints/{run_lib.RECORD} or config.json).")
    with open(path) as f:
      flat = json.load(f)
  return config_lib.build(None, **flat)


def evaluable_steps(workdir: str, cfg: Optional[RunConfig] = None) -> list[int]:
  """The steps :func:`evaluate_run` accepts: the preference phase's start (step 0 without SFT)
  and every checkpointed step from there on, in order."""
  workdir = os.path.abspath(workdir)
  sft_steps = (cfg or stored_config(workdir)).sft.steps
  ckpt_dir = os.path.join(workdir, "checkpoints")
  saved = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  return sorted({s for s in saved if s >= sft_steps} | ({0} if sft_steps == 0 else set()))


def evaluate_run(workdir: str, *, steps: Optional[Iterable[int]] = None) -> list[dict[str, Any]]:
  """The preference metrics of a run's policy at checkpointed steps, on the run's eval split.

  What ``trainer.evaluate()`` gives in TRL, for any saved step of a run of
  :func:`run`, finished or not: the run is rebuilt once from the config stored
  with its checkpoints, and each step is restored and evaluated as :func:`run`
  evaluates (the algorithm's eval step: its loss and metrics, e.g. DPO's
  rewards, margins and ``policy/preference_accuracy``, example-weighted over
  the eval rows). At the preference phase's start (the last SFT step, or step
  0 without SFT) the policy is its own reference: the run's ``eval_before``.
  Later steps are evaluated against the run's reference; the final step gives
  ``eval_after``. The workdir is not locked and nothing in it is changed, so a
  run in progress may be evaluated; the one exception is the precomputed
  reference mode at the preference phase's start, whose reference pass is
  written as the run writes it.

  Args:
    workdir: a run's working directory.
    steps: checkpointed steps, and step 0 when the run has no SFT warm-up
      (default: the newest).

  Returns:
    One ``{"step", "phase", "loss", "metrics"}`` per step, in order; ``phase`` is
    ``"start"`` (the preference phase's start) or ``"preference"``.

  Raises:
    ConfigError: no run in ``workdir``, a step not checkpointed, or a step
      inside the SFT warm-up (no preference reference exists yet).
  """
  from alignjax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  cfg = stored_config(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  sft_steps = cfg.sft.steps
  available = evaluable_steps(workdir, cfg)
  if steps is None:
    if not any(available):
      raise ConfigError(f"workdir: {workdir} has no checkpointed step yet.")
    steps = available[-1:]
  steps = sorted({int(x) for x in steps})
  for step in steps:
    if 0 < step < sft_steps:
      raise ConfigError(f"steps: {step} is inside the SFT warm-up (steps 1..{sft_steps}); the preference metrics "
                        f"start at step {sft_steps}, where the policy after SFT becomes the reference.")
    if step not in available:
      raise ConfigError(f"steps: {step} is not a checkpointed step of {workdir} "
                        f"(available: {', '.join(map(str, available)) or 'none'}).")
  s = _setup(cfg, workdir, train=False)
  ckpt = Checkpointer(ckpt_dir, max_to_keep=cfg.max_checkpoints, warn=_warn) if any(steps) else None
  out = []
  try:
    for step in steps:
      if step:
        ckpt.restore(s.objects, step)
      if step == sft_steps:
        s.start_preference_phase()   # as run() does before its first preference step
      else:
        s.load_reference(None)
      out.append({"step": step, "phase": "start" if step == sft_steps else "preference", "loss": s.algo.name,
                  "metrics": s.evaluate_pref(s.objects["pref"].params)})
  finally:
    if ckpt is not None:
      ckpt.close()
  return out


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


@dataclasses.dataclass
class Phase:
  """One phase of a run: steps ``[start, stop)`` of one algorithm with its own optimizer state.

  Attributes:
    name: the phase's name in metrics and progress lines (``sft`` or the loss name).
    key: its train state's key in the checkpointed objects.
    loss: the :class:`algorithms.Loss` it trains.
    start, stop: global step range.
    tx: its optimizer.
    reference: the :class:`reference.Reference` mode of its step.
    frozen: ``fn() -> {name: params}`` of its frozen models (read at each step).
    data: ``fn(host_batch, step) -> host_batch``: the phase's data (schema conversion, rollouts).
  """
  name: str
  key: str
  loss: Any
  start: int
  stop: int
  tx: Any
  reference: Any
  frozen: Callable[[], Mapping[str, Any]]
  data: Callable[[Mapping[str, Any], int], Mapping[str, Any]]


def _schema_adapter(algorithm, cfg: RunConfig):
  """``fn(host_batch) -> host_batch`` in ``algorithm``'s schema (swapped pairs, unpaired rows, KL rows)."""
  from alignjax.data import batch as batch_lib  # pylint: disable=import-outside-toplevel

  def adapt(batch):
    rows = batch_lib.unpaired_rows(batch)   # a file in TRL's unpaired format (prompt, completion, label)
    if rows is not None:
      batch = rows
    schema = batch_lib.detect(batch)
    if cfg.data.swap_pairs and schema.name == "paired":
      batch = batch_lib.swap_pairs(batch)
    if algorithm.schema == "unpaired" and schema.name == "paired":
      batch = batch_lib.unpair(batch)
    elif algorithm.schema == "paired" and schema.name != "paired":
      raise ConfigError(f"config.loss.name: {algorithm.name!r} trains on preference pairs, but the data set holds "
                        "unpaired rows.")
    if algorithm.kl_rows and "kl_tokens" not in batch:
      batch = dict(batch, **batch_lib.mismatched_rows(batch))
    return batch
  return adapt


def _cast_floats(tree, dtype: str):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _frozen_models(algorithm, cfg: RunConfig, policy, mesh):
  """``(Reference, frozen params)`` of the preference phase (frozen params stored in ``precision.frozen``).

  The algorithm's own frozen models (``load_frozen``), nothing (``needs == "none"``),
  or the reference by ``config.reference.mode``: online (params of the policy at
  the start of the preference phase, kept in the checkpointed objects), precomputed
  (log-probs in the batch), free (zero).
  """
  from alignjax.training import reference as reference_lib  # pylint: disable=import-outside-toplevel
  if algorithm.load_frozen is not None:
    ref, params = reference_lib.teachers(**algorithm.load_frozen(cfg, policy.config.vocab_size), mesh=mesh)
    return ref, _cast_floats(params, cfg.precision.frozen)
  if algorithm.needs == "none":
    return reference_lib.none()
  mode = cfg.reference.mode
  if mode == "precomputed":
    return reference_lib.precomputed()
  if mode == "adapter_off":
    return reference_lib.adapter_off()
  if mode == "free":
    return reference_lib.free()
  return reference_lib.online(policy, mesh=mesh)


class _Indexed:
  """A random-access source whose records carry their index (``example_index``)."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    return dict(self._source[i], example_index=i)


def _precompute_reference(cfg: RunConfig, workdir: str, params, policy, train_source, eval_data, adapt, mesh):
  """``(train store, eval_data with reference keys)``: one pass of the reference (the policy at ``params``).

  Written once to ``<workdir>/reference_logps/{train,eval}`` (by example index); a
  resumed run reads them back and never holds the reference model.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax.data import to_arrays  # pylint: disable=import-outside-toplevel
  from alignjax.training import reference as reference_lib  # pylint: disable=import-outside-toplevel
  root = os.path.join(workdir, "reference_logps")
  out = {}
  for split, source in (("train", train_source), ("eval", eval_data)):
    path = os.path.join(root, split)
    if params is not None:
      graphdef, _, rest = nnx.split(policy, nnx.Param, ...)
      model = nnx.merge(graphdef, params, rest)
      n = len(source) if split == "train" else len(next(iter(source.values())))
      step = cfg.eval_batch_size

      def batches():
        for i in range(0, n, step):
          idx = np.arange(i, min(i + step, n))
          rows = to_arrays([source[j] for j in idx]) if split == "train" else {
              k: v[idx] for k, v in source.items()}
          yield idx, {k: v for k, v in rows.items() if k != "example_index"}
      first_on_process_zero(lambda: reference_lib.precompute(model, batches(), path, num_examples=n,
                                                             chunk_size=cfg.chunk_size, mesh=None),
                            f"alignjax-reference-{split}")
    out[split] = reference_lib.load(path)
  n_eval = len(next(iter(eval_data.values())))
  eval_data = adapt(reference_lib.attach(eval_data, out["eval"], np.arange(n_eval)))
  return out["train"], eval_data


@dataclasses.dataclass
class _Setup:
  """What :func:`run` and :func:`evaluate_run` build from a config before any step.

  ``objects`` are the checkpointed pytrees (both phases' train states and the
  online reference); ``evaluate_pref(params)`` gives the preference metrics on the
  eval split; ``start_preference_phase()`` makes the policy after SFT the
  preference phase's start and reference; ``load_reference(params)`` reads (or,
  with ``params``, computes) the precomputed reference log-probs.
  """
  algo: Any
  data_name: str
  train_ds: Any
  policy: Any
  mesh: Any
  phases: list
  objects: dict
  to_device: Callable
  compute: Optional[str]
  ches_note: Optional[str]
  evaluate_pref: Callable[[Any], dict]
  load_reference: Callable[[Any], None]
  start_preference_phase: Callable[[], None]


def _setup(cfg: RunConfig, workdir: str, *, train: bool = True) -> _Setup:
  """Data, models, phases and initial state of the run ``cfg`` in ``workdir`` (``train=False``: no CHES filter)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from alignjax.data import batch as batch_lib  # pylint: disable=import-outside-toplevel
  from alignjax.data import preference_batches, to_arrays  # pylint: disable=import-outside-toplevel
  from alignjax.training import reference as reference_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import steps as steps_lib  # pylint: disable=import-outside-toplevel

  algo = algorithms.get(cfg.loss.name)
  pref_loss = algorithms.Loss(algo, config_lib.hparams(cfg))
  train_source, eval_source, vocab_size, data_name = first_on_process_zero(
      lambda: open_data(cfg, workdir), "alignjax-data")
  if len(train_source) < cfg.batch_size:
    raise ConfigError(f"config.batch_size ({cfg.batch_size}) exceeds the {len(train_source)} training rows of "
                      f"{data_name}.")
  train_ds = preference_batches(train_source, cfg.batch_size, seed=cfg.seed)
  adapt = _schema_adapter(algo, cfg)
  eval_data = adapt(to_arrays(eval_source))

  mesh = make_mesh(cfg.mesh)
  policy = make_policy(cfg, vocab_size)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if algo.make_model is not None:   # the model the algorithm trains, built on the policy (e.g. a reward model)
    policy = algo.make_model(policy, nnx.Rngs(cfg.seed + 1), pref_loss.hparams)
  if cfg.lora.enabled:   # adapters only are trained and checkpointed; the base weights come from the policy
    from alignjax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
    try:
      policy = lora_lib.apply_lora(policy, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets,
                                   dropout=cfg.lora.dropout, rngs=nnx.Rngs(params=cfg.seed + 2, dropout=cfg.seed + 3))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.lora: {e}") from None
  base = _cast_floats(steps_lib.frozen_base(policy, mesh=mesh), cfg.precision.frozen)   # {} without LoRA
  ches_note = None
  if train and cfg.data.ches_keep < 1.0:   # likelihood-displacement filter: lowest-CHES pairs under the initial policy
    from alignjax.training import diagnostics  # pylint: disable=import-outside-toplevel
    n_all = len(train_source)
    train_source, _ = diagnostics.ches_filter(policy, to_arrays(train_source), keep_fraction=cfg.data.ches_keep)
    ches_note = f"CHES filter: kept the {batch_lib.num_examples(train_source)} of {n_all} training pairs with the " \
                f"lowest score (data.ches_keep={cfg.data.ches_keep:g})"
    train_ds = preference_batches(train_source, min(cfg.batch_size, batch_lib.num_examples(train_source)),
                                  seed=cfg.seed)
  sft_steps, total = cfg.sft.steps, cfg.sft.steps + cfg.dpo.steps
  pref_ref, pref_frozen_models = _frozen_models(algo, cfg, policy, mesh)
  precomputed = pref_ref.mode == "precomputed"
  if precomputed:   # the reference log-probs are looked up by example index
    train_source = _Indexed(train_source)
    train_ds = preference_batches(train_source, cfg.batch_size, seed=cfg.seed)
    raw_eval = to_arrays(eval_source)
  seq_len = int(np.shape(eval_data[batch_lib.detect(eval_data).first_key])[1])
  rollout = algo.rollout(cfg, policy, seq_len) if algo.rollout is not None else None
  phases = [
      Phase("sft", "sft", algorithms.loss("sft"), 0, sft_steps, optimizer(
          cfg.sft, weight_decay=cfg.weight_decay, decay=_decay(algo, pref_loss.hparams, cfg.weight_decay, owned=False)),
            reference_lib.none()[0], lambda: base, lambda b, step: b),
      Phase(algo.name, "pref", pref_loss, sft_steps, total, optimizer(
          cfg.dpo, weight_decay=cfg.weight_decay, decay=_decay(algo, pref_loss.hparams, cfg.weight_decay, owned=True)),
            pref_ref, None, None),
  ]
  sft, pref = phases
  # Everything a resumed run needs, as pytrees: both phases' train states and the frozen
  # reference (the policy at the end of SFT); sharded over the mesh if any.
  objects = {"sft": steps_lib.init_state(policy, sft.tx, mesh=mesh),
             "pref": steps_lib.init_state(policy, pref.tx, mesh=mesh)}
  online_reference = pref_ref.mode == "online" and algo.load_frozen is None and algo.needs != "none"
  if online_reference or algo.load_frozen is not None:   # (teacher runs keep it too, as before)
    objects["reference"] = _cast_floats(reference_lib.online(policy, mesh=mesh)[1]["reference"],
                                        cfg.precision.frozen)
  pref.frozen = ((lambda: {"reference": objects["reference"], **base}) if online_reference
                 else (lambda: {**pref_frozen_models, **base}))
  reference_store = {}

  def pref_data(host_batch, step):
    if precomputed:
      host_batch = reference_lib.attach(host_batch, reference_store["train"], host_batch["example_index"])
    host_batch = adapt(host_batch)
    return rollout(objects["pref"].params, host_batch, step) if rollout is not None else host_batch
  pref.data = pref_data
  sft.data = lambda b, step: batch_lib.unpaired_rows(b) or b   # unpaired files: SFT on the desirable rows
  to_device = global_batch(mesh)
  compute = None if cfg.precision.compute_dtype == cfg.precision.param_dtype else cfg.precision.compute_dtype
  pref_eval = steps_lib.make_eval_step(policy, pref_loss, pref_ref, mesh=mesh, compute_dtype=compute,
                                       chunk_size=cfg.chunk_size)

  def evaluate_pref(params):
    return evaluate(pref_eval, params, pref.frozen(), reference_store.get("eval", eval_data), cfg.eval_batch_size,
                    to_device=to_device)

  def load_reference(params):
    """Precomputed mode: the reference pass at the start of the preference phase (or its files)."""
    if precomputed and "train" not in reference_store:
      reference_store["train"], reference_store["eval"] = _precompute_reference(
          cfg, workdir, params, policy, train_source, raw_eval, adapt, mesh)

  def start_preference_phase():
    """The policy after SFT starts the preference phase and is its frozen reference."""
    params = objects["sft"].params
    objects["pref"] = steps_lib.TrainState(
        objects["pref"].step * 0, jax.tree.map(jnp.copy, params), jax.jit(pref.tx.init)(params),
        objects["pref"].skipped * 0)
    if "reference" in objects:   # every weight of the policy now (with LoRA: base + the SFT adapters)
      full = nnx.state(steps_lib.update_model(policy, objects["sft"]), nnx.Param)
      objects["reference"] = _cast_floats(jax.tree.map(jnp.copy, full), cfg.precision.frozen)
    if precomputed:
      reference_store.clear()
      load_reference(params)

  return _Setup(algo, data_name, train_ds, policy, mesh, phases, objects, to_device, compute, ches_note,
                evaluate_pref, load_reference, start_preference_phase)


def _run(cfg: RunConfig, workdir: str, writer, progress, explicit, guard) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax.data import batch as batch_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import steps as steps_lib  # pylint: disable=import-outside-toplevel
  from alignjax import memory as memory_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  main = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, "checkpoints")
  cfg, record = _resolve_identity(cfg, workdir, ckpt_dir, explicit)
  stored_budget = dict(record["budget"]) if record.get("budget") else None

  s = _setup(cfg, workdir)
  algo, policy, mesh, objects, to_device = s.algo, s.policy, s.mesh, s.objects, s.to_device
  sft, pref = phases = s.phases
  sft_steps, total = cfg.sft.steps, cfg.sft.steps + cfg.dpo.steps
  evaluate_pref, load_reference, start_preference_phase = s.evaluate_pref, s.load_reference, s.start_preference_phase
  train_ds = s.train_ds

  ckpt = Checkpointer(ckpt_dir, max_to_keep=cfg.max_checkpoints, warn=_warn if main else (lambda m: None))
  writer = run_lib.metrics_writer(workdir) if writer is None else writer
  try:
    start = ckpt.restore_latest_valid(objects) or 0
    if start:   # the config's schedule (a longer budget than the stored one changes total_steps)
      for key, phase_cfg in (("sft", cfg.sft), ("pref", cfg.dpo)):
        objects[key] = set_schedule(objects[key], phase_cfg, cfg.weight_decay)
    if start > total:
      raise ConfigError(
          f"config.dpo.steps={cfg.dpo.steps} gives a budget of {total} steps, below the restored step {start}; "
          "pass a larger --config.dpo.steps.")
    record = _update_record(cfg, record, start, total, stored_budget)
    run_lib.write_record(ckpt_dir, record)
    if main:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_lib.flatten(cfg), f, indent=2)
    writer.open(start)
    progress = progress or run_lib.Progress(total, start, enabled=main)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))
    n_trainable = sum(x.size for x in jax.tree.leaves(objects["sft"].params))
    progress.set_peak_flops(run_lib.peak_flops(cfg.precision.compute_dtype))
    if start:
      progress.message(f"resumed from step {start} of {total} ({ckpt_dir})")
    if s.ches_note:
      progress.message(s.ches_note)
    progress.message(
        f"alignjax: {algo.name} on {s.data_name} | devices={jax.devices()} | params={n_params:,} | "
        f"trainable={n_trainable:,} | "
        f"steps: sft {sft_steps} + preference {cfg.dpo.steps}")

    # Non-finite updates are never applied (skip_nonfinite); the loop then stops or goes on.
    compute = s.compute
    step_kwargs = dict(max_grad_norm=cfg.max_grad_norm, skip_nonfinite=True, mesh=mesh, grad_accum=cfg.grad_accum,
                       compute_dtype=compute, chunk_size=cfg.chunk_size)
    step_fns = {ph.key: steps_lib.make_train_step(policy, ph.tx, ph.loss, ph.reference, **step_kwargs)
                for ph in phases if ph.stop > ph.start}
    if cfg.diagnostics_every:
      from alignjax.training import diagnostics  # pylint: disable=import-outside-toplevel
      entanglement_fn = diagnostics.make_entanglement_fn(policy, chunk_size=cfg.chunk_size, mesh=mesh)

    if start > sft_steps:
      load_reference(None)
    before = None
    before_path = os.path.join(workdir, "eval_before.json")
    if start >= sft_steps and start > 0 and os.path.exists(before_path):
      with open(before_path) as f:
        before = json.load(f)
    skipped, last_saved, good, loss, reported = 0, start if start else None, None, float("nan"), set()
    raw = train_ds[start] if start < total else None
    for step in range(start, total):
      if step == sft_steps:
        start_preference_phase()
        before = evaluate_pref(objects["pref"].params)
        if main:
          with open(before_path, "w") as f:
            json.dump(before, f)
        progress.message(f"[eval @ {step}] reference: " + _fmt(before))
      phase = sft if step < sft_steps else pref
      host_batch = phase.data(raw, step)
      batch = to_device(host_batch)
      if cfg.report_memory and phase.key not in reported:
        reported.add(phase.key)
        progress.message(_memory_report(cfg, phase, policy, step_fns[phase.key], objects[phase.key], batch,
                                        phase.frozen(), host_batch))
      objects[phase.key], metrics = step_fns[phase.key](objects[phase.key], batch, phase.frozen())
      # The next batch is read while the device computes this step (dispatch is asynchronous; reading
      # batches[step] is random access, so a run that stops here resumes from the same batch).
      raw = train_ds[step + 1] if step + 1 < total else None
      sides = batch_lib.detect(host_batch).present_sides(host_batch)
      tokens = float(sum(np.sum(host_batch[f"{s}_attention"]) for s in sides))
      flops = phase.loss.algorithm.flops_per_token(
          n_params, frozen_weights=cfg.lora.enabled, reference_mode=phase.reference.mode,
      ) * sum(np.size(host_batch[f"{s}_tokens"]) for s in sides)
      loss, finite = (float(x) for x in jax.device_get((metrics["loss"], metrics["finite"])))
      done = step + 1
      progress.step(done, tokens=tokens, flops=flops)
      if not finite:
        if cfg.on_nonfinite == "stop":
          raise run_lib.TrainingFailed(
              f"non-finite loss, gradients or parameters at step {done} ({phase.name}, loss={loss}); the update "
              f"was not applied and nothing non-finite was saved (last checkpoint: step {last_saved}). "
              "Lower the learning rate, or set config.on_nonfinite=skip.", step=done)
        skipped += 1
      elif loss > cfg.max_loss:
        raise run_lib.TrainingFailed(
            f"training diverged at step {done} ({phase.name}): loss {loss:.4g} > config.max_loss={cfg.max_loss:g}; "
            f"stopped without saving this step (last checkpoint: step {last_saved}). Lower the learning rate.",
            step=done)
      else:
        good = metrics
      if done % cfg.log_every == 0 or done == total or done == sft_steps:
        scalars = {} if good is None else {
            k: float(v) for k, v in jax.device_get(good).items() if k not in ("finite", "skipped", "step")}
        if cfg.on_nonfinite == "skip":
          scalars["skipped_updates"] = float(skipped)
        opt_state = objects[phase.key].opt_state
        if hasattr(opt_state, "hyperparams"):   # loop.optimizer's state: the rate of the last applied update
          hp, count = jax.device_get((opt_state.hyperparams, opt_state.count))
          scalars["learning_rate"] = float(warmup_cosine(
              max(int(count) - 1, 0), hp["learning_rate"], hp["warmup_steps"], hp["total_steps"], xp=np))
        if cfg.diagnostics_every and phase is pref and done % cfg.diagnostics_every == 0:
          scalars.update({k: float(v) for k, v in jax.device_get(
              entanglement_fn(objects["pref"].params, batch)).items()})
        peak = memory_lib.peak_memory()
        if peak.bytes is not None:
          scalars[f"memory/peak_gib_{peak.source}"] = peak.bytes / 2 ** 30
        writer.write(done, scalars, phase=phase.name)
        progress.log(done, phase.name, scalars, progress.stats(done))
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
    after = evaluate_pref(final.params)
    progress.message(f"[eval @ {total}] policy:    " + _fmt(after))
    peak = memory_lib.peak_memory()
    progress.message(f"peak memory ({peak.source}): {memory_lib.format_bytes(peak.bytes)}")
    result = {"loss": algo.name, "steps": total, "eval_before": before, "eval_after": after,
              "workdir": workdir, "resumed_from": start, "skipped_updates": skipped,
              "budget_history": record["history"]}
    # The final policy, for load_policy / init.checkpoint / sampling (before final_metrics.json marks the end).
    from alignjax.models import checkpoint_io  # pylint: disable=import-outside-toplevel
    final_model = steps_lib.update_model(policy, final)
    if cfg.lora.enabled:   # the merged weights W + (alpha/r) A B: what load_policy, sampling and to_hf read
      from alignjax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
      final_model = lora_lib.merge_lora(final_model)
    if algo.export is not None:   # e.g. the policy without an algorithm's own parameters
      final_model = algo.export(final_model)
    checkpoint_io.save_model(final_model, os.path.join(workdir, FINAL_POLICY),
                             force=True)
    if main:
      with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    if before is not None and "policy/preference_accuracy" in before:
      progress.message(
          "held-out preference accuracy of the policy (log pi(y_w) > log pi(y_l)): "
          f"{before['policy/preference_accuracy']:.3f} (reference) -> "
          f"{after['policy/preference_accuracy']:.3f} (after {algo.name})")
    return result
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    ckpt.close()


def _memory_report(cfg: RunConfig, phase: Phase, policy, step_fn, state, batch, frozen, host_batch) -> str:
  """The planner's per-device memory for this run next to the compiled memory analysis of its step.

  The planner (:func:`alignjax.aot.plan`) compiles ``make_train_step`` on abstract
  arguments for this run's model, batch, precision, remat, accumulation and mesh; the
  second figure is ``memory_analysis()`` of the step this loop calls, on its real arguments.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from alignjax import aot, memory  # pylint: disable=import-outside-toplevel
  from alignjax.data import batch as batch_lib  # pylint: disable=import-outside-toplevel
  compiled = memory.compiled_memory(step_fn.lower(state, batch, frozen).compile())
  seq = int(np.shape(host_batch[batch_lib.detect(host_batch).first_key])[1])
  mode = phase.reference.mode if phase.reference.mode in aot.REFERENCE_MODES else "online"
  exp = aot.Experiment(
      algorithm=phase.loss.name, model=policy.config, batch_size=int(np.shape(host_batch[
          batch_lib.detect(host_batch).first_key])[0]), prompt_len=seq // 2, response_len=seq - seq // 2,
      reference=mode, dtype=cfg.precision.compute_dtype, param_dtype=cfg.precision.param_dtype,
      frozen_dtype=cfg.precision.frozen, grad_accum=cfg.grad_accum, chunk_size=cfg.chunk_size,
      max_grad_norm=cfg.max_grad_norm)
  mesh = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  planned = aot.plan(exp, aot.local_topology(int(np.prod(mesh))), mesh)
  return (f"memory per device ({phase.name} step): planned {memory.format_bytes(planned.peak_bytes)} "
          f"(alignjax.aot.plan, as launch/plan.py), compiled {memory.format_bytes(compiled.total)} "
          f"(arguments {memory.format_bytes(compiled.argument)}, temporaries {memory.format_bytes(compiled.temp)})")


def _update_record(cfg: RunConfig, record: Mapping[str, Any], start: int, total: int, stored_budget) -> dict:
  """The run record to store: identity, budget, and the budget history (extensions are recorded)."""
  history = list(record.get("history", []))
  if not history or start == 0:
    history = [{"event": "start", "step": 0, "total": total}]
  elif stored_budget is not None and stored_budget.get("dpo.steps") != cfg.dpo.steps:
    history.append({"event": "budget", "step": start, "total": total,
                    "dpo.steps": [stored_budget.get("dpo.steps"), cfg.dpo.steps]})
  flat = config_lib.flatten(cfg)
  return {"identity": config_lib.identity(cfg), "budget": {f: flat[f] for f in config_lib.BUDGET_FIELDS},
          "history": history, "config": flat}


# ----------------------------------------------------------------------------- data and models

class _Rows:
  """Rows ``[start, stop)`` of a random-access source."""

  def __init__(self, source, start: int, stop: int):
    self._source, self._start, self._len = source, start, max(0, stop - start)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int):
    if not 0 <= i < self._len:
      raise IndexError(i)
    return self._source[self._start + i]


def open_data(cfg: RunConfig, workdir: str):
  """``(train_source, eval_source, vocab_size, description)`` of ``cfg.data``.

  ``sorting`` / ``reviews``: generated sets, written once under ``data.dir``
  (default ``<workdir>/data``); ``arrays``: a data set of
  :mod:`alignjax.data.arrays_tfds` at ``data.path`` (its ``eval`` split if any,
  else the train split; ``vocab_size`` from its metadata); ``file``: a
  preference file tokenised once (:func:`alignjax.data.load_preference_file`),
  its last ``min(data.eval_examples, N // 10)`` rows held out.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  d = cfg.data
  data_dir = os.path.abspath(d.dir) if d.dir else os.path.join(workdir, "data")
  if d.kind == "sorting":
    from alignjax.data import SortingTask, sorting_preferences  # pylint: disable=import-outside-toplevel
    task = SortingTask(d.num_symbols, d.min_len, d.max_len)
    train, ev = sorting_preferences(task, train_examples=d.train_examples, eval_examples=d.eval_examples,
                                    seed=cfg.seed, data_dir=data_dir)
    return train, ev, task.vocab_size, "sorting preferences"
  from alignjax.data import arrays_tfds  # pylint: disable=import-outside-toplevel
  if d.kind == "reviews":
    from alignjax.data.reviews import ReviewsTask  # pylint: disable=import-outside-toplevel
    task = ReviewsTask()
    path = os.path.join(data_dir, f"reviews_n{d.train_examples}-{d.eval_examples}_seed{cfg.seed}")
    arrays_tfds.write_arrays(path, {"train": task.sft_data(d.train_examples, cfg.seed),
                                    "eval": task.sft_data(d.eval_examples, cfg.seed + 1)},
                             metadata={"vocab_size": task.vocab_size})
    return (arrays_tfds.open_arrays(path, "train"), arrays_tfds.open_arrays(path, "eval"), task.vocab_size,
            "generated reviews (SFT)")
  if d.kind == "arrays":
    path = os.path.abspath(d.path)
    if not arrays_tfds.is_prepared(path):
      raise ConfigError(f"config.data.path: {path} holds no data set written by alignjax.data.arrays_tfds.write_arrays.")
    meta = arrays_tfds.read_metadata(path)
    if "vocab_size" not in meta:
      raise ConfigError(f"config.data.path: the metadata of {path} has no vocab_size (pass it to write_arrays).")
    train = arrays_tfds.open_arrays(path, "train")
    ev = arrays_tfds.open_arrays(path, "eval") if "eval" in meta["splits"] else train
    return train, ev, int(meta["vocab_size"]), f"data set {path}"
  from alignjax.data import PreferenceFileConfig, load_preference_file, load_tokenizer  # pylint: disable=import-outside-toplevel
  file_cfg = PreferenceFileConfig(path=os.path.abspath(d.path), tokenizer_dir=os.path.abspath(d.tokenizer),
                                  max_len=d.seq_len)
  source, _ = load_preference_file(file_cfg, data_dir=data_dir)
  n_eval = int(np.clip(len(source) // 10, 1, d.eval_examples)) if len(source) > 1 else 0
  train, ev = _Rows(source, 0, len(source) - n_eval), _Rows(source, len(source) - n_eval, len(source))
  return train, (ev if n_eval else train), load_tokenizer(file_cfg.tokenizer_dir).vocab_size, f"preference file {d.path}"


def with_numerics(model, *, dtype: str, param_dtype: str, remat: str, scan_layers: bool):
  """``model`` with the run's compute/storage dtypes, remat policy and layer layout (same weights).

  Returns ``model`` itself when nothing changes; else a new model whose parameters
  are the old ones cast to ``param_dtype`` (stacked or unstacked for ``scan_layers``).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax.models import transformer as transformer_lib  # pylint: disable=import-outside-toplevel
  cfg = model.config
  if (cfg.dtype, cfg.param_dtype, cfg.remat) != (dtype, param_dtype, remat):
    new_cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
    out = nnx.eval_shape(lambda: type(model)(new_cfg, rngs=nnx.Rngs(0)))
    state = jax.tree.map(lambda x: x.astype(param_dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
                         nnx.state(model, nnx.Param))
    nnx.update(out, state)
    model = out
  if cfg.scan_layers != scan_layers:
    model = transformer_lib.stack_layers(model) if scan_layers else transformer_lib.unstack_layers(model)
  return model


@functools.lru_cache(maxsize=16)
def _initializer(model_cfg):
  """``(graphdef, jitted key -> state)`` of ``Transformer(model_cfg, rngs=nnx.Rngs(key))``.

  One program draws every initial weight: eagerly, each parameter shape compiles
  its own sampler (under JAX's default 1 s threshold of the persistent cache, every
  process compiled them all again; with the launchers' threshold of 0, one cache
  read each); this one compiles once per config and process and the cache keeps it
  (``bench/init.py``). The values are ``nnx.Rngs(seed)``'s, to float32 rounding.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax.models import Transformer  # pylint: disable=import-outside-toplevel

  def initial_state(key):
    return nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(key)))

  return nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))), jax.jit(initial_state)


def make_policy(cfg: RunConfig, vocab_size: int):
  """The policy model: ``config.model`` for ``vocab_size`` (random init), or ``init.checkpoint``'s model.

  Either way with the run's numerics: ``precision.compute_dtype`` / ``param_dtype``,
  ``model.remat`` and ``model.scan_layers``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  numerics = dict(dtype=cfg.precision.compute_dtype, param_dtype=cfg.precision.param_dtype,
                  remat=cfg.model.remat, scan_layers=cfg.model.scan_layers)
  if not cfg.init.checkpoint:
    # Initialised per layer, then stacked: a run's initial weights do not depend on the layout.
    model_cfg = dataclasses.replace(cfg.model.model_config(vocab_size), **dict(numerics, scan_layers=False))
    if model_cfg.vocab_size < vocab_size:
      raise ConfigError(f"config.model.preset: {cfg.model.preset!r} has vocab_size {model_cfg.vocab_size}, smaller "
                        f"than the data's {vocab_size}.")
    graphdef, init = _initializer(model_cfg)
    return with_numerics(nnx.merge(graphdef, init(jax.random.key(cfg.seed))), **numerics)
  policy = load_policy(cfg.init.checkpoint, where="config.init.checkpoint")
  if policy.config.vocab_size < vocab_size:
    raise ConfigError(f"config.init.checkpoint: its model's vocab_size {policy.config.vocab_size} is smaller than "
                      f"the data's {vocab_size}.")
  policy = with_numerics(policy, **numerics)
  # Fresh, uncommitted buffers like a random init's (restored arrays are committed to a device,
  # which makes the first jitted step compile a second time).
  nnx.update(policy, jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), nnx.state(policy)))
  return policy
