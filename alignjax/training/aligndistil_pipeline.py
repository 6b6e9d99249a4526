"""The AlignDistil pipeline: SFT -> DPO and reverse DPO -> off-/on-policy distillation.

Zhang et al. 2025, "AlignDistil: Token-Level Language Model Alignment as
Adaptive Policy Distillation", ACL 2025, arXiv:2503.02832, run as the authors'
scripts do (``songmzhang/AlignDistil``), on the generated reviews task of
:mod:`alignjax.data.reviews` (a programmatic gold reward) -- every training
stage one :func:`alignjax.training.loop.run` call with the config that
``launch/train.py --config=configs/aligndistil.py:<stage>`` builds:

1. ``data``: the reviews SFT set (train + eval) as a TFDS array_record data set.
2. ``sft``: supervised fine-tuning of the policy.
3. ``preferences``: ``samples_per_prompt`` responses per training prompt
   sampled from the SFT model at temperature 1 (:func:`alignjax.decoding.generate`),
   paired and labelled by the gold reward with Bradley--Terry noise
   (:func:`alignjax.data.reviews.sampled_preferences`).
4. ``dpo`` and ``rdpo``: DPO from the SFT checkpoint, and reverse DPO (the same
   run on swapped pairs, ``data.swap_pairs``), both at ``beta``.
5. ``offpolicy``: AlignDistil of a student initialised from SFT on the chosen
   responses of the preference set, with the frozen DPO (teacher) and reverse
   DPO (contrast) models; ``beta``, ``beta2_offpolicy`` (10), ``temperature``
   (1), length-normalised, as the authors' off-policy script.
6. ``onpolicy``: the same from SFT with one student sample per prompt each step
   (temperature 1, top-p 1) and ``beta2_onpolicy`` (15), as the authors'
   on-policy script.
7. ``evaluate``: after each stage, the mean gold reward of ``eval_samples``
   responses per held-out prompt (temperature 1) and ``KL(pi || pi_SFT)``
   estimated from the same samples (:mod:`alignjax.study.evaluation`), with
   standard errors; ``results.jsonl`` and ``results.md`` in the workdir.

Each stage's checkpoint is the next one's input (a stage whose input run is
missing or unfinished refuses to start with a one-line error); everything is
resumable: data sets are written once, a finished stage (``final_metrics.json``
of the same identity and budget) is skipped, a partial one resumes from its
checkpoint, and an evaluation already on disk is reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np

from alignjax.training.config import ConfigError

__all__ = ["PipelineConfig", "PipelineError", "STAGES", "TRAIN_STAGES", "build", "run_pipeline",
           "stage_config", "stage_fields"]

TRAIN_STAGES = ("sft", "dpo", "rdpo", "offpolicy", "onpolicy")
STAGES = ("data", "sft", "preferences", "dpo", "rdpo", "offpolicy", "onpolicy")


class PipelineError(ConfigError):
  """A user error in the pipeline configuration (one line; launchers exit with code 2)."""


def _f(default, help: str):
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
  """Every knob of the pipeline (validated by :func:`build`); defaults follow the authors' scripts."""
  seed: int = _f(0, "seed of data, sampling, labels and model init (>= 0)")
  # The task (alignjax.data.reviews.ReviewsTask).
  num_topics: int = _f(8, "reviews task: prompt topics (>= 2)")
  min_len: int = _f(4, "reviews task: shortest reference review, words (>= 1)")
  max_len: int = _f(10, "reviews task: longest reference review, words (>= min_len)")
  sentiment_rate: float = _f(0.3, "reviews task: probability a reference word is a sentiment word, in (0, 1)")
  model_preset: str = _f("llama_tiny", "the training config's model.preset (vocabulary from the data)")
  batch_size: int = _f(32, "examples per step of every stage (>= 1)")
  # SFT.
  sft_examples: int = _f(2048, "reference reviews in the SFT set (>= batch_size)")
  sft_steps: int = _f(300, "SFT optimizer steps (>= 1)")
  sft_learning_rate: float = _f(3e-3, "SFT peak learning rate (> 0)")
  # Preference data.
  preference_prompts: int = _f(512, "training prompts sampled from the SFT model (>= 1)")
  samples_per_prompt: int = _f(4, "responses sampled per training prompt, K (>= 2); K // 2 pairs per prompt")
  label_temperature: float = _f(0.1, "Bradley-Terry temperature of the gold-reward labels (> 0)")
  # DPO and reverse DPO.
  beta: float = _f(0.1, "beta of the DPO and reverse-DPO models, and AlignDistil's beta (> 0)")
  dpo_steps: int = _f(150, "optimizer steps of the DPO and the reverse-DPO run (>= 1)")
  dpo_learning_rate: float = _f(1e-3, "DPO peak learning rate (> 0)")
  # AlignDistil.
  beta2_offpolicy: float = _f(10.0, "AlignDistil beta2 off-policy (> 0; authors: 10)")
  beta2_onpolicy: float = _f(15.0, "AlignDistil beta2 on-policy (> 0; authors: 15)")
  mode: str = _f("aligndistil", "AlignDistil teacher mode (aligndistil, theorem1, theorem1_contrast, theorem1_adaptive)")
  temperature: float = _f(1.0, "AlignDistil teacher temperature tau (> 0; authors: 1)")
  length_normalize: bool = _f(True, "per-example mean of the token losses (authors: True)")
  distill_steps: int = _f(150, "optimizer steps of off-policy distillation (>= 1)")
  onpolicy_steps: int = _f(150, "optimizer steps of on-policy distillation (0: skip the stage)")
  distill_learning_rate: float = _f(1e-3, "distillation peak learning rate (> 0)")
  # Evaluation.
  eval_prompts: int = _f(64, "held-out prompts (>= 2)")
  eval_samples: int = _f(8, "responses sampled per held-out prompt (>= 1)")

  @property
  def task(self):
    from alignjax.data.reviews import ReviewsTask  # pylint: disable=import-outside-toplevel
    return ReviewsTask(num_topics=self.num_topics, min_len=self.min_len, max_len=self.max_len,
                       sentiment_rate=self.sentiment_rate)

  @property
  def train_stages(self) -> tuple[str, ...]:
    return TRAIN_STAGES if self.onpolicy_steps > 0 else TRAIN_STAGES[:-1]


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise PipelineError(msg)


