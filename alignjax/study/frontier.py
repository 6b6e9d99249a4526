"""The reward--KL frontier study: SFT, sampled preferences, a sweep of methods, DeRa, plots.

A controlled experiment after DPO's (Rafailov et al. 2023, arXiv:2305.18290,
Sec. 6.1, Fig. 2 left) and GPO's (Tang et al. 2024, arXiv:2402.05749, after Gao
et al. 2023, arXiv:2210.10760), on the generated reviews task of
:mod:`alignjax.data.reviews` (a programmatic gold reward), small enough for a
laptop CPU and made of the same library calls a pod run makes:

1. ``data``: the reviews SFT set (train + eval) as a TFDS array_record data set
   (:mod:`alignjax.data.arrays_tfds`).
2. ``sft``: supervised fine-tuning of a ``model_preset`` (Llama-family) model on
   it -- one :func:`alignjax.training.loop.run` call.
3. ``preferences``: ``samples_per_prompt`` responses per training prompt sampled
   from the SFT model at temperature 1 (:func:`alignjax.decoding.generate`),
   paired and labelled with the gold reward under Bradley--Terry noise
   (:func:`alignjax.data.reviews.sampled_preferences`, fixed seed), stored as a
   TFDS data set.
4. ``runs``: every method of ``methods`` at every ``betas`` value (and
   ``tdpo2_alphas``), each a :func:`~alignjax.training.loop.run` from the SFT
   checkpoint (``init.checkpoint``) on the preference set -- exactly what a
   ``launch/train.py`` call with the same config does. AlignDistil (Zhang et al.
   2025, arXiv:2503.02832) distils from the DPO run at the same beta and a
   reverse-DPO run (swapped pairs) trained here too.
5. ``evaluate``: for every model, ``eval_samples`` responses per held-out prompt
   (temperature 1, one shared rng key: common random numbers across models),
   the mean gold reward and ``KL(pi || pi_SFT)`` estimated from the samples
   (:mod:`alignjax.study.evaluation`), with standard errors; then
   ``results.jsonl``, ``results.md`` and ``frontier.png`` in the workdir.
6. ``dera``: DeRa (Liu et al. 2024, arXiv:2402.02992, Eq. 9) between the SFT and
   the DPO model at ``dera_beta`` over ``dera_lambdas`` -- decoding only,
   evaluated like the trained models.
7. ``decoding``: alignment at decoding time from the SFT model, each a point of
   the same plot with the KL measured from its samples: best-of-N over
   ``best_of_n`` and ARGS (Khanov et al. 2024, arXiv:2402.01694) over
   ``args_weights`` with a Bradley--Terry reward model trained on the study's
   pairs (the ``reward`` algorithm; its KL for best-of-N from the reward-model
   scores, :func:`alignjax.study.evaluation.best_of_n_kl`), and GenARM
   (Xu et al. 2025, arXiv:2410.08193): the SFT model combined with the
   autoregressive reward model trained by the ``genarm`` runs (``genarm_beta``)
   over ``genarm_alphas``.

Methods whose data set is derived from the pairs (critical-token cDPO: positive
and negative models, token weights; ``Algorithm.study["data"]``) get it built
before their runs.

Everything is resumable: data sets are written once, a finished run
(``final_metrics.json`` with the same identity) is skipped, a partial run
resumes from its checkpoint, and an evaluation already on disk is reused.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

from alignjax import configs
from alignjax.study import stages
from alignjax.training.config import ConfigError

__all__ = ["METHODS", "methods", "RunSpec", "StudyConfig", "StudyError", "build", "plan_runs", "run_config", "run_study"]


class StudyError(ConfigError):
  """A user error in the study configuration or workdir (one line; launchers exit with code 2)."""


def methods() -> dict[str, dict[str, Any]]:
  """Study method -> how to run it, from the algorithm registry (``Algorithm.study``).

  Each preference algorithm contributes ``study["methods"]`` (default: one method
  of its own name): method name -> fixed hyper-parameters, where a value
  ``"@field"`` is read from :class:`StudyConfig`. ``study["sweep"] = (hparam,
  StudyConfig field)`` sweeps one hyper-parameter beside beta; ``study["teachers"]``
  marks methods distilled from the DPO run at the same beta and a reverse-DPO run
  trained here too (AlignDistil).
  """
  from alignjax.training import algorithms  # pylint: disable=import-outside-toplevel
  out = {}
  # Methods distilled from other runs of the study come last (their teachers train first).
  order = sorted(algorithms.names(preference=True), key=lambda n: bool(algorithms.get(n).study.get("teachers")))
  for name in order:
    study = algorithms.get(name).study
    for method, fixed in study.get("methods", {name: {}}).items():
      out[method] = {"algorithm": name, "fixed": dict(fixed), "sweep": study.get("sweep"),
                     "teachers": bool(study.get("teachers")), "data": study.get("data"),
                     "plotted": study.get("plotted", True)}
  return out


METHODS = tuple(methods())  # the default sweep: every method of the registry at import


def _f(default, help: str):
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
  """Every knob of the study (validated by :func:`build`)."""
  seed: int = _f(0, "seed of data, sampling, labels and model init (>= 0)")
  # The task (alignjax.data.reviews.ReviewsTask).
  num_topics: int = _f(8, "reviews task: prompt topics (>= 2)")
  min_len: int = _f(4, "reviews task: shortest reference review, words (>= 1)")
  max_len: int = _f(10, "reviews task: longest reference review, words (>= min_len)")
  sentiment_rate: float = _f(0.3, "reviews task: probability a reference word is a sentiment word, in (0, 1)")
  # SFT.
  model_preset: str = _f("llama_tiny", "the training config's model.preset (sizes: its model.* defaults; "
                         "vocabulary from the data)")
  sft_examples: int = _f(2048, "reference reviews in the SFT set (>= batch_size)")
  sft_steps: int = _f(200, "SFT optimizer steps (>= 1)")
  sft_learning_rate: float = _f(3e-3, "SFT peak learning rate (> 0)")
  # Preference data.
  preference_prompts: int = _f(256, "training prompts sampled from the SFT model (>= 1)")
  samples_per_prompt: int = _f(4, "responses sampled per training prompt, K (>= 2); K // 2 pairs per prompt")
  label_temperature: float = _f(0.1, "Bradley-Terry temperature of the preference labels (> 0)")
  # Preference runs.
  methods: tuple = _f(METHODS, "methods to train (every study method of the algorithm registry; see methods())")
  betas: tuple = _f((0.1, 0.5), "beta sweep of every method (each > 0)")
  dpo_betas: tuple = _f((0.03,), "extra beta values for DPO only (a longer DPO curve; DeRa's model may use them)")
  tdpo2_alphas: tuple = _f((0.5,), "alpha sweep of TDPO2 (each >= 0)")
  cdpo_epsilon: float = _f(0.1, "cDPO label-flip probability (in (0, 0.5))")
  aligndistil_beta2: float = _f(10.0, "AlignDistil beta2 (> 0; 10 as the authors' off-policy script)")
  steps: int = _f(60, "optimizer steps of every preference run (>= 1)")
  learning_rate: float = _f(2e-3, "peak learning rate of every preference run (> 0)")
  batch_size: int = _f(32, "pairs (SFT: reviews) per step (>= 1)")
  # DeRa.
  dera_lambdas: tuple = _f((0.0, 0.5, 1.0, 1.5, 2.0), "DeRa realignment strengths lambda (0: SFT, 1: DPO)")
  dera_beta: float = _f(0.0, "beta of the DPO model DeRa realigns (0: the largest of betas)")
  # Decoding-time alignment of the SFT model.
  best_of_n: tuple = _f((2, 4, 8), "best-of-N sample counts N (each >= 2), scored by a reward model trained on the "
                        "pairs; empty: none")
  args_weights: tuple = _f((2.0, 8.0, 32.0), "ARGS reward weights w (each >= 0) with that reward model; empty: none")
  args_k: int = _f(40, "ARGS candidates per step k (>= 2; the SFT model's next-token distribution over the 44-token "
                   "language is nearly flat: its top 5 or 10 hold no sentiment word at all)")
  genarm_alphas: tuple = _f((0.5, 1.0, 2.0), "GenARM strengths alpha (each >= 0) of the ARM trained by the 'genarm' "
                            "runs, combined with the SFT model; empty: none")
  genarm_beta: float = _f(0.0, "beta of the GenARM run used as the ARM (0: the largest of betas)")
  # Evaluation.
  eval_prompts: int = _f(64, "held-out prompts (>= 2)")
  eval_samples: int = _f(8, "responses sampled per held-out prompt (>= 1)")

  @property
  def task(self):
    return stages.reviews_task(self)

  @property
  def all_dpo_betas(self) -> tuple:
    """DPO's betas: ``betas`` then the extra ``dpo_betas``, without repeats."""
    return tuple(dict.fromkeys(tuple(self.betas) + tuple(self.dpo_betas)))

  @property
  def dera_model_beta(self) -> float:
    return self.dera_beta if self.dera_beta > 0 else float(max(self.betas))

  @property
  def genarm_model_beta(self) -> float:
    return self.genarm_beta if self.genarm_beta > 0 else float(max(self.betas))

  @property
  def needs_reward_model(self) -> bool:
    return bool(self.best_of_n or self.args_weights)


