"""The stages every study shares: data, SFT, sampled preferences, cached evaluation, results.

The frontier study (:mod:`alignjax.study.frontier`) and the AlignDistil
pipeline (:mod:`alignjax.study.aligndistil`) are built from these, on the
generated reviews task of :mod:`alignjax.data.reviews` (a programmatic gold
reward), each training run one :func:`alignjax.training.loop.run` call:

* ``data``: the reviews SFT set as a TFDS array_record data set (:func:`write_sft_data`);
* ``sft``: the loop config of supervised fine-tuning (:func:`sft_fields`);
* ``preferences``: ``K`` responses per prompt sampled from the SFT model at
  temperature 1, paired and labelled by the gold reward under Bradley--Terry
  noise (:func:`write_sampled_preferences`; the protocol of DPO's controlled
  experiment, Rafailov et al. 2023, arXiv:2305.18290, Sec. 6.1);
* preference runs from the SFT checkpoint (:func:`preference_fields`), skipped
  when finished (:func:`finished`, :func:`train_or_skip`);
* held-out evaluation -- gold reward and ``KL(pi || pi_SFT)`` from samples
  (:class:`HeldOutEval`, :mod:`alignjax.study.evaluation`) -- cached on disk
  (:func:`cached_row`), and the results files (:func:`write_results`,
  :func:`markdown_table`).

Every file is written atomically; a workdir keeps its data settings
(:func:`check_identity`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from alignjax.study import evaluation

__all__ = [
    "HeldOutEval", "Progress", "cached_row", "check_identity", "finished", "markdown_table", "preference_fields",
    "read_json", "reviews_task", "run_stamp", "sft_fields", "split_sizes", "train_or_skip", "validate_common",
    "write_json", "write_results", "write_sampled_preferences", "write_sft_data",
]


# ----------------------------------------------------------------------------- files

def read_json(path: str) -> Optional[dict]:
  """The JSON object in ``path``, or None when it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically (a temporary file, then a rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_identity(path: str, record: Mapping[str, Any], keys: Sequence[str], *, error: type, message: str) -> None:
  """Refuses a workdir whose stored ``record`` (``path``) differs in ``keys``; then stores ``record``.

  Raises ``error(f"{message} (<key>: stored .., given ..; ...); use another workdir.")``.
  """
  record = json.loads(json.dumps(record))
  stored = read_json(path)
  if stored is not None:
    diff = [f"{k}: stored {stored.get(k)!r}, given {record[k]!r}" for k in keys if stored.get(k) != record[k]]
    if diff:
      raise error(f"{message} ({'; '.join(diff)}); use another workdir.")
  write_json(path, record)


# ----------------------------------------------------------------------------- configs

def reviews_task(cfg):
  """The :class:`alignjax.data.reviews.ReviewsTask` of a study config's task fields."""
  from alignjax.data.reviews import ReviewsTask  # pylint: disable=import-outside-toplevel
  return ReviewsTask(num_topics=cfg.num_topics, min_len=cfg.min_len, max_len=cfg.max_len,
                     sentiment_rate=cfg.sentiment_rate)


def split_sizes(pairs: int) -> tuple[int, int]:
  """(train, eval) pairs of the preference set: 1/8 held out (at least 1)."""
  n_eval = max(1, pairs // 8)
  return pairs - n_eval, n_eval


def validate_common(cfg, *, what: str, error: type, at_least_one: Iterable[str], positive: Iterable[str]) -> None:
  """The checks of the fields every study config has (task, SFT, preference data, evaluation).

  ``what`` names the config in messages (``study config `seed` must be ...``);
  ``at_least_one`` / ``positive`` list further integer (>= 1) / number (> 0) fields.
  """
  def check(ok: bool, msg: str) -> None:
    if not ok:
      raise error(msg)

  check(cfg.seed >= 0, f"{what} `seed` must be >= 0, got {cfg.seed}.")
  try:
    reviews_task(cfg)
  except ValueError as e:
    raise error(f"{what}: {e}") from None
  for name in ("batch_size", "sft_steps", "preference_prompts", "eval_samples", *at_least_one):
    check(getattr(cfg, name) >= 1, f"{what} `{name}` must be >= 1, got {getattr(cfg, name)}.")
  check(cfg.eval_prompts >= 2, f"{what} `eval_prompts` must be >= 2 (standard errors), got {cfg.eval_prompts}.")
  check(cfg.samples_per_prompt >= 2, f"{what} `samples_per_prompt` must be >= 2, got {cfg.samples_per_prompt}.")
  check(cfg.sft_examples >= cfg.batch_size,
        f"{what} `sft_examples` ({cfg.sft_examples}) must be >= `batch_size` ({cfg.batch_size}).")
  pairs = cfg.preference_prompts * (cfg.samples_per_prompt // 2)
  check(split_sizes(pairs)[0] >= cfg.batch_size,
        f"{what}: {pairs} preference pairs give {split_sizes(pairs)[0]} training pairs, fewer than "
        f"`batch_size` {cfg.batch_size}; raise `preference_prompts`.")
  for name in ("sft_learning_rate", "label_temperature", *positive):
    check(getattr(cfg, name) > 0, f"{what} `{name}` must be > 0, got {getattr(cfg, name)}.")


def sft_fields(cfg, data_path: str) -> dict[str, Any]:
  """The loop config (dotted fields) of the SFT run on the data set at ``data_path``."""
  return {
      "seed": cfg.seed, "model.preset": cfg.model_preset, "data.kind": "arrays", "data.path": data_path,
      "batch_size": cfg.batch_size, "sft.steps": cfg.sft_steps, "sft.learning_rate": cfg.sft_learning_rate,
      "sft.warmup_steps": max(1, cfg.sft_steps // 10), "dpo.steps": 0,
      "log_every": max(1, cfg.sft_steps // 4), "checkpoint_every": cfg.sft_steps,
  }


def preference_fields(cfg, *, data_path: str, init_checkpoint: str, steps: int,
                      learning_rate: float) -> dict[str, Any]:
  """The loop config (dotted fields) of a preference run from the SFT checkpoint; the caller adds ``loss.*``."""
  steps = max(steps, 1)
  return {
      "seed": cfg.seed, "model.preset": cfg.model_preset, "data.kind": "arrays", "data.path": data_path,
      "batch_size": cfg.batch_size, "init.checkpoint": init_checkpoint, "sft.steps": 0,
      "dpo.steps": steps, "dpo.learning_rate": learning_rate, "dpo.warmup_steps": max(1, steps // 10),
      "log_every": max(1, steps // 3), "checkpoint_every": steps,
  }


# ----------------------------------------------------------------------------- data

def write_sft_data(cfg, path: str) -> str:
  """``data``: the reviews SFT set (``sft_examples`` train, 1/8 of it eval) at ``path`` (written once)."""
  from alignjax.data import arrays_tfds  # pylint: disable=import-outside-toplevel
  task = reviews_task(cfg)
  return arrays_tfds.write_arrays(
      path, {"train": task.sft_data(cfg.sft_examples, cfg.seed),
             "eval": task.sft_data(max(cfg.batch_size, cfg.sft_examples // 8), cfg.seed + 1)},
      metadata={"vocab_size": task.vocab_size, "task": dataclasses.asdict(task)})


def write_sampled_preferences(cfg, sft_model, path: str) -> bool:
  """``preferences``: pairs sampled from ``sft_model`` and labelled by the gold reward, at ``path``.

  ``samples_per_prompt`` responses per each of ``preference_prompts`` training
  prompts at temperature 1 (:func:`alignjax.decoding.generate`), paired and
  labelled under Bradley--Terry noise at ``label_temperature``
  (:func:`alignjax.data.reviews.sampled_preferences`); 1/8 held out. The
  metadata records the range of the sampled rewards. Returns False when the set
  was on disk already (reused as is).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from alignjax import decoding  # pylint: disable=import-outside-toplevel
  from alignjax.data import arrays_tfds, reviews  # pylint: disable=import-outside-toplevel
  from alignjax.data.synthetic import EOS, PAD  # pylint: disable=import-outside-toplevel
  if arrays_tfds.is_prepared(path):
    return False
  task = reviews_task(cfg)
  topics = task.sample_topics(cfg.preference_prompts, cfg.seed + 2)
  prompts, prompt_mask = evaluation.repeat_prompts(*task.prompts(topics), cfg.samples_per_prompt)
  out = decoding.generate(sft_model, prompts, prompt_mask, max_new_tokens=task.max_len + 1, temperature=1.0,
                          eos_token_ids=(EOS,), pad_token_id=PAD, rng=jax.random.key(cfg.seed + 2))
  pairs = reviews.sampled_preferences(task, prompts, np.asarray(out.tokens), np.asarray(out.mask),
                                      num_samples=cfg.samples_per_prompt, seed=cfg.seed + 3,
                                      temperature=cfg.label_temperature)
  n_train, _ = split_sizes(len(pairs["chosen_tokens"]))
  rewards = [pairs["chosen_reward"], pairs["rejected_reward"]]
  arrays_tfds.write_arrays(
      path, {"train": {k: v[:n_train] for k, v in pairs.items()}, "eval": {k: v[n_train:] for k, v in pairs.items()}},
      metadata={"vocab_size": task.vocab_size, "task": dataclasses.asdict(task),
                "sampled_reward_min": float(min(r.min() for r in rewards)),
                "sampled_reward_max": float(max(r.max() for r in rewards)),
                "sampled_reward_mean": float(np.mean(rewards))})
  return True


# ----------------------------------------------------------------------------- runs

def finished(run_cfg, workdir: str) -> bool:
  """True when ``workdir`` holds a finished run of exactly this config's identity and budget."""
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import runtime as run_lib  # pylint: disable=import-outside-toplevel
  final = read_json(os.path.join(workdir, "final_metrics.json"))
  record = run_lib.read_record(os.path.join(workdir, "checkpoints"))
  if final is None or record is None:
    return False
  if config_lib.identity_diff(record.get("identity", {}), run_cfg):
    return False  # loop.run refuses it and lists the fields
  return int(final.get("steps", -1)) == run_cfg.sft.steps + run_cfg.dpo.steps


def train_or_skip(run_cfg, workdir: str, train_fn: Callable[..., Any]) -> bool:
  """Trains ``run_cfg`` in ``workdir`` with ``train_fn(run_cfg, workdir=...)`` unless finished; True if trained."""
  if finished(run_cfg, workdir):
    return False
  train_fn(run_cfg, workdir=workdir)
  return True


def run_stamp(workdir: Optional[str]) -> Optional[float]:
  """The modification time of a run's ``final_metrics.json`` (None without one): evaluations key on it."""
  if not workdir:
    return None
  final = os.path.join(workdir, "final_metrics.json")
  return os.path.getmtime(final) if os.path.exists(final) else None


# ----------------------------------------------------------------------------- evaluation

class HeldOutEval:
  """Gold reward and ``KL(pi || pi_SFT)`` of a model on the held-out prompts of a study config.

  ``eval_samples`` responses per each of ``eval_prompts`` prompts (topics drawn
  with ``seed + 1000``), at temperature 1 with one shared key (``seed + 4``):
  common random numbers across the models compared
  (:func:`alignjax.study.evaluation.sample_and_score`, then ``summarize``).
  """

  def __init__(self, cfg, sft_model):
    import jax  # pylint: disable=import-outside-toplevel
    self.task = reviews_task(cfg)
    self.sft_model = sft_model
    self.num_samples = cfg.eval_samples
    self.prompts, self.mask = self.task.prompts(self.task.sample_topics(cfg.eval_prompts, cfg.seed + 1000))
    self.scorer = evaluation.make_scorer(sft_model)
    self.key = jax.random.key(cfg.seed + 4)
    self.settings = {"eval_prompts": cfg.eval_prompts, "eval_samples": cfg.eval_samples, "seed": cfg.seed}

  def __call__(self, model=None, *, sampler=None) -> dict[str, float]:
    """Samples ``model`` (or runs ``sampler``, see :func:`alignjax.study.evaluation.sample_and_score`)."""
    from alignjax.data.synthetic import EOS, PAD  # pylint: disable=import-outside-toplevel
    scores = evaluation.sample_and_score(
        model, self.sft_model, self.prompts, self.mask, num_samples=self.num_samples,
        max_new_tokens=self.task.max_len + 1, rng=self.key, reward_fn=self.task.gold_reward, scorer=self.scorer,
        eos_token_ids=(EOS,), pad_token_id=PAD, sampler=sampler)
    return evaluation.summarize(scores)


def cached_row(path: str, key: Mapping[str, Any], compute: Callable[[], dict]) -> tuple[dict, bool]:
  """``(row, computed)``: the row stored in ``path`` if its ``key`` fields match, else ``compute()``, stored.

  The file holds ``dict(key, row=row)``, written atomically.
  """
  cached = read_json(path)
  if cached is not None and all(cached.get(k) == v for k, v in key.items()):
    return cached["row"], False
  row = compute()
  write_json(path, dict(key, row=evaluation.as_jsonable(row)))
  return row, True


# ----------------------------------------------------------------------------- results

def _fmt(v, se=None, digits: int = 3) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  if se is None or (isinstance(se, float) and math.isnan(se)):
    return f"{v:.{digits}f}"
  return f"{v:.{digits}f} ± {se:.{digits}f}"


def markdown_table(rows: Iterable[Mapping], labels: Sequence[str] = ("method", "setting")) -> str:
  """A Markdown table: the ``labels`` columns, reward ± s.e., KL ± s.e., mean length."""
  lines = ["| " + " | ".join(labels) + " | reward | KL(π‖π_SFT) | mean length |",
           "|" + "---|" * (len(labels) + 3)]
  for r in rows:
    cells = [str(r.get(c, "")) for c in labels]
    cells += [_fmt(r["reward"], r.get("reward_se")), _fmt(r["kl"], r.get("kl_se")), _fmt(r.get("mean_length"))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_results(workdir: str, rows: Sequence[Mapping], table: str) -> tuple[str, str]:
  """Writes ``results.jsonl`` (one row a line) and ``results.md`` (``table``) in ``workdir``; returns their paths."""
  results = os.path.join(workdir, "results.jsonl")
  with open(results + ".tmp", "w") as f:
    for r in rows:
      f.write(json.dumps(evaluation.as_jsonable(r)) + "\n")
  os.replace(results + ".tmp", results)
  path = os.path.join(workdir, "results.md")
  with open(path + ".tmp", "w") as f:
    f.write(table)
  os.replace(path + ".tmp", path)
  return results, path


class Progress:
  """Timestamped progress lines (``[name   1.0s] ...``), ``stage i/n`` lines and an ETA over runs."""

  def __init__(self, name: str, stages: Sequence[str], stream=None, enabled: bool = True):
    self.name, self.stages = name, tuple(stages)
    self.stream = sys.stdout if stream is None else stream
    self.enabled = enabled
    self.t0 = time.perf_counter()
    self.run_times: list[float] = []

  def message(self, text: str) -> None:
    if self.enabled:
      print(f"[{self.name} {time.perf_counter() - self.t0:6.1f}s] {text}", file=self.stream, flush=True)

  def stage(self, name: str, detail: str = "") -> None:
    i = self.stages.index(name) + 1
    self.message(f"stage {i}/{len(self.stages)} {name}" + (f": {detail}" if detail else ""))

  def eta(self, remaining: int) -> str:
    if not self.run_times or remaining <= 0:
      return "?" if remaining > 0 else "0:00:00"
    s = int(round(np.mean(self.run_times) * remaining))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