def build(config: Any = None, **overrides: Any) -> PipelineConfig:
  """A validated :class:`PipelineConfig` from a ``ConfigDict``/mapping (missing fields: defaults).

  Raises :class:`PipelineError` (one line) on an unknown or invalid field.
  """
  if config is None:
    mapping: dict = {}
  elif isinstance(config, PipelineConfig):
    mapping = dataclasses.asdict(config)
  elif hasattr(config, "to_dict"):
    mapping = config.to_dict()
  elif isinstance(config, Mapping):
    mapping = dict(config)
  else:
    raise PipelineError(f"build: `config` must be a ConfigDict, a mapping or a PipelineConfig, got {type(config).__name__}.")
  mapping.update(overrides)
  fields = {f.name for f in dataclasses.fields(PipelineConfig)}
  unknown = sorted(set(mapping) - fields)
  _check(not unknown, f"pipeline config: unknown field(s) {unknown}; expected a subset of {sorted(fields)}.")
  default = PipelineConfig()
  kwargs = {}
  for name, value in mapping.items():
    d = getattr(default, name)
    where = f"pipeline config `{name}`"
    if isinstance(d, bool):
      _check(isinstance(value, bool), f"{where} must be a bool, got {value!r}.")
    elif isinstance(d, int):
      _check(isinstance(value, (int, np.integer)) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}.")
      value = int(value)
    elif isinstance(d, float):
      _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
             f"{where} must be a finite number, got {value!r}.")
      value = float(value)
    elif isinstance(d, str):
      _check(isinstance(value, str), f"{where} must be a string, got {value!r}.")
    kwargs[name] = value
  cfg = PipelineConfig(**kwargs)
  validate(cfg)
  return cfg