# Fields that define the data and the SFT model: a workdir's study must keep them.
IDENTITY_FIELDS = ("seed", "num_topics", "min_len", "max_len", "sentiment_rate", "model_preset",
                   "sft_examples", "sft_steps", "sft_learning_rate", "preference_prompts",
                   "samples_per_prompt", "label_temperature", "batch_size", "eval_prompts", "eval_samples")


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise StudyError(msg)


def build(config: Any = None, **overrides: Any) -> StudyConfig:
  """A validated :class:`StudyConfig` from a ``ConfigDict``/mapping (missing fields: defaults).

  Types are checked by :func:`alignjax.configs.build_dataclass`; raises
  :class:`StudyError` (one line) on an unknown or invalid field.
  """
  cfg = configs.build_dataclass(StudyConfig, config, overrides=overrides, error=StudyError, finite=True)
  validate(cfg)
  return cfg


def validate(cfg: StudyConfig) -> None:
  """Checks every field of ``cfg``; raises :class:`StudyError` naming the field."""
  stages.validate_common(cfg, what="study config", error=StudyError, at_least_one=("steps",),
                         positive=("learning_rate", "aligndistil_beta2"))
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  valid = getattr(config_lib, "MODEL_PRESETS", ("llama_tiny",))
  _check(cfg.model_preset in valid, f"study config `model_preset` must be one of {list(valid)}, got {cfg.model_preset!r}.")
  _check(0 < cfg.cdpo_epsilon < 0.5, f"study config `cdpo_epsilon` must be in (0, 0.5), got {cfg.cdpo_epsilon}.")
  table = methods()
  unknown = [m for m in cfg.methods if m not in table]
  _check(not unknown, f"study config `methods`: unknown {unknown}; valid methods: {', '.join(table)}.")
  _check(len(set(cfg.methods)) == len(cfg.methods), f"study config `methods` has duplicates: {list(cfg.methods)}.")
  _check(len(cfg.betas) >= 1 and all(isinstance(b, (int, float)) and b > 0 for b in cfg.betas),
         f"study config `betas` must be one or more numbers > 0, got {list(cfg.betas)}.")
  _check(len(set(cfg.betas)) == len(cfg.betas), f"study config `betas` has duplicates: {list(cfg.betas)}.")
  _check(all(isinstance(b, (int, float)) and b > 0 for b in cfg.dpo_betas),
         f"study config `dpo_betas` must be numbers > 0, got {list(cfg.dpo_betas)}.")
  _check(not cfg.dpo_betas or "dpo" in cfg.methods, "study config `dpo_betas` needs 'dpo' in `methods`.")
  _check(all(isinstance(a, (int, float)) and a >= 0 for a in cfg.tdpo2_alphas) and cfg.tdpo2_alphas,
         f"study config `tdpo2_alphas` must be one or more numbers >= 0, got {list(cfg.tdpo2_alphas)}.")
  _check(all(isinstance(x, (int, float)) and math.isfinite(x) for x in cfg.dera_lambdas),
         f"study config `dera_lambdas` must be finite numbers, got {list(cfg.dera_lambdas)}.")
  _check(cfg.dera_beta >= 0, f"study config `dera_beta` must be >= 0 (0: the largest of betas), got {cfg.dera_beta}.")
  if cfg.dera_lambdas:
    _check("dpo" in cfg.methods, "study config `dera_lambdas` needs 'dpo' in `methods` (DeRa realigns the DPO model).")
    _check(cfg.dera_model_beta in cfg.all_dpo_betas,
           f"study config `dera_beta` ({cfg.dera_beta}) must be one of the DPO betas {list(cfg.all_dpo_betas)} "
           "(or 0: the largest of `betas`).")
  _check(all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in cfg.best_of_n),
         f"study config `best_of_n` must be ints >= 2, got {list(cfg.best_of_n)}.")
  for name in ("args_weights", "genarm_alphas"):
    values = getattr(cfg, name)
    _check(all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in values),
           f"study config `{name}` must be finite numbers >= 0, got {list(values)}.")
  _check(isinstance(cfg.args_k, int) and cfg.args_k >= 2, f"study config `args_k` must be an int >= 2, got {cfg.args_k!r}.")
  _check(cfg.genarm_beta >= 0, f"study config `genarm_beta` must be >= 0 (0: the largest of betas), got {cfg.genarm_beta}.")
  if cfg.genarm_alphas:
    _check("genarm" in cfg.methods, "study config `genarm_alphas` needs 'genarm' in `methods` (the ARM).")
    _check(cfg.genarm_model_beta in cfg.betas,
           f"study config `genarm_beta` ({cfg.genarm_beta}) must be one of `betas` {list(cfg.betas)} (or 0: the largest).")
  for m in cfg.methods:
    if table[m]["teachers"]:
      _check("dpo" in cfg.methods, f"study config: {m!r} needs 'dpo' in `methods` (its DPO teacher).")
    sweep = table[m]["sweep"]
    if sweep is not None:
      values = getattr(cfg, sweep[1])
      _check(bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values),
             f"study config `{sweep[1]}` must be one or more numbers, got {list(values)}.")


