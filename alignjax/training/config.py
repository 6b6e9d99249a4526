"""The typed, validated configuration of a training run.

``ml_collections`` stays at the launcher boundary: :func:`build` turns a
``ConfigDict`` (or a plain nested mapping) into a frozen :class:`RunConfig`,
checking every field -- types, ranges, names and combinations -- before any data
or model work, and raising :class:`ConfigError` (a ``ValueError``) with one line
naming the field and what was expected.

The embedded default (``./train.sh`` with no flags) is ``RunConfig()``:
SFT warm-up then DPO of a tiny transformer on generated sorting preferences.

A run's *identity* is every field except :data:`RESUMABLE_FIELDS` (step
budget, logging / checkpoint / eval cadence, checkpoint retention, safety
limits, data location): resuming a workdir with a different identity is refused
(see :func:`identity_diff`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

from alignjax import configs
from alignjax.training import algorithms

__all__ = [
    "ConfigError", "DATA_KINDS", "DataConfig", "DistillSpec", "InitConfig", "LoRASpec", "MeshSpec", "ModelSpec",
    "PhaseConfig", "PrecisionSpec", "ReferenceSpec",
    "RunConfig", "RESUMABLE_FIELDS", "build", "field_help", "flatten", "hparams", "identity", "identity_diff",
    "loss_names", "loss_spec_class", "student_vocab", "to_config_dict",
]


class ConfigError(configs.ConfigError):
  """A user error in the run configuration (one line; launchers exit with code 2)."""


def _f(default, help: str):
  return dataclasses.field(default=default, metadata={"help": help})


DATA_KINDS = ("sorting", "reviews", "arrays", "file")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """The training data: a generated set (written once as TFDS array_record), or the caller's data set or file."""
  kind: str = _f("sorting", "'sorting' (generated sorting preferences), 'reviews' (generated reviews, SFT data: "
                 "chosen == rejected), 'arrays' (a TFDS set written by alignjax.data.arrays_tfds at data.path) or "
                 "'file' (a preference JSONL/Parquet file at data.path, tokenised with data.tokenizer)")
  path: str = _f("", "'arrays': the data set directory; 'file': the preference file (relative: to the caller's cwd)")
  tokenizer: str = _f("", "'file': the HF tokenizer (checkpoint) directory")
  seq_len: int = _f(512, "'file': tokens per row, prompt + response (>= 2)")
  dir: str = _f("", "data set directory ('' = <workdir>/data); relative paths resolve against the caller's cwd")
  num_symbols: int = _f(8, "alphabet size of the sorting task (>= 2)")
  min_len: int = _f(3, "shortest list to sort (>= 2)")
  max_len: int = _f(6, "longest list to sort (>= min_len)")
  train_examples: int = _f(2048, "training pairs (>= batch_size)")
  eval_examples: int = _f(256, "held-out evaluation pairs (>= 1)")
  ches_keep: float = _f(1.0, "keep this fraction of training pairs with the lowest CHES score under the initial "
                        "policy (Razin et al. 2024, arXiv:2410.08847: high CHES pairs cause likelihood displacement); "
                        "1 keeps all, in (0, 1]")
  swap_pairs: bool = _f(False, "train on (rejected, chosen): DPO on swapped pairs is AlignDistil's reverse-DPO "
                        "contrast model (Zhang et al. 2025, arXiv:2503.02832)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
  """The policy: a preset of :class:`alignjax.models.ModelConfig` with size overrides.

  The vocabulary comes from the data (the sorting task's tokens).
  """
  preset: str = _f("llama_tiny", "model preset: llama_tiny (sized by the fields below, vocabulary from the data) or "
                   "an architecture of alignjax.models.presets (llama3_8b, llama3_70b, gemma2_9b, qwen2_5_7b, ...; "
                   "random init unless init.checkpoint)")
  hidden_size: int = _f(64, "model width (>= 1)")
  intermediate_size: int = _f(128, "MLP hidden width (>= 1)")
  num_layers: int = _f(2, "decoder blocks (>= 1)")
  num_heads: int = _f(4, "query heads (>= 1)")
  num_kv_heads: int = _f(2, "key/value heads (divides num_heads)")
  head_dim: int = _f(16, "per-head width (>= 1)")
  remat: str = _f("none", "rematerialisation of each block in the backward pass: none, full, dots, dots_no_batch, "
                  "save_attention_out (also applied to an init.checkpoint model)")
  scan_layers: bool = _f(False, "run the blocks under nnx.scan over stacked parameters (compile time and HLO size "
                         "independent of depth; checkpoints stay per-layer on disk)")

  def model_config(self, vocab_size: int):
    """The :class:`alignjax.models.ModelConfig`: ``llama_tiny`` sized by these fields for a vocabulary of
    ``vocab_size``, or another preset of :data:`alignjax.models.presets.PRESET_NAMES` as published."""
    from alignjax.models import ModelConfig  # pylint: disable=import-outside-toplevel
    if self.preset != "llama_tiny":
      from alignjax.models import presets  # pylint: disable=import-outside-toplevel
      return presets.get(self.preset, remat=self.remat, scan_layers=self.scan_layers)
    preset = getattr(ModelConfig, self.preset)
    return preset(vocab_size=vocab_size, hidden_size=self.hidden_size,
                  intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                  remat=self.remat, scan_layers=self.scan_layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig:
  """Where the policy starts."""
  checkpoint: str = _f("", "the policy's start and reference ('' = random init from config.model): a finished "
                       "run's workdir (its final policy), an alignjax model checkpoint or a Hugging Face model "
                       "directory; its architecture replaces config.model; usually with sft.steps=0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseConfig:
  """One training phase: steps and a warm-up + cosine learning-rate schedule."""
  steps: int = _f(0, "optimizer steps of this phase (>= 0)")
  learning_rate: float = _f(1e-3, "peak learning rate (> 0)")
  warmup_steps: int = _f(0, "linear warm-up steps (>= 0)")


_LOSS_SPECS: dict[tuple, type] = {}


def loss_spec_class() -> type:
  """The ``config.loss`` section: ``name`` plus the union of every registered algorithm's hyper-parameters.

  Built from the registry (:mod:`alignjax.training.algorithms`), so a new
  algorithm's fields appear in the config, ``--config_help`` and the run identity
  without being listed anywhere else. A field shared by several algorithms takes
  the default of the first (by name) that declares it. Fields whose metadata
  says ``config=False`` are set by the algorithm's ``configure`` hook instead.
  """
  registry = algorithms.registry()
  key = tuple(sorted((n, id(a)) for n, a in registry.items()))
  if key not in _LOSS_SPECS:
    fields: dict[str, tuple] = {"name": ("str", _f("dpo", "the algorithm (see the valid loss names)"))}
    users: dict[str, list[str]] = {}
    for name in sorted(registry):
      for f in dataclasses.fields(registry[name].hparams):
        if not f.metadata.get("config", True):
          continue
        users.setdefault(f.name, []).append(name)
        if f.name not in fields:
          fields[f.name] = (f.type, f.metadata.get("help", ""), f.default)
    preference = set(algorithms.names(preference=True))
    spec = [("name", "str", fields.pop("name")[1])]
    for fname, (ftype, help_text, default) in fields.items():
      used = users[fname]
      if not preference <= set(used):
        help_text = f"{help_text} [{', '.join(used)}]"
      spec.append((fname, ftype, _f(default, help_text)))
    cls = dataclasses.make_dataclass(
        "LossSpec", spec, frozen=True, kw_only=True,
        namespace={"__doc__": "The algorithm (``name``) and its hyper-parameters (union over the registry)."})
    cls.__module__ = __name__
    _LOSS_SPECS[key] = cls
  return _LOSS_SPECS[key]


def __getattr__(name):
  if name == "LossSpec":
    return loss_spec_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def loss_users(field_name: str) -> list[str]:
  """The registered algorithms with hyper-parameter ``field_name``."""
  return [n for n, a in sorted(algorithms.registry().items())
          if any(f.name == field_name for f in dataclasses.fields(a.hparams))]


def hparams(cfg: "RunConfig"):
  """The hyper-parameters of ``cfg.loss.name``'s algorithm (its own validated dataclass).

  Taken from ``config.loss`` (and the algorithm's ``configure`` hook for
  run-level fields). A ``config.loss`` field the algorithm does not have must
  keep its default; else a one-line :class:`ConfigError` names it.
  """
  algo = algorithms.get(cfg.loss.name)
  own = {f.name for f in dataclasses.fields(algo.hparams) if f.metadata.get("config", True)}
  default = loss_spec_class()()
  for f in dataclasses.fields(cfg.loss):
    value = getattr(cfg.loss, f.name)
    if f.name == "name" or f.name in own or value == getattr(default, f.name):
      continue
    users = loss_users(f.name)
    _hparams_or_error(algorithms.get(users[0]), {f.name: value})   # a bad value: the range message first
    raise ConfigError(f"config.loss.{f.name} does not apply to {cfg.loss.name!r} (a hyper-parameter of "
                      f"{', '.join(users)}).")
  values = {name: getattr(cfg.loss, name) for name in own}
  if algo.configure is not None:
    values.update(algo.configure(cfg))
  return _hparams_or_error(algo, values)


def _hparams_or_error(algo, values):
  try:
    return algo.hparams(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(re.sub(r"^loss: `(\w+)`", r"config.loss.\1", str(e))) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillSpec:
  """AlignDistil's frozen models and data (Zhang et al. 2025, arXiv:2503.02832); loss.name='aligndistil' only.

  The frozen models run in inference mode with no optimizer state; the student
  starts from ``init.checkpoint`` (the SFT run).
  """
  dpo_checkpoint: str = _f("", "workdir of a finished DPO run: its final policy is the frozen teacher")
  contrast_checkpoint: str = _f("", "workdir of a finished reverse-DPO run (data.swap_pairs=True, same beta): "
                                "its final policy is the frozen contrast model")
  on_policy: bool = _f(False, "distil on one student sample per prompt each step (temperature 1, top-p 1; the "
                       "student's logits / loss.temperature); else on the chosen responses of the data")
  max_new_tokens: int = _f(0, "on-policy response length limit (0: the batch's sequence length)")
  eos_token_id: int = _f(3, "on-policy: the EOS token that ends a sampled response (3: the generated tasks')")


PRECISIONS = ("float32", "bfloat16")
REFERENCE_MODES = ("online", "precomputed", "free", "adapter_off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionSpec:
  """Mixed precision: float32 master weights and optimizer state, parameters cast for forward/backward."""
  compute_dtype: str = _f("float32", "forward/backward dtype: float32 or bfloat16 (norm statistics, attention "
                          "softmax and losses stay float32)")
  param_dtype: str = _f("float32", "storage dtype of the trained (master) parameters and optimizer state")
  frozen_dtype: str = _f("", "storage dtype of frozen models (reference, teachers); '' = compute_dtype")

  @property
  def frozen(self) -> str:
    return self.frozen_dtype or self.compute_dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReferenceSpec:
  """Where the reference log-probs come from (algorithms that need only those; others use their own)."""
  mode: str = _f("online", "online (a frozen copy of the policy at the start of the preference phase), "
                 "precomputed (one pass writes its log-probs, then the model is dropped from memory), free "
                 "(reference-free), adapter_off (LoRA: the policy's weights with the adapters off)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASpec:
  """Low-rank adapters (qwix, as Tunix): only adapters are trained and checkpointed."""
  rank: int = _f(0, "adapter rank (0: full fine-tuning)")
  alpha: float = _f(16.0, "adapter scale numerator: the update is (alpha / rank) A B (> 0)")
  targets: str = _f(".*attn/(q|k|v|o)", "regex over parameter paths (layers/3/attn/q, layers/3/mlp/up, ...)")
  dropout: float = _f(0.0, "dropout on the adapter input, in [0, 1)")

  @property
  def enabled(self) -> bool:
    return self.rank > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSpec:
  """The device mesh (``alignjax.sharding.make_mesh``); all 1 = one device, no mesh."""
  data: int = _f(1, "data-parallel axis size (>= 1)")
  fsdp: int = _f(1, "fully-sharded data-parallel axis size (>= 1)")
  tensor: int = _f(1, "tensor-parallel axis size (>= 1)")

  @property
  def enabled(self) -> bool:
    return (self.data, self.fsdp, self.tensor) != (1, 1, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """Everything that defines (and paces) a training run."""
  seed: int = _f(0, "seed of the data set, the shuffle and the model init (in [0, 2**32))")
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
  init: InitConfig = dataclasses.field(default_factory=InitConfig)
  sft: PhaseConfig = dataclasses.field(
      default_factory=lambda: PhaseConfig(steps=25, learning_rate=3e-3, warmup_steps=20))
  dpo: PhaseConfig = dataclasses.field(
      default_factory=lambda: PhaseConfig(steps=200, learning_rate=5e-4, warmup_steps=10))
  loss: Any = dataclasses.field(default_factory=lambda: loss_spec_class()())
  distill: DistillSpec = dataclasses.field(default_factory=DistillSpec)
  mesh: MeshSpec = dataclasses.field(default_factory=MeshSpec)
  precision: PrecisionSpec = dataclasses.field(default_factory=PrecisionSpec)
  reference: ReferenceSpec = dataclasses.field(default_factory=ReferenceSpec)
  lora: LoRASpec = dataclasses.field(default_factory=LoRASpec)
  batch_size: int = _f(32, "preference pairs per step (>= 1)")
  grad_accum: int = _f(1, "micro-batches per step (divides batch_size; equals one big batch exactly)")
  chunk_size: int = _f(128, "positions per chunk of the label log-probs (no float32 [B, T, V]; >= 1)")
  eval_batch_size: int = _f(128, "pairs per evaluation batch (>= 1)")
  weight_decay: float = _f(0.0, "AdamW weight decay (>= 0)")
  max_grad_norm: float = _f(1.0, "global-norm gradient clipping (> 0)")
  log_every: int = _f(25, "steps between metrics rows (>= 1)")
  checkpoint_every: int = _f(100, "steps between checkpoints (>= 1)")
  max_checkpoints: int = _f(2, "verified checkpoints kept (>= 1)")
  on_nonfinite: str = _f("stop", "non-finite loss/gradients/parameters: 'stop' (exit 3) or 'skip' the update")
  max_loss: float = _f(1e4, "divergence bound: a loss above it stops the run (> 0; inf disables)")
  diagnostics_every: int = _f(0, "every N steps of a paired preference phase, log the gradient entanglement of the "
                              "chosen and rejected log-likelihoods (Yuan et al. 2024; per-pair inner product and "
                              "cosine); 0 = off")
  report_memory: bool = _f(False, "log the planner's per-device memory (alignjax.aot, launch/plan.py) next to the "
                           "compiled memory analysis of the step that runs (compiles the step twice)")


# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = frozenset({
    "dpo.steps", "log_every", "checkpoint_every", "max_checkpoints", "eval_batch_size",
    "on_nonfinite", "max_loss", "data.dir", "mesh.data", "mesh.fsdp", "mesh.tensor", "report_memory",
    "diagnostics_every",
})
BUDGET_FIELDS = ("dpo.steps",)


def loss_names() -> tuple[str, ...]:
  """Valid ``loss.name`` values: the registry's preference algorithms (``sft`` is the warm-up phase)."""
  return algorithms.names(preference=True)


def _fields(cls) -> list[dataclasses.Field]:
  return list(dataclasses.fields(cls))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """``{"loss.beta": 0.1, ...}`` for a :class:`RunConfig` (or any nested dataclass)."""
  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      out.update(flatten(v, f"{prefix}{f.name}."))
    else:
      out[prefix + f.name] = v
  return out


def identity(cfg: RunConfig) -> dict[str, Any]:
  """The fields that define the run (everything but :data:`RESUMABLE_FIELDS`)."""
  return {k: v for k, v in flatten(cfg).items() if k not in RESUMABLE_FIELDS}


def identity_diff(stored: Mapping[str, Any], cfg: RunConfig) -> list[str]:
  """One line per identity field that differs between ``stored`` and ``cfg``."""
  now = identity(cfg)
  default = flatten(RunConfig())
  name = now.get("loss.name")
  same_algorithm = stored.get("loss.name", name) == name
  lines = []
  for k in sorted(set(stored) | set(now)):
    if k in RESUMABLE_FIELDS:
      continue
    # A hyper-parameter of other algorithms does not define this run (its default may change).
    if same_algorithm and k.startswith("loss.") and k != "loss.name" and name not in loss_users(k[len("loss."):]):
      continue
    a, b = stored.get(k, "<absent>"), now.get(k, "<absent>")
    # A field added (or removed) since the run was stored matches when it holds its default.
    if "<absent>" in (a, b) and (a if b == "<absent>" else b) == default.get(k, "<absent>"):
      continue
    if a != b:
      lines.append(f"config.{k}: stored {a!r}, given {b!r}")
  return lines


def field_help() -> str:
  """A table of every config field, its default and help, and the valid loss names."""
  rows = []
  default = flatten(RunConfig())

  def walk(cls, obj, prefix):
    for f in dataclasses.fields(cls):
      v = getattr(obj, f.name)
      if dataclasses.is_dataclass(v):
        walk(type(v), v, f"{prefix}{f.name}.")
      else:
        resumable = " [may change on resume]" if prefix + f.name in RESUMABLE_FIELDS else ""
        rows.append((f"--config.{prefix}{f.name}", repr(default[prefix + f.name]),
                     f.metadata.get("help", "") + resumable))

  walk(RunConfig, RunConfig(), "")
  width = max(len(r[0]) for r in rows)
  dwidth = max(len(r[1]) for r in rows)
  lines = ["Config fields (default, meaning):"]
  lines += [f"  {n:<{width}}  {d:<{dwidth}}  {h}" for n, d, h in rows]
  lines.append("Valid loss names (--config.loss.name): " + ", ".join(loss_names()))
  registry = algorithms.registry()
  lines += [f"  {n:<{width - 2}}  {registry[n].schema:<{dwidth}}  {registry[n].description}" for n in loss_names()]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- building

def build(config: Any = None, **overrides: Any) -> RunConfig:
  """A validated :class:`RunConfig` from a ``ConfigDict``/mapping (missing fields: defaults).

  ``overrides`` are dotted field names (``build(cd, **{"loss.beta": 0.2})``).
  Types are checked by :func:`alignjax.configs.build_dataclass`; raises
  :class:`ConfigError` (one line) on any invalid field.
  """
  cfg = configs.build_dataclass(RunConfig, config, overrides=overrides, error=ConfigError,
                                hint=" (see --config_help)")
  validate(cfg)
  return cfg


_nested = configs.nested


def replace(cfg: RunConfig, **dotted: Any) -> RunConfig:
  """``cfg`` with dotted fields replaced (``replace(cfg, **{"dpo.steps": 10})``), validated."""
  return build(cfg, **dotted)


def _model_presets() -> tuple[str, ...]:
  from alignjax.models import presets  # pylint: disable=import-outside-toplevel
  return presets.PRESET_NAMES


MODEL_PRESETS = ("llama_tiny",)   # sized by config.model.*; see _model_presets() for every preset


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def validate(cfg: RunConfig) -> None:
  """Checks ranges, names and combinations of every field; raises :class:`ConfigError`."""
  d, m, l = cfg.data, cfg.model, cfg.loss
  _check(0 <= cfg.seed < 2**32, f"config.seed must be in [0, 2**32) (the data shuffle's seed), got {cfg.seed}.")
  _check(d.num_symbols >= 2, f"config.data.num_symbols must be >= 2, got {d.num_symbols}.")
  _check(d.min_len >= 2, f"config.data.min_len must be >= 2, got {d.min_len}.")
  _check(d.max_len >= d.min_len,
         f"config.data.max_len must be >= config.data.min_len ({d.min_len}), got {d.max_len}.")
  _check(d.eval_examples >= 1, f"config.data.eval_examples must be >= 1, got {d.eval_examples}.")
  _check(d.kind in DATA_KINDS, f"config.data.kind must be one of {', '.join(DATA_KINDS)}, got {d.kind!r}.")
  _check(d.kind not in ("arrays", "file") or bool(d.path),
         f"config.data.path must name the data set ('arrays') or the preference file ('file') for "
         f"config.data.kind={d.kind!r}.")
  _check(d.kind != "file" or bool(d.tokenizer),
         "config.data.tokenizer must name the tokenizer (HF checkpoint) directory for config.data.kind='file'.")
  _check(d.seq_len >= 2, f"config.data.seq_len must be >= 2, got {d.seq_len}.")
  _check(m.preset in _model_presets(), f"config.model.preset must be one of {list(_model_presets())}, got {m.preset!r}.")
  if m.preset != "llama_tiny":
    sized = [f for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
             if getattr(m, f) != getattr(ModelSpec(), f)]
    _check(not sized, f"config.model.{', config.model.'.join(sized)} size the llama_tiny preset only, not "
           f"{m.preset!r} (its published architecture).")
  for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
    v = getattr(m, name)
    _check(v >= 1, f"config.model.{name} must be >= 1, got {v}.")
  _check(m.num_heads % m.num_kv_heads == 0,
         f"config.model.num_kv_heads ({m.num_kv_heads}) must divide config.model.num_heads ({m.num_heads}).")
  from alignjax.models.config import REMAT_POLICIES  # pylint: disable=import-outside-toplevel
  _check(m.remat in REMAT_POLICIES, f"config.model.remat must be one of {', '.join(REMAT_POLICIES)}, got {m.remat!r}.")
  try:
    m.model_config(vocab_size=d.num_symbols + 4)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None
  for phase in ("sft", "dpo"):
    p = getattr(cfg, phase)
    _check(p.steps >= 0, f"config.{phase}.steps must be >= 0, got {p.steps}.")
    _check(p.warmup_steps >= 0, f"config.{phase}.warmup_steps must be >= 0, got {p.warmup_steps}.")
    _check(math.isfinite(p.learning_rate) and p.learning_rate > 0,
           f"config.{phase}.learning_rate must be a finite number > 0, got {p.learning_rate}.")
  _check(cfg.sft.steps + cfg.dpo.steps > 0, "config.sft.steps + config.dpo.steps is 0: nothing to train.")
  names = loss_names()
  _check(l.name in names, f"config.loss.name: unknown loss {l.name!r}; valid loss names: {', '.join(names)}.")
  algo = algorithms.get(l.name)
  hparams(cfg)
  _check(cfg.batch_size >= 1, f"config.batch_size must be positive, got {cfg.batch_size}.")
  _check(cfg.eval_batch_size >= 1, f"config.eval_batch_size must be positive, got {cfg.eval_batch_size}.")
  _check(d.kind not in ("sorting", "reviews") or d.train_examples >= cfg.batch_size,
         f"config.data.train_examples ({d.train_examples}) must be >= config.batch_size ({cfg.batch_size}).")
  _check(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"config.weight_decay must be a finite number >= 0, got {cfg.weight_decay}.")
  _check(math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm > 0,
         f"config.max_grad_norm must be a finite number > 0, got {cfg.max_grad_norm}.")
  _check(cfg.log_every >= 1, f"config.log_every must be positive, got {cfg.log_every}.")
  _check(cfg.checkpoint_every >= 1, f"config.checkpoint_every must be positive, got {cfg.checkpoint_every}.")
  _check(cfg.max_checkpoints >= 1,
         f"config.max_checkpoints must be >= 1 (0 would disable resuming), got {cfg.max_checkpoints}.")
  _check(cfg.on_nonfinite in ("stop", "skip"),
         f"config.on_nonfinite must be 'stop' or 'skip', got {cfg.on_nonfinite!r}.")
  _check(cfg.max_loss > 0, f"config.max_loss must be > 0 (inf disables the check), got {cfg.max_loss}.")
  mesh = cfg.mesh
  for axis in ("data", "fsdp", "tensor"):
    _check(getattr(mesh, axis) >= 1, f"config.mesh.{axis} must be >= 1, got {getattr(mesh, axis)}.")
  shards = mesh.data * mesh.fsdp
  for name, size in (("batch_size", cfg.batch_size), ("eval_batch_size", cfg.eval_batch_size),
                     ("data.eval_examples", d.eval_examples)):
    _check(size % shards == 0,
           f"config.{name} ({size}) must be divisible by config.mesh.data * config.mesh.fsdp ({shards}): "
           "the batch is split over those axes.")
  _validate_pod_fields(cfg, algo)
  _check(cfg.distill.max_new_tokens >= 0,
         f"config.distill.max_new_tokens must be >= 0, got {cfg.distill.max_new_tokens}.")
  if algo.needs != "teachers":
    teachers = [n for n, a in algorithms.registry().items() if a.needs == "teachers"]
    _check(flatten(cfg.distill) == flatten(DistillSpec()),
           f"config.distill.* apply to algorithms with frozen teachers ({', '.join(teachers)}), not {l.name!r}.")
  if algo.validate_run is not None:
    try:
      algo.validate_run(cfg)
    except ValueError as e:
      raise ConfigError(str(e)) from None


def _validate_pod_fields(cfg: RunConfig, algo) -> None:
  """Precision, remat, accumulation, chunking, reference mode and LoRA (before any data or model work)."""
  pr, m, ref, lora = cfg.precision, cfg.model, cfg.reference, cfg.lora
  for name in ("compute_dtype", "param_dtype"):
    _check(getattr(pr, name) in PRECISIONS,
           f"config.precision.{name} must be one of {', '.join(PRECISIONS)}, got {getattr(pr, name)!r}.")
  _check(pr.frozen_dtype in ("",) + PRECISIONS,
         f"config.precision.frozen_dtype must be '' or one of {', '.join(PRECISIONS)}, got {pr.frozen_dtype!r}.")
  _check(cfg.chunk_size >= 1, f"config.chunk_size must be >= 1, got {cfg.chunk_size}.")
  _check(0.0 < cfg.data.ches_keep <= 1.0, f"config.data.ches_keep must be in (0, 1], got {cfg.data.ches_keep}.")
  _check(cfg.data.ches_keep == 1.0 or algo.schema == "paired",
         f"config.data.ches_keep scores preference pairs; {algo.name!r} trains on {algo.schema} rows.")
  _check(cfg.diagnostics_every >= 0, f"config.diagnostics_every must be >= 0, got {cfg.diagnostics_every}.")
  _check(not cfg.diagnostics_every or (algo.schema == "paired" and not lora.enabled and algo.make_model is None),
         f"config.diagnostics_every: gradient entanglement needs a paired language-model algorithm without LoRA, "
         f"not {algo.name!r}{' with LoRA' if lora.enabled else ''}.")
  _check(cfg.grad_accum >= 1, f"config.grad_accum must be >= 1, got {cfg.grad_accum}.")
  shards = cfg.mesh.data * cfg.mesh.fsdp
  _check(cfg.batch_size % cfg.grad_accum == 0,
         f"config.grad_accum ({cfg.grad_accum}) must divide config.batch_size ({cfg.batch_size}).")
  _check((cfg.batch_size // cfg.grad_accum) % shards == 0,
         f"config.batch_size / config.grad_accum ({cfg.batch_size // cfg.grad_accum}) must be divisible by "
         f"config.mesh.data * config.mesh.fsdp ({shards}): each micro-batch is split over those axes.")
  _check(ref.mode in REFERENCE_MODES,
         f"config.reference.mode must be one of {', '.join(REFERENCE_MODES)}, got {ref.mode!r}.")
  if ref.mode == "adapter_off":   # the same weights with the adapters off: log-probs or full distributions
    _check(algo.needs in ("reference_logps", "reference_logits"),
           f"config.reference.mode='adapter_off' needs an algorithm with a reference model; {algo.name!r} needs "
           f"{algo.needs!r} (use reference.mode=online).")
  elif ref.mode != "online":
    _check(algo.needs == "reference_logps",
           f"config.reference.mode={ref.mode!r} needs an algorithm that uses only reference log-probs; "
           f"{algo.name!r} needs {algo.needs!r} (online only).")
  _check(ref.mode != "precomputed" or not algo.kl_rows,
         f"config.reference.mode='precomputed': {algo.name!r} scores mismatched KL rows rebuilt in every batch; "
         "use reference.mode=online.")
  _check(ref.mode != "free" or algo.reference_free_ok,
         f"config.reference.mode='free': {algo.name!r} cannot run reference-free.")
  _check(ref.mode != "adapter_off" or lora.enabled,
         "config.reference.mode='adapter_off' needs LoRA (config.lora.rank > 0).")
  _check(lora.rank >= 0, f"config.lora.rank must be >= 0, got {lora.rank}.")
  _check(math.isfinite(lora.alpha) and lora.alpha > 0, f"config.lora.alpha must be a finite number > 0, got {lora.alpha}.")
  _check(0.0 <= lora.dropout < 1.0, f"config.lora.dropout must be in [0, 1), got {lora.dropout}.")
  # The adapters' dropout keeps an rng stream in the model, which the functional step does not carry yet.
  _check(lora.dropout == 0.0, f"config.lora.dropout: adapter dropout is not supported by the training step yet "
         f"(library-level only, alignjax.models.lora.apply_lora); got {lora.dropout}.")
  if lora.enabled:
    try:
      pattern = re.compile(lora.targets)
    except re.error as e:
      raise ConfigError(f"config.lora.targets is not a valid regex ({e}): {lora.targets!r}.") from None
    paths = _adaptable_paths(cfg)
    _check(paths is None or any(pattern.fullmatch(p) for p in paths),
           f"config.lora.targets {lora.targets!r} matches no parameter path of the model (e.g. "
           f"{(paths or [])[:4]}).")


def _adaptable_paths(cfg: RunConfig):
  """The parameter paths LoRA can adapt, from the model's config alone (no weights), or None if unreadable."""
  import os  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax.models import Transformer, checkpoint_io, config_from_hf, lora, read_hf_config  # pylint: disable=import-outside-toplevel
  model_cfg = None
  if not cfg.init.checkpoint:
    model_cfg = cfg.model.model_config(vocab_size=cfg.data.num_symbols + 4)
  else:
    path = os.path.abspath(cfg.init.checkpoint)
    for d in (os.path.join(path, "final_policy"), path):
      if os.path.isdir(os.path.join(d, checkpoint_io.CONFIG_ITEM)):
        model_cfg = checkpoint_io.load_config(d)
        break
    else:
      if os.path.isfile(os.path.join(path, "config.json")):
        try:
          model_cfg = config_from_hf(read_hf_config(path))
        except (TypeError, ValueError):
          return None
  if model_cfg is None:
    return None
  model_cfg = dataclasses.replace(model_cfg, scan_layers=cfg.model.scan_layers)
  return lora.adaptable_paths(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))


def student_vocab(cfg: RunConfig):
  """The vocabulary size the policy will have, if it can be read without loading weights (else None)."""
  import os  # pylint: disable=import-outside-toplevel
  d = cfg.data
  if cfg.init.checkpoint:
    from alignjax.models import checkpoint_io  # pylint: disable=import-outside-toplevel
    for path in (os.path.join(cfg.init.checkpoint, "final_policy"), cfg.init.checkpoint):
      if os.path.isdir(os.path.join(path, checkpoint_io.CONFIG_ITEM)):
        return checkpoint_io.load_config(path).vocab_size
    return None
  if d.kind == "sorting":
    return d.num_symbols + 4
  if d.kind == "reviews":
    from alignjax.data.reviews import ReviewsTask  # pylint: disable=import-outside-toplevel
    return ReviewsTask().vocab_size
  if d.kind == "arrays":
    from alignjax.data import arrays_tfds  # pylint: disable=import-outside-toplevel
    if arrays_tfds.is_prepared(os.path.abspath(d.path)):
      return arrays_tfds.read_metadata(os.path.abspath(d.path)).get("vocab_size")
  return None


def to_config_dict(cfg: RunConfig | None = None):
  """An ``ml_collections.ConfigDict`` of ``cfg`` (default: :class:`RunConfig` defaults)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = RunConfig() if cfg is None else cfg
  return ml_collections.ConfigDict(_nested(flatten(cfg)))


def iter_fields() -> Iterable[str]:
  return flatten(RunConfig()).keys()