def validate(cfg: PipelineConfig) -> None:
  """Checks every field of ``cfg``; raises :class:`PipelineError` naming the field."""
  from alignjax.losses.aligndistil import MODES  # pylint: disable=import-outside-toplevel
  _check(cfg.seed >= 0, f"pipeline config `seed` must be >= 0, got {cfg.seed}.")
  try:
    cfg.task  # pylint: disable=pointless-statement
  except ValueError as e:
    raise PipelineError(f"pipeline config: {e}") from None
  for name in ("batch_size", "sft_steps", "preference_prompts", "dpo_steps", "distill_steps", "eval_samples"):
    _check(getattr(cfg, name) >= 1, f"pipeline config `{name}` must be >= 1, got {getattr(cfg, name)}.")
  _check(cfg.onpolicy_steps >= 0, f"pipeline config `onpolicy_steps` must be >= 0, got {cfg.onpolicy_steps}.")
  _check(cfg.eval_prompts >= 2, f"pipeline config `eval_prompts` must be >= 2 (standard errors), got {cfg.eval_prompts}.")
  _check(cfg.samples_per_prompt >= 2, f"pipeline config `samples_per_prompt` must be >= 2, got {cfg.samples_per_prompt}.")
  _check(cfg.sft_examples >= cfg.batch_size,
         f"pipeline config `sft_examples` ({cfg.sft_examples}) must be >= `batch_size` ({cfg.batch_size}).")
  pairs = cfg.preference_prompts * (cfg.samples_per_prompt // 2)
  _check(_split_sizes(pairs)[0] >= cfg.batch_size,
         f"pipeline config: {pairs} preference pairs give {_split_sizes(pairs)[0]} training pairs, fewer than "
         f"`batch_size` {cfg.batch_size}; raise `preference_prompts`.")
  for name in ("sft_learning_rate", "label_temperature", "beta", "dpo_learning_rate", "beta2_offpolicy",
               "beta2_onpolicy", "temperature", "distill_learning_rate"):
    _check(getattr(cfg, name) > 0, f"pipeline config `{name}` must be > 0, got {getattr(cfg, name)}.")
  _check(cfg.mode in MODES, f"pipeline config `mode` must be one of {list(MODES)}, got {cfg.mode!r}.")


def _split_sizes(pairs: int) -> tuple[int, int]:
  """(train, eval) pairs of the preference set: 1/8 held out (at least 1)."""
  n_eval = max(1, pairs // 8)
  return pairs - n_eval, n_eval


# ----------------------------------------------------------------------------- stage configs

def stage_fields(cfg: PipelineConfig, stage: str, root: str) -> dict[str, Any]:
  """The loop config (dotted fields) of one training stage whose runs live under ``root``.

  ``root/<stage>`` is the stage's workdir; ``root/data/{sft,preferences}`` the data sets.
  """
  if stage not in TRAIN_STAGES:
    raise PipelineError(f"stage_fields: `stage` must be one of {list(TRAIN_STAGES)}, got {stage!r}.")
  common = {"seed": cfg.seed, "model.preset": cfg.model_preset, "data.kind": "arrays",
            "batch_size": cfg.batch_size}
  if stage == "sft":
    return dict(common, **{
        "data.path": os.path.join(root, "data", "sft"), "sft.steps": cfg.sft_steps,
        "sft.learning_rate": cfg.sft_learning_rate, "sft.warmup_steps": max(1, cfg.sft_steps // 10),
        "dpo.steps": 0, "log_every": max(1, cfg.sft_steps // 4), "checkpoint_every": cfg.sft_steps})
  pref = dict(common, **{
      "data.path": os.path.join(root, "data", "preferences"), "init.checkpoint": os.path.join(root, "sft"),
      "sft.steps": 0, "loss.beta": cfg.beta})
  if stage in ("dpo", "rdpo"):
    return dict(pref, **{
        "loss.name": "dpo", "data.swap_pairs": stage == "rdpo", "dpo.steps": cfg.dpo_steps,
        "dpo.learning_rate": cfg.dpo_learning_rate, "dpo.warmup_steps": max(1, cfg.dpo_steps // 10),
        "log_every": max(1, cfg.dpo_steps // 3), "checkpoint_every": cfg.dpo_steps})
  on = stage == "onpolicy"
  steps = cfg.onpolicy_steps if on else cfg.distill_steps
  return dict(pref, **{
      "loss.name": "aligndistil", "loss.beta2": cfg.beta2_onpolicy if on else cfg.beta2_offpolicy,
      "loss.mode": cfg.mode, "loss.temperature": cfg.temperature, "loss.length_normalize": cfg.length_normalize,
      "distill.dpo_checkpoint": os.path.join(root, "dpo"),
      "distill.contrast_checkpoint": os.path.join(root, "rdpo"), "distill.on_policy": on,
      "dpo.steps": max(steps, 1), "dpo.learning_rate": cfg.distill_learning_rate,
      "dpo.warmup_steps": max(1, steps // 10), "log_every": max(1, steps // 3),
      "checkpoint_every": max(steps, 1)})


def stage_config(cfg: PipelineConfig, stage: str, root: str):
  """The validated :class:`~alignjax.training.config.RunConfig` of a stage (see :func:`stage_fields`).

  Raises :class:`ConfigError` when the stage's input runs are missing.
  """
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.build(None, **stage_fields(cfg, stage, root))


# ----------------------------------------------------------------------------- helpers

def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def finished(run_cfg, workdir: str) -> bool:
  """True when ``workdir`` holds a finished run of exactly this config's identity and budget."""
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import run as run_lib  # pylint: disable=import-outside-toplevel
  final = _read_json(os.path.join(workdir, "final_metrics.json"))
  record = run_lib.read_record(os.path.join(workdir, "checkpoints"))
  if final is None or record is None:
    return False
  if config_lib.identity_diff(record.get("identity", {}), run_cfg):
    return False  # loop.run refuses it and lists the fields
  return int(final.get("steps", -1)) == run_cfg.sft.steps + run_cfg.dpo.steps


def markdown_table(rows) -> str:
  """The per-stage results as a Markdown table."""
  lines = ["| stage | gold reward | KL(π ‖ π_SFT) | mean length |", "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['stage']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} "
                 f"| {r['mean_length']:.1f} |")
  return "\n".join(lines) + "\n"


def _identity(cfg: PipelineConfig, workdir: str) -> None:
  path = os.path.join(workdir, "pipeline.json")
  now = json.loads(json.dumps(dataclasses.asdict(cfg)))
  stored = _read_json(path)
  if stored is not None:
    data_fields = ("seed", "num_topics", "min_len", "max_len", "sentiment_rate", "sft_examples", "batch_size",
                   "preference_prompts", "samples_per_prompt", "label_temperature")
    diff = [f"{k}: stored {stored.get(k)!r}, given {now[k]!r}" for k in data_fields if stored.get(k) != now[k]]
    if diff:
      raise PipelineError(f"run_pipeline: workdir {workdir} holds a pipeline with other data settings "
                          f"({'; '.join(diff)}); use another workdir.")
  _write_json(path, now)


# ----------------------------------------------------------------------------- the pipeline

def run_pipeline(
    cfg: PipelineConfig,
    *,
    workdir: str,
    train_fn: Optional[Callable[..., Any]] = None,
    stages: Optional[tuple[str, ...]] = None,
    progress: bool = True,
    stream=None,
) -> dict[str, Any]:
  """Runs (or resumes) the pipeline in ``workdir``; see the module docstring.

  Args:
    cfg: a validated :class:`PipelineConfig` (:func:`build`).
    workdir: data sets, one workdir per stage, evaluations and the results.
    train_fn: ``train_fn(run_cfg, workdir=...)`` trains one stage (default
      :func:`alignjax.training.loop.run`; launchers pass it with their writer).
    stages: run the stages up to the last of these (default: all of
      :data:`STAGES`); e.g. ``("sft", "dpo")`` stops after DPO.
    progress: print stage lines (the loop prints steps/s).
    stream: where progress lines go (default stdout).

  Returns:
    ``{"rows", "results", "table", "trained", "skipped", "evaluated", "wall_seconds",
    "workdir"}``: one result row per trained stage (``stage``, ``reward``,
    ``reward_se``, ``kl``, ``kl_se``, ``mean_length``, ``num_samples``, ``workdir``),
    the paths of ``results.jsonl`` and ``results.md``, and the stages trained /
    skipped (finished earlier) / evaluated in this call.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from alignjax import decoding  # pylint: disable=import-outside-toplevel
  from alignjax.data import arrays_tfds, reviews  # pylint: disable=import-outside-toplevel
  from alignjax.data.synthetic import EOS, PAD  # pylint: disable=import-outside-toplevel
  from alignjax.study import evaluation  # pylint: disable=import-outside-toplevel
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel

  if not isinstance(cfg, PipelineConfig):
    raise TypeError(f"run_pipeline: `cfg` must be a PipelineConfig (see aligndistil_pipeline.build), got {type(cfg).__name__}.")
  validate(cfg)
  wanted = STAGES if stages is None else tuple(stages)
  bad = [s for s in wanted if s not in STAGES]
  if bad or not wanted:
    raise PipelineError(f"run_pipeline: `stages` must be a non-empty subset of {list(STAGES)}, got {list(wanted)}.")
  last = max(STAGES.index(s) for s in wanted)
  todo = [s for s in STAGES[: last + 1] if s != "onpolicy" or cfg.onpolicy_steps > 0]
  train_fn = loop.run if train_fn is None else train_fn
  workdir = os.path.abspath(workdir)
  os.makedirs(os.path.join(workdir, "evals"), exist_ok=True)
  _identity(cfg, workdir)
  out = sys.stdout if stream is None else stream
  t0 = time.perf_counter()

  def say(text: str) -> None:
    if progress:
      print(f"[aligndistil {time.perf_counter() - t0:6.1f}s] {text}", file=out, flush=True)

  task = cfg.task
  trained, skipped, evaluated, rows = [], [], [], []
  eval_topics = task.sample_topics(cfg.eval_prompts, cfg.seed + 1000)
  eval_prompts, eval_mask = task.prompts(eval_topics)
  eval_key = jax.random.key(cfg.seed + 4)
  settings = {"eval_prompts": cfg.eval_prompts, "eval_samples": cfg.eval_samples, "seed": cfg.seed}
  sft_model, scorer = None, None

  def evaluate(stage: str, run_dir: str) -> dict:
    final = os.path.join(run_dir, "final_metrics.json")
    stamp = os.path.getmtime(final)
    path = os.path.join(workdir, "evals", f"{stage}.json")
    cached = _read_json(path)
    if cached is not None and cached.get("settings") == settings and cached.get("stamp") == stamp:
      return cached["row"]
    model = sft_model if stage == "sft" else loop.load_policy(run_dir)
    scores = evaluation.sample_and_score(
        model, sft_model, eval_prompts, eval_mask, num_samples=cfg.eval_samples,
        max_new_tokens=task.max_len + 1, rng=eval_key, reward_fn=task.gold_reward, scorer=scorer,
        eos_token_ids=(EOS,), pad_token_id=PAD)
    row = dict(stage=stage, workdir=run_dir, **evaluation.summarize(scores))
    _write_json(path, {"settings": settings, "stamp": stamp, "row": evaluation.as_jsonable(row)})
    evaluated.append(stage)
    say(f"evaluated {stage}: gold reward {row['reward']:.3f} ± {row['reward_se']:.3f}, "
        f"KL to SFT {row['kl']:.2f} ± {row['kl_se']:.2f}")
    return row

  for i, stage in enumerate(todo, start=1):
    say(f"stage {i}/{len(todo)} {stage}")
    if stage == "data":
      arrays_tfds.write_arrays(
          os.path.join(workdir, "data", "sft"),
          {"train": task.sft_data(cfg.sft_examples, cfg.seed),
           "eval": task.sft_data(max(cfg.batch_size, cfg.sft_examples // 8), cfg.seed + 1)},
          metadata={"vocab_size": task.vocab_size, "task": dataclasses.asdict(task)})
      continue
    if stage == "preferences":
      path = os.path.join(workdir, "data", "preferences")
      if arrays_tfds.is_prepared(path):
        say("preference set on disk, reused")
        continue
      topics = task.sample_topics(cfg.preference_prompts, cfg.seed + 2)
      prompts, prompt_mask = evaluation.repeat_prompts(*task.prompts(topics), cfg.samples_per_prompt)
      gen = decoding.generate(sft_model, prompts, prompt_mask, max_new_tokens=task.max_len + 1, temperature=1.0,
                              eos_token_ids=(EOS,), pad_token_id=PAD, rng=jax.random.key(cfg.seed + 2))
      pairs = reviews.sampled_preferences(task, prompts, np.asarray(gen.tokens), np.asarray(gen.mask),
                                          num_samples=cfg.samples_per_prompt, seed=cfg.seed + 3,
                                          temperature=cfg.label_temperature)
      n_train, _ = _split_sizes(len(pairs["chosen_tokens"]))
      arrays_tfds.write_arrays(
          path, {"train": {k: v[:n_train] for k, v in pairs.items()},
                 "eval": {k: v[n_train:] for k, v in pairs.items()}},
          metadata={"vocab_size": task.vocab_size, "task": dataclasses.asdict(task)})
      continue
    run_dir = os.path.join(workdir, stage)
    run_cfg = stage_config(cfg, stage, workdir)
    if finished(run_cfg, run_dir):
      skipped.append(stage)
      say(f"{stage}: finished earlier, skipped")
    else:
      train_fn(run_cfg, workdir=run_dir)
      trained.append(stage)
    if stage == "sft":
      sft_model = loop.load_policy(run_dir)
      scorer = evaluation.make_scorer(sft_model)
    rows.append(evaluate(stage, run_dir))

  results = os.path.join(workdir, "results.jsonl")
  with open(results + ".tmp", "w") as f:
    for r in rows:
      f.write(json.dumps(evaluation.as_jsonable(r)) + "\n")
  os.replace(results + ".tmp", results)
  table = os.path.join(workdir, "results.md")
  with open(table, "w") as f:
    f.write(markdown_table(rows))
  wall = time.perf_counter() - t0
  if rows:
    say("results (held-out prompts, temperature 1):\n" + markdown_table(rows))
  say(f"done in {wall:.0f}s: trained {trained}, skipped {skipped}; results: {results}")
  return {"rows": rows, "results": results, "table": table, "trained": trained, "skipped": skipped,
          "evaluated": evaluated, "wall_seconds": wall, "workdir": workdir}
