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
import os
import time
from typing import Any, Callable, Optional

from alignjax import configs
from alignjax.study import stages as stages_lib
from alignjax.study.stages import finished  # noqa: F401 (public: a finished stage run)
from alignjax.training.config import ConfigError

__all__ = ["PipelineConfig", "PipelineError", "STAGES", "TRAIN_STAGES", "build", "finished", "markdown_table",
           "run_pipeline", "stage_config", "stage_fields"]

TRAIN_STAGES = ("sft", "dpo", "rdpo", "offpolicy", "onpolicy")
# Fields that define the data sets: a workdir's pipeline must keep them.
DATA_FIELDS = ("seed", "num_topics", "min_len", "max_len", "sentiment_rate", "sft_examples", "batch_size",
               "preference_prompts", "samples_per_prompt", "label_temperature")
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
    return stages_lib.reviews_task(self)

  @property
  def train_stages(self) -> tuple[str, ...]:
    return TRAIN_STAGES if self.onpolicy_steps > 0 else TRAIN_STAGES[:-1]


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise PipelineError(msg)


def build(config: Any = None, **overrides: Any) -> PipelineConfig:
  """A validated :class:`PipelineConfig` from a ``ConfigDict``/mapping (missing fields: defaults).

  Types are checked by :func:`alignjax.configs.build_dataclass`; raises
  :class:`PipelineError` (one line) on an unknown or invalid field.
  """
  cfg = configs.build_dataclass(PipelineConfig, config, overrides=overrides, error=PipelineError, finite=True)
  validate(cfg)
  return cfg


def validate(cfg: PipelineConfig) -> None:
  """Checks every field of ``cfg``; raises :class:`PipelineError` naming the field."""
  from alignjax.losses.aligndistil import MODES  # pylint: disable=import-outside-toplevel
  stages_lib.validate_common(
      cfg, what="pipeline config", error=PipelineError, at_least_one=("dpo_steps", "distill_steps"),
      positive=("beta", "dpo_learning_rate", "beta2_offpolicy", "beta2_onpolicy", "temperature",
                "distill_learning_rate"))
  _check(cfg.onpolicy_steps >= 0, f"pipeline config `onpolicy_steps` must be >= 0, got {cfg.onpolicy_steps}.")
  _check(cfg.mode in MODES, f"pipeline config `mode` must be one of {list(MODES)}, got {cfg.mode!r}.")


# ----------------------------------------------------------------------------- stage configs

def stage_fields(cfg: PipelineConfig, stage: str, root: str) -> dict[str, Any]:
  """The loop config (dotted fields) of one training stage whose runs live under ``root``.

  ``root/<stage>`` is the stage's workdir; ``root/data/{sft,preferences}`` the data sets.
  """
  if stage not in TRAIN_STAGES:
    raise PipelineError(f"stage_fields: `stage` must be one of {list(TRAIN_STAGES)}, got {stage!r}.")
  if stage == "sft":
    return stages_lib.sft_fields(cfg, os.path.join(root, "data", "sft"))
  dpo, on = stage in ("dpo", "rdpo"), stage == "onpolicy"
  fields = stages_lib.preference_fields(
      cfg, data_path=os.path.join(root, "data", "preferences"), init_checkpoint=os.path.join(root, "sft"),
      steps=cfg.dpo_steps if dpo else (cfg.onpolicy_steps if on else cfg.distill_steps),
      learning_rate=cfg.dpo_learning_rate if dpo else cfg.distill_learning_rate)
  fields["loss.beta"] = cfg.beta
  if dpo:
    return dict(fields, **{"loss.name": "dpo", "data.swap_pairs": stage == "rdpo"})
  return dict(fields, **{
      "loss.name": "aligndistil", "loss.beta2": cfg.beta2_onpolicy if on else cfg.beta2_offpolicy,
      "loss.mode": cfg.mode, "loss.temperature": cfg.temperature, "loss.length_normalize": cfg.length_normalize,
      "distill.dpo_checkpoint": os.path.join(root, "dpo"),
      "distill.contrast_checkpoint": os.path.join(root, "rdpo"), "distill.on_policy": on})


def stage_config(cfg: PipelineConfig, stage: str, root: str):
  """The validated :class:`~alignjax.training.config.RunConfig` of a stage (see :func:`stage_fields`).

  Raises :class:`ConfigError` when the stage's input runs are missing.
  """
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.build(None, **stage_fields(cfg, stage, root))


def markdown_table(rows) -> str:
  """The per-stage results as a Markdown table (:func:`alignjax.study.stages.markdown_table`)."""
  return stages_lib.markdown_table(rows, labels=("stage",))


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
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel

  if not isinstance(cfg, PipelineConfig):
    raise TypeError(f"run_pipeline: `cfg` must be a PipelineConfig (see alignjax.study.aligndistil.build), got {type(cfg).__name__}.")
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
  stages_lib.check_identity(os.path.join(workdir, "pipeline.json"), dataclasses.asdict(cfg), DATA_FIELDS,
                        error=PipelineError,
                        message=f"run_pipeline: workdir {workdir} holds a pipeline with other data settings")
  p = stages_lib.Progress("aligndistil", todo, stream, enabled=progress)
  trained, skipped, evaluated, rows = [], [], [], []
  held_out = None

  def evaluate(stage: str, run_dir: str) -> dict:
    key = {"settings": held_out.settings, "stamp": stages_lib.run_stamp(run_dir)}
    model = lambda: held_out.sft_model if stage == "sft" else loop.load_policy(run_dir)
    row, computed = stages_lib.cached_row(os.path.join(workdir, "evals", f"{stage}.json"), key,
                                      lambda: dict(stage=stage, workdir=run_dir, **held_out(model())))
    if computed:
      evaluated.append(stage)
      p.message(f"evaluated {stage}: gold reward {row['reward']:.3f} ± {row['reward_se']:.3f}, "
                f"KL to SFT {row['kl']:.2f} ± {row['kl_se']:.2f}")
    return row

  for stage in todo:
    p.stage(stage)
    if stage == "data":
      stages_lib.write_sft_data(cfg, os.path.join(workdir, "data", "sft"))
      continue
    if stage == "preferences":
      if not stages_lib.write_sampled_preferences(cfg, held_out.sft_model, os.path.join(workdir, "data", "preferences")):
        p.message("preference set on disk, reused")
      continue
    run_dir = os.path.join(workdir, stage)
    if stages_lib.train_or_skip(stage_config(cfg, stage, workdir), run_dir, train_fn):
      trained.append(stage)
    else:
      skipped.append(stage)
      p.message(f"{stage}: finished earlier, skipped")
    if stage == "sft":
      held_out = stages_lib.HeldOutEval(cfg, loop.load_policy(run_dir))
    rows.append(evaluate(stage, run_dir))

  results, table = stages_lib.write_results(workdir, rows, markdown_table(rows))
  wall = time.perf_counter() - p.t0
  if rows:
    p.message("results (held-out prompts, temperature 1):\n" + markdown_table(rows))
  p.message(f"done in {wall:.0f}s: trained {trained}, skipped {skipped}; results: {results}")
  return {"rows": rows, "results": results, "table": table, "trained": trained, "skipped": skipped,
          "evaluated": evaluated, "wall_seconds": wall, "workdir": workdir}