# ----------------------------------------------------------------------------- the sweep

@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the sweep.

  Attributes:
    name: the run's directory name under ``<workdir>/runs``.
    method: a key of :func:`methods` (or ``reverse_dpo``, a contrast teacher, or
      ``reward``, the reward model of the decoding points).
    beta, alpha: the swept hyper-parameters (alpha: the method's second swept one, if any).
    fields: dotted loop config fields that select the method.
    plotted: whether the run is a point of the frontier.
  """
  name: str
  method: str
  beta: float
  alpha: Optional[float]
  fields: Mapping[str, Any]
  plotted: bool = True

  @property
  def setting(self) -> str:
    s = f"β={self.beta:g}"
    return s + (f", α={self.alpha:g}" if self.alpha is not None else "")


def plan_runs(cfg: StudyConfig) -> list[RunSpec]:
  """Every training run of the sweep, in training order (teachers before their students)."""
  table = methods()
  runs: list[RunSpec] = []
  if cfg.needs_reward_model:
    runs.append(RunSpec("reward", "reward", 0.0, None, {"loss.name": "reward"}, plotted=False))
  ordered = sorted(cfg.methods, key=lambda m: table[m]["teachers"])   # teachers' students last
  for beta in cfg.all_dpo_betas:
    for method in ordered if beta in cfg.betas else ("dpo",):
      m = table[method]
      fields = {"loss.name": m["algorithm"], "loss.beta": float(beta)}
      if m["data"]:
        fields["data.path"] = f"data/{method}"
      for k, v in m["fixed"].items():
        fields[f"loss.{k}"] = getattr(cfg, v[1:]) if isinstance(v, str) and v.startswith("@") else v
      if m["sweep"] is not None:
        hparam, values = m["sweep"]
        for value in getattr(cfg, values):
          runs.append(RunSpec(f"{method}_b{beta:g}_{hparam[0]}{value:g}", method, float(beta), float(value),
                              dict(fields, **{f"loss.{hparam}": float(value)})))
        continue
      if m["teachers"]:
        teacher = RunSpec(f"reverse_dpo_b{beta:g}", "reverse_dpo", float(beta), None,
                          {"loss.name": "dpo", "loss.beta": float(beta), "data.swap_pairs": True}, plotted=False)
        if teacher not in runs:   # one reverse-DPO teacher per beta, shared by every distilled method
          runs.append(teacher)
        fields.update({"distill.dpo_checkpoint": f"runs/dpo_b{beta:g}",
                       "distill.contrast_checkpoint": f"runs/reverse_dpo_b{beta:g}"})
      runs.append(RunSpec(f"{method}_b{beta:g}", method, float(beta), None, fields, plotted=m["plotted"]))
  return runs


def sft_config(cfg: StudyConfig, workdir: str) -> dict[str, Any]:
  """The loop config (dotted fields) of the SFT run."""
  return stages.sft_fields(cfg, os.path.join(workdir, "data", "sft"))


def run_config(cfg: StudyConfig, spec: RunSpec, workdir: str) -> dict[str, Any]:
  """The loop config (dotted fields) of one preference run: the same as a ``launch/train.py`` call."""
  fields = stages.preference_fields(
      cfg, data_path=os.path.join(workdir, "data", "preferences"),
      init_checkpoint=os.path.join(workdir, "runs", "sft"), steps=cfg.steps, learning_rate=cfg.learning_rate)
  for k, v in spec.fields.items():
    if (k.startswith("distill.") or k == "data.path") and isinstance(v, str):
      v = os.path.join(workdir, v)
    fields[k] = v
  return fields


STAGES = ("data", "sft", "preferences", "runs", "evaluate", "dera", "decoding")


def _decoding_rows(cfg: StudyConfig, workdir: str, p, evaluate, policy, sft_model, held_out) -> list[dict]:
  """Stage 7: best-of-N and ARGS with the study's reward model, GenARM with its ARM, from the SFT model."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from alignjax import decoding  # pylint: disable=import-outside-toplevel
  from alignjax.study import evaluation  # pylint: disable=import-outside-toplevel
  if not (cfg.needs_reward_model or cfg.genarm_alphas):
    return []
  p.stage("decoding", f"best-of-N {list(cfg.best_of_n)}, ARGS w {list(cfg.args_weights)} (k={cfg.args_k}), "
          f"GenARM alpha {list(cfg.genarm_alphas)}")
  rows = []
  reward_dir = os.path.join(workdir, "runs", "reward")

  def best_of(n):
    def sample(tokens, mask, *, max_new_tokens, rng, eos_token_ids, pad_token_id):
      out = decoding.best_of_n(sft_model, policy("reward"), tokens, mask, n=n, max_new_tokens=max_new_tokens,
                               temperature=1.0, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, rng=rng)
      # log pi_BoN(y) - log pi_SFT(y) depends on y's score only; each row carries its prompt's best-of-n KL
      # over the sampled scores in its place, so the rows' mean per prompt (the KL estimate) is that KL.
      kl = evaluation.best_of_n_kl(out.scores, cfg.eval_prompts)
      per_prompt = np.repeat(kl, np.asarray(out.index).shape[0] // cfg.eval_prompts)
      return out.tokens, out.mask, np.asarray(out.logprobs, np.float64).sum(axis=1) + per_prompt
    return sample

  def args(w):
    def sample(tokens, mask, *, max_new_tokens, rng, eos_token_ids, pad_token_id):
      out = decoding.args_generate(sft_model, policy("reward"), tokens, mask, max_new_tokens=max_new_tokens,
                                   k=cfg.args_k, w=w, temperature=1.0, eos_token_ids=eos_token_ids,
                                   pad_token_id=pad_token_id, rng=rng)
      return out.tokens, out.mask, np.asarray(out.logprobs, np.float64).sum(axis=1)
    return sample

  for n in cfg.best_of_n:
    base = {"name": f"best_of_{n}", "method": "best_of_n", "setting": f"N={n} (reward model)", "n": n,
            "kl_bound": math.log(n) - (n - 1) / n, "workdir": reward_dir}
    rows.append(evaluate(base["name"], lambda n=n: best_of(n), base, sampler=True))
  for w in cfg.args_weights:
    base = {"name": f"args_w{w:g}_k{cfg.args_k}", "method": "args", "setting": f"w={w:g}, k={cfg.args_k}",
            "w": float(w), "workdir": reward_dir}
    rows.append(evaluate(base["name"], lambda w=w: args(w), base, sampler=True))
  arm = f"genarm_b{cfg.genarm_model_beta:g}"
  for a in cfg.genarm_alphas:
    base = {"name": f"genarm_a{a:g}_{arm}", "method": "genarm", "setting": f"α={a:g} (ARM β={cfg.genarm_model_beta:g})",
            "alpha": float(a), "beta": cfg.genarm_model_beta, "workdir": os.path.join(workdir, "runs", arm)}
    rows.append(evaluate(base["name"], lambda a=a: decoding.genarm(sft_model, policy(arm), a), base))
  return rows


# ----------------------------------------------------------------------------- the study

def run_study(
    cfg: StudyConfig,
    *,
    workdir: str,
    train_fn: Optional[Callable[..., Any]] = None,
    progress: bool = True,
    stream=None,
) -> dict[str, Any]:
  """Runs (or resumes) the whole study in ``workdir``; see the module docstring.

  Args:
    cfg: a validated :class:`StudyConfig` (:func:`build`).
    workdir: data sets, runs, evaluations and the outputs.
    train_fn: ``train_fn(run_cfg, workdir=...)`` trains one run (default
      :func:`alignjax.training.loop.run`; launchers pass it with their writer).
    progress: print stage / run / ETA lines (the loop prints steps/s).
    stream: where progress lines go (default stdout).

  Returns:
    ``{"rows", "results", "table", "plot", "trained", "skipped", "evaluated",
    "wall_seconds", "workdir"}``: the result rows, the paths of
    ``results.jsonl``, ``results.md`` and ``frontier.png``, and the names of the
    runs trained / skipped (already finished) / evaluated in this call.
  """
  from alignjax import decoding  # pylint: disable=import-outside-toplevel
  from alignjax.data import arrays_tfds  # pylint: disable=import-outside-toplevel
  from alignjax.study import plots  # pylint: disable=import-outside-toplevel
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel

  if not isinstance(cfg, StudyConfig):
    raise TypeError(f"run_study: `cfg` must be a StudyConfig (see alignjax.study.frontier.build), got {type(cfg).__name__}.")
  validate(cfg)
  train_fn = loop.run if train_fn is None else train_fn
  workdir = os.path.abspath(workdir)
  os.makedirs(os.path.join(workdir, "evals"), exist_ok=True)
  stages.check_identity(
      os.path.join(workdir, "study.json"),
      dict({k: getattr(cfg, k) for k in IDENTITY_FIELDS}, config=dataclasses.asdict(cfg)), IDENTITY_FIELDS,
      error=StudyError, message=f"run_study: workdir {workdir} holds a study with different data/SFT settings")
  p = stages.Progress("study", STAGES, stream, enabled=progress)
  start = time.perf_counter()
  trained, skipped, evaluated = [], [], []

  def train_run(run_cfg, run_dir: str, i: int, n: int) -> None:
    runs_dir = os.path.join(workdir, "runs")
    name = os.path.relpath(run_dir, runs_dir if run_dir.startswith(runs_dir + os.sep) else workdir)
    if stages.finished(run_cfg, run_dir):
      skipped.append(name)
      p.message(f"run {i} of {n}: {name} -- finished earlier, skipped")
      return
    p.message(f"run {i} of {n}: {name} (study ETA {p.eta(n - i + 1)})")
    t0 = time.perf_counter()
    train_fn(run_cfg, workdir=run_dir)
    p.run_times.append(time.perf_counter() - t0)
    trained.append(name)

  def train(name: str, fields: Mapping[str, Any], i: int, n: int) -> None:
    train_run(config_lib.build(None, **fields), os.path.join(workdir, "runs", name), i, n)

  # 1. The SFT data set.
  p.stage("data", f"reviews SFT set ({cfg.sft_examples} reviews) as TFDS array_record")
  stages.write_sft_data(cfg, os.path.join(workdir, "data", "sft"))

  # 2. SFT.
  runs = plan_runs(cfg)
  n_runs = len(runs) + 1
  p.stage("sft", f"{cfg.model_preset}, {cfg.sft_steps} steps")
  train("sft", sft_config(cfg, workdir), 1, n_runs)
  sft_dir = os.path.join(workdir, "runs", "sft")
  sft_model = loop.load_policy(sft_dir)

  # 3. Preference data sampled from the SFT model.
  pref_data = os.path.join(workdir, "data", "preferences")
  if arrays_tfds.is_prepared(pref_data):
    p.stage("preferences", "on disk, reused")
  else:
    p.stage("preferences", f"{cfg.samples_per_prompt} samples x {cfg.preference_prompts} prompts, "
            "Bradley-Terry labels from the gold reward")
    stages.write_sampled_preferences(cfg, sft_model, pref_data)
  meta = arrays_tfds.read_metadata(pref_data)

  # 4. The sweep; methods with a derived data set (critical tokens) build it first.
  table = methods()
  prepared = [m for m in cfg.methods if table[m]["data"]]
  p.stage("runs", f"{len(runs)} runs: methods {', '.join(cfg.methods)} x beta {list(cfg.betas)}"
          + (f"; data sets of {', '.join(prepared)} first" if prepared else ""))
  for method in prepared:
    module, _, function = table[method]["data"].partition(":")
    out_path = os.path.join(workdir, "data", method)
    getattr(importlib.import_module(module), function)(
        cfg, data_path=pref_data, out_path=out_path, workdir=workdir, init_checkpoint=sft_dir,
        train_fn=lambda run_cfg, *, workdir: train_run(run_cfg, workdir, 1, n_runs))   # finished: skipped
  for i, spec in enumerate(runs, start=2):
    train(spec.name, run_config(cfg, spec, workdir), i, n_runs)

  # 5. The evaluation of every model; 6. DeRa, evaluated the same way.
  held_out = stages.HeldOutEval(cfg, sft_model)

  def evaluate(name: str, model_fn: Callable[[], Any], row: dict, *, sampler: bool = False) -> dict:
    """``model_fn()`` returns the model to sample, or with ``sampler`` a sampler (HeldOutEval)."""
    key = {"eval_settings": held_out.settings, "stamp": stages.run_stamp(row.get("workdir"))}
    run = (lambda: held_out(sampler=model_fn())) if sampler else (lambda: held_out(model_fn()))
    row, computed = stages.cached_row(os.path.join(workdir, "evals", f"{name}.json"), key,
                                      lambda: dict(row, **run()))
    if computed:
      evaluated.append(name)
    return row

  models: dict[str, Any] = {}

  def policy(name: str):
    if name not in models:
      models[name] = loop.load_policy(os.path.join(workdir, "runs", name))
    return models[name]

  p.stage("evaluate", f"{cfg.eval_samples} samples x {cfg.eval_prompts} held-out prompts per model")
  rows = [evaluate("sft", lambda: sft_model, {"name": "sft", "method": "sft", "setting": "reference",
                                               "workdir": sft_dir})]
  plotted = [s for s in runs if s.plotted]
  for j, spec in enumerate(plotted, start=1):
    base = {"name": spec.name, "method": spec.method, "setting": spec.setting, "beta": spec.beta,
            "alpha": spec.alpha, "workdir": os.path.join(workdir, "runs", spec.name)}
    rows.append(evaluate(spec.name, lambda s=spec: policy(s.name), base))
    if j % 5 == 0 or j == len(plotted):
      p.message(f"evaluated {j} of {len(plotted)} runs")
  if cfg.dera_lambdas:
    b = cfg.dera_model_beta
    dpo_name = f"dpo_b{b:g}"
    p.stage("dera", f"lambda in {list(cfg.dera_lambdas)} between the SFT and {dpo_name}")
    for lam in cfg.dera_lambdas:
      name = f"dera_l{lam:g}_{dpo_name}"
      base = {"name": name, "method": "dera", "setting": f"λ={lam:g} (DPO β={b:g})", "beta": b,
              "lambda": float(lam), "workdir": os.path.join(workdir, "runs", dpo_name)}
      rows.append(evaluate(name, lambda l=lam: decoding.dera(policy(dpo_name), sft_model, l), base))

  rows += _decoding_rows(cfg, workdir, p, evaluate, policy, sft_model, held_out)

  for r in rows:
    r["sampled_reward_min"] = meta.get("sampled_reward_min")
    r["sampled_reward_max"] = meta.get("sampled_reward_max")
  results, table = stages.write_results(workdir, rows, stages.markdown_table(rows))
  plot = plots.plot_frontier(rows, os.path.join(workdir, "frontier.png"),
                             title=f"Reward vs KL on generated reviews ({cfg.model_preset})")
  wall = time.perf_counter() - start
  p.message(f"done in {wall:.0f}s: trained {len(trained)}, skipped {len(skipped)} finished runs, "
            f"evaluated {len(evaluated)} models")
  p.message(f"results: {results}")
  p.message(f"table:   {table}")
  p.message(f"plot:    {plot}")
  return {"rows": rows, "results": results, "table": table, "plot": plot, "trained": trained,
          "skipped": skipped, "evaluated": evaluated, "wall_seconds": wall, "workdir": workdir}
