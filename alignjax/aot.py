"""Plan a pod run ahead of time: compile alignjax's own training steps for a TPU topology.

With the ``libtpu`` package installed, ``jax.experimental.topologies.get_topology_desc``
returns the abstract devices of a TPU slice on a CPU-only machine, and
``jit(step).lower(abstract_args).compile()`` yields the real TPU executable's
``memory_analysis()`` and ``cost_analysis()`` (MaxText's ``train_compile.py`` does this for
its own step). This module compiles THE SAME step that training runs —
``alignjax.training.steps.make_train_step`` over an abstract model built with
``nnx.eval_shape`` (no weights, nothing allocated) — with the rule-table shardings of
``alignjax.sharding``, and reports per device: parameter / optimizer / frozen-model bytes,
argument, output, temporary bytes, the chip's HBM and a fits verdict with the margin;
FLOPs per step next to the ``(6 + 2·frozen)·N·T`` formula (Kaplan et al. 2020, "Scaling
Laws for Neural Language Models", arXiv:2001.08361, Sec. 2.1: ≈2N FLOPs per token forward,
4N backward); and a roofline step time ``max(flops / peak_bf16, bytes / hbm_bw)``.

Without libtpu, the planner falls back to N fake CPU devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``): the sharding and FLOP counts are still
meaningful, but memory figures are then the CPU compiler's, not the TPU's.

API::

  Experiment(algorithm="dpo", model="llama3_8b" | ModelConfig, hf_config=None,
             batch_size=..., prompt_len=..., response_len=..., reference="online", ...)
  get_topology(name, *, num_slices=1, backend="auto") -> Topology
  plan(experiment, topology, mesh=(data, fsdp, tensor), *, remat=None) -> PlanResult
  search(experiment, topology, *, remats=None, cache_dir=None) -> list[PlanResult]
  format_table(results) -> str
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from typing import Mapping, Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import alignjax

# libtpu refuses to initialise when it believes another process holds the TPU; on a
# machine with no TPU, compiling for a topology is harmless.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _quiet_libtpu_without_a_tpu() -> bool:
  """On a machine without a TPU chip, libtpu (loaded only to compile) does not look for its own slice.

  Otherwise it prints "could not determine TPU accelerator type" and an
  ``INVALID_ARGUMENT`` line about ``TPU_WORKER_HOSTNAMES``; the topology it
  compiles for is given by name and is the same either way (checked on v4/v5e,
  multi-host and multi-slice). Nor does it write its driver logs (a new file in
  /tmp/tpu_logs per process) there: ``TPU_LOG_DIR=disabled`` keeps them on stderr
  (for its glog files see `_libtpu_logs_to_stderr`). Returns whether there is no chip.
  """
  from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    return False
  os.environ.setdefault("TPU_LOG_DIR", "disabled")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  return True


_NO_TPU_CHIP = _quiet_libtpu_without_a_tpu()


@contextlib.contextmanager
def _libtpu_logs_to_stderr():
  """While libtpu loads on a machine without a TPU chip: its glog output goes to stderr.

  Otherwise libtpu writes two ``tpu_driver.<host>.<user>.log.*`` files into $TMPDIR
  (default /tmp) per process; ``--logtostderr`` in ``LIBTPU_INIT_ARGS`` sends them to
  stderr instead, under libtpu's stderr threshold (nothing more is printed). Only here,
  and restored after: JAX hashes ``LIBTPU_INIT_ARGS`` into every persistent compilation
  cache key, so a lasting change would make the same CPU programs miss the cache. A user's
  own ``--logtostderr`` or ``--log_dir`` is left alone.
  """
  old = os.environ.get("LIBTPU_INIT_ARGS")
  if not _NO_TPU_CHIP or "--logtostderr" in (old or "") or "--log_dir" in (old or ""):
    yield
    return
  os.environ["LIBTPU_INIT_ARGS"] = f"{old or ''} --logtostderr".strip()
  try:
    yield
  finally:
    if old is None:
      del os.environ["LIBTPU_INIT_ARGS"]
    else:
      os.environ["LIBTPU_INIT_ARGS"] = old


GiB = 1024 ** 3


# --------------------------------------------------------------------- chips
@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of a TPU generation.

  Attributes:
    name: generation name used in topology strings ("v5e", ...).
    hbm_gib: HBM per chip (GiB).
    bf16_tflops: peak dense bf16 TFLOP/s per chip.
    hbm_gbps: HBM bandwidth per chip (GB/s).
    dims: number of dimensions of the topology string (2 or 3).
    source: where the figures are published.
  """
  name: str
  hbm_gib: float
  bf16_tflops: float
  hbm_gbps: float
  dims: int
  source: str


# Google Cloud TPU documentation, "TPU versions" pages (system architecture tables).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32, 275, 1200, 3, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16, 197, 819, 2, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95, 459, 2765, 3, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32, 918, 1640, 2, "https://cloud.google.com/tpu/docs/v6e"),
}
TOPOLOGY_EXAMPLES = ("v4:2x2x1", "v4:2x2x2", "v5e:2x2", "v5e:16x16", "v5p:4x4x4", "v5p:4x4x8",
                     "v6e:8x8")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice (or several) to compile for.

  Attributes:
    name: the topology string, e.g. "v5p:4x4x8".
    chip: its :class:`Chip`.
    num_slices: number of slices (multi-slice over DCN).
    chips: chips in all slices.
    devices: the (abstract TPU or CPU) devices, one per JAX device.
    backend: "tpu" (libtpu's compiler) or "cpu" (fake CPU devices: CPU memory figures).
  """
  name: str
  chip: Chip
  num_slices: int
  chips: int
  devices: tuple
  backend: str

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def devices_per_chip(self) -> int:
    return max(1, self.num_devices // self.chips)

  @property
  def hbm_bytes_per_device(self) -> float:
    return self.chip.hbm_gib * GiB / self.devices_per_chip

  @property
  def peak_flops_per_device(self) -> float:
    return self.chip.bf16_tflops * 1e12 / self.devices_per_chip

  @property
  def hbm_bw_per_device(self) -> float:
    return self.chip.hbm_gbps * 1e9 / self.devices_per_chip


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """``"v5p:4x4x8"`` -> (CHIPS["v5p"], (4, 4, 8)); one-line ValueError listing valid names."""
  valid = f"expected GEN:AxB (v5e, v6e) or GEN:AxBxC (v4, v5p) with GEN in {sorted(CHIPS)}, e.g. {list(TOPOLOGY_EXAMPLES)}"
  m = re.fullmatch(r"(v[0-9a-z]+):([0-9]+(?:x[0-9]+)*)", str(name).strip())
  if not m or m.group(1) not in CHIPS:
    raise ValueError(f"get_topology: unknown topology `name` {name!r}; {valid}.")
  chip = CHIPS[m.group(1)]
  dims = tuple(int(d) for d in m.group(2).split("x"))
  if len(dims) != chip.dims or any(d < 1 for d in dims):
    raise ValueError(f"get_topology: topology `name` {name!r} needs {chip.dims} positive dimensions for {chip.name}; {valid}.")
  return chip, dims


def libtpu_available() -> bool:
  """True when the ``libtpu`` package is importable (TPU AOT compilation possible)."""
  try:
    import importlib.util  # noqa: PLC0415
    return importlib.util.find_spec("libtpu") is not None
  except Exception:  # pragma: no cover
    return False


def get_topology(name: str, *, num_slices: int = 1, backend: str = "auto") -> Topology:
  """The devices of topology ``name`` (× ``num_slices``).

  backend: "tpu" (libtpu required), "cpu" (fake CPU devices; needs at least that many,
  see the module docstring), or "auto" (tpu if libtpu is installed, else cpu).
  """
  chip, dims = parse_topology(name)
  if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f"get_topology: `num_slices` must be a positive int, got {num_slices!r}.")
  if backend not in ("auto", "tpu", "cpu"):
    raise ValueError(f"get_topology: `backend` must be one of ['auto', 'cpu', 'tpu'], got {backend!r}.")
  chips = math.prod(dims) * num_slices
  if backend == "auto":
    backend = "tpu" if libtpu_available() else "cpu"
  if backend == "tpu":
    from jax.experimental import topologies  # noqa: PLC0415
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    with _libtpu_logs_to_stderr():
      desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    devices = tuple(desc.devices)
  else:
    # One fake CPU device per chip (v4/v5p megacore counted as one device).
    cpus = jax.devices("cpu")
    if len(cpus) < chips:
      raise ValueError(
          f"get_topology: CPU fallback for {name!r} x{num_slices} needs {chips} CPU devices, found "
          f"{len(cpus)}; install libtpu (pip install 'alignjax[tpu]') or set XLA_FLAGS="
          f"--xla_force_host_platform_device_count={chips} before importing jax.")
    devices = tuple(cpus[:chips])
  return Topology(name, chip, num_slices, chips, devices, backend)


# ---------------------------------------------------------------- experiment
REFERENCE_MODES = ("online", "precomputed", "free")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment:
  """What to plan: an algorithm, a model architecture (no weights) and batch shapes.

  Attributes:
    algorithm: a name of the algorithm registry (``alignjax.training.algorithms.names()``).
    model: a preset name of ``alignjax.models.presets.PRESET_NAMES`` or a ModelConfig.
    hf_config: path to an HF ``config.json`` (or its directory); overrides ``model``.
    batch_size: global batch of preference pairs per step.
    prompt_len, response_len: padded lengths; sequences are prompt_len + response_len.
    reference: DPO-family reference mode: "online" (frozen reference model in the step),
      "precomputed" (log-probs in the batch) or "free". TDPO needs "online" and
      AlignDistil always has its two frozen teachers; SFT none.
    dtype: compute dtype (the step's ``compute_dtype``).
    param_dtype: storage dtype of the trained (master) parameters.
    frozen_dtype: storage dtype of the frozen reference / teachers.
    remat: rematerialisation policy (``ModelConfig.remat``); None keeps the model's.
    grad_accum, chunk_size, max_grad_norm: as in ``make_train_step``.
    learning_rate: AdamW peak learning rate (shapes only; any positive value).
    scan_layers: blocks under ``nnx.scan`` (None: the model's own layout; presets are per-layer).
  """
  algorithm: str = "dpo"
  model: Any = "llama_tiny"
  hf_config: Optional[str] = None
  batch_size: int = 8
  prompt_len: int = 64
  response_len: int = 64
  reference: str = "online"
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  frozen_dtype: str = "bfloat16"
  remat: Optional[str] = None
  grad_accum: int = 1
  chunk_size: int = 128
  max_grad_norm: Optional[float] = 1.0
  learning_rate: float = 1e-6
  scan_layers: Optional[bool] = None

  def __post_init__(self):
    from alignjax.training import algorithms  # noqa: PLC0415
    if self.algorithm not in algorithms.names():
      raise ValueError(f"Experiment: unknown `algorithm` {self.algorithm!r}; expected one of {list(algorithms.names())}.")
    for f in ("batch_size", "prompt_len", "response_len", "grad_accum", "chunk_size"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"Experiment: `{f}` must be a positive int, got {v!r}.")
    if self.reference not in REFERENCE_MODES:
      raise ValueError(f"Experiment: `reference` must be one of {list(REFERENCE_MODES)}, got {self.reference!r}.")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"Experiment: `batch_size` {self.batch_size} must be divisible by `grad_accum` {self.grad_accum}.")

  @property
  def seq_len(self) -> int:
    return self.prompt_len + self.response_len

  @property
  def algorithm_spec(self):
    """The registry's :class:`alignjax.training.algorithms.Algorithm`."""
    from alignjax.training import algorithms  # noqa: PLC0415
    return algorithms.get(self.algorithm)

  @property
  def reference_mode(self) -> str:
    """What the algorithm needs decides: full distributions -> online; its own frozen models -> teachers."""
    needs = self.algorithm_spec.needs
    return {"reference_logits": "online", "teachers": "teachers", "none": "none"}.get(needs, self.reference)

  def model_config(self, remat: Optional[str] = None):
    """The ModelConfig (compute/param dtypes from the experiment, remat overridden)."""
    from alignjax.models import config_from_hf, presets  # noqa: PLC0415
    from alignjax.models.config import ModelConfig  # noqa: PLC0415
    if self.hf_config is not None:
      path = self.hf_config
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      if not os.path.isfile(path):
        raise ValueError(f"Experiment: `hf_config` {self.hf_config!r} is not a config.json file or a directory holding one.")
      with open(path) as f:
        cfg = config_from_hf(json.load(f))
    elif isinstance(self.model, ModelConfig):
      cfg = self.model
    elif isinstance(self.model, str):
      cfg = presets.get(self.model)
    else:
      raise TypeError(f"Experiment: `model` must be a preset name or a ModelConfig, got {type(self.model).__name__}.")
    remat = remat if remat is not None else self.remat
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if remat is not None:
      kw["remat"] = remat
    # scan_layers: compile time and HLO size independent of depth (a full 80-layer step compiles), but XLA's
    # cost analysis counts a while body once, so the planner's FLOPs then come from one layer.
    if self.scan_layers is not None:
      kw["scan_layers"] = self.scan_layers
    return dataclasses.replace(cfg, **kw)

  def key(self) -> dict:
    """A JSON-able description (for the cache key)."""
    d = dataclasses.asdict(self)
    if not isinstance(self.model, str):
      d["model"] = dataclasses.asdict(self.model_config())
    if self.hf_config is not None:
      d["hf_config"] = dataclasses.asdict(self.model_config())
    return d


# ------------------------------------------------------------------- results
@dataclasses.dataclass
class PlanResult:
  """Per-device compile figures of one (experiment, topology, mesh, remat).

  Bytes are per device. ``params_bytes``/``opt_bytes``/``frozen_bytes``/``batch_bytes`` come
  from the state's shardings; ``argument_bytes``/``output_bytes``/``alias_bytes``/
  ``temp_bytes``/``code_bytes`` from ``compiled.memory_analysis()``; ``peak_bytes`` =
  argument + output − alias + temp + code. FLOPs and bytes accessed per device come from
  ``compiled.cost_analysis()``.
  """
  topology: str
  num_slices: int
  backend: str
  device_kind: str
  num_devices: int
  mesh: tuple
  remat: str
  algorithm: str
  reference: str
  model_params: int
  tokens_per_step: int
  params_bytes: int = 0
  opt_bytes: int = 0
  frozen_bytes: int = 0
  batch_bytes: int = 0
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  peak_bytes: int = 0
  hbm_bytes: float = 0.0
  fits: bool = False
  flops: float = 0.0
  formula_flops: float = 0.0
  bytes_accessed: float = 0.0
  step_time_s: float = 0.0
  tokens_per_s: float = 0.0
  compile_s: float = 0.0
  compiled: bool = True
  note: str = ""

  @property
  def margin_bytes(self) -> float:
    """HBM minus peak (negative: the shortfall)."""
    return self.hbm_bytes - self.peak_bytes

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "PlanResult":
    d = dict(d)
    d["mesh"] = tuple(d["mesh"])
    return cls(**d)


# ---------------------------------------------------------------- building
def _nbytes_per_device(abstract_tree, shardings) -> int:
  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shape = s.shard_shape(tuple(x.shape)) if hasattr(s, "shard_shape") else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def check_mesh(mesh: Sequence[int], topology: Topology, experiment: Experiment) -> tuple[int, int, int]:
  """Validates a (data, fsdp, tensor) mesh for ``topology`` and ``experiment``; one-line errors."""
  try:
    mesh = tuple(int(m) for m in mesh)
  except (TypeError, ValueError):
    raise ValueError(f"plan: `mesh` must be three positive ints (data, fsdp, tensor), got {mesh!r}.") from None
  n = topology.num_devices
  if len(mesh) != 3 or any(m < 1 for m in mesh):
    raise ValueError(f"plan: `mesh` must be three positive ints (data, fsdp, tensor), got {mesh!r}.")
  if math.prod(mesh) != n:
    examples = [f"{d},{f},{t}" for d, f, t in mesh_factorisations(n)][:8]
    raise ValueError(f"plan: `mesh` {','.join(map(str, mesh))} has {math.prod(mesh)} devices but "
                     f"{topology.name} x{topology.num_slices} has {n}; valid meshes include {examples}.")
  shards = mesh[0] * mesh[1]
  if experiment.batch_size % (shards * experiment.grad_accum) and experiment.batch_size % shards:
    raise ValueError(f"plan: `batch_size` {experiment.batch_size} must be divisible by the data axes "
                     f"data*fsdp = {shards}; valid batch sizes are multiples of {shards}.")
  return mesh


def mesh_factorisations(n: int, *, max_tensor: Optional[int] = None, tensor_divides: Optional[int] = None):
  """All (data, fsdp, tensor) with data·fsdp·tensor = n (tensor limited as asked)."""
  out = []
  divs = [d for d in range(1, n + 1) if n % d == 0]
  for t in divs:
    if max_tensor is not None and t > max_tensor:
      continue
    if tensor_divides is not None and tensor_divides % t:
      continue
    for f in divs:
      if (n // t) % f:
        continue
      out.append((n // t // f, f, t))
  return out


def _abstract_batch(experiment: Experiment, reference_mode: str):
  """The algorithm's batch schema as abstract arrays (global batch)."""
  from alignjax.data import batch as batch_lib  # noqa: PLC0415
  algo = experiment.algorithm_spec
  schema = algo.batch_schema or batch_lib.PAIRED
  sides = schema.sides + ((batch_lib.KL_SIDE,) if algo.kl_rows else ())
  out = batch_lib.abstract_batch(schema, experiment.batch_size, experiment.seq_len, sides=sides,
                                 reference=reference_mode == "precomputed")
  for k in algo.token_keys:
    out[k] = jax.ShapeDtypeStruct((experiment.batch_size, experiment.seq_len), jnp.float32)
  return out


def make_optimizer(experiment: Experiment):
  """Training's optimizer (:func:`alignjax.training.loop.optimizer`): AdamW whose schedule values are state.

  The schedule's step counts, the learning rate and the weight decay are inputs of
  the step, so any values give the program training compiles.
  """
  from alignjax.training import config as config_lib, loop  # noqa: PLC0415
  phase = config_lib.PhaseConfig(steps=1000, learning_rate=experiment.learning_rate, warmup_steps=100)
  return loop.optimizer(phase, weight_decay=0.0)


@dataclasses.dataclass
class Built:
  """Everything :func:`build_step` made: the jitted training step and its abstract arguments."""
  step: Any
  args: tuple
  model_config: Any
  mesh: Any
  state_shardings: Any
  reference_mode: str
  frozen_names: tuple


_ABSTRACT_MODELS: dict = {}


class _ShapeRngs:
  """Stands in for ``nnx.Rngs`` under ``eval_shape``: one fixed key per draw.

  Only shapes are traced, so the values do not matter; ``nnx.Rngs`` would update its
  counter variable at every draw, which costs ~0.05 s per parameter when tracing a model
  with thousands of parameters.
  """

  def params(self):
    return jax.random.key(0)


def abstract_model(cfg):
  """``nnx.eval_shape`` of ``Transformer(cfg)`` (memoised per config; allocates nothing)."""
  from flax import nnx  # noqa: PLC0415
  from alignjax.models import Transformer  # noqa: PLC0415
  if cfg not in _ABSTRACT_MODELS:
    _ABSTRACT_MODELS[cfg] = nnx.eval_shape(lambda: Transformer(cfg, rngs=_ShapeRngs()))
  return _ABSTRACT_MODELS[cfg]


def _with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_step(experiment: Experiment, topology: Topology, mesh: Sequence[int], *,
               remat: Optional[str] = None, make_step: bool = True) -> Built:
  """The training step of ``alignjax.training.steps.make_train_step`` and abstract args.

  The policy (and frozen models) are built with ``nnx.eval_shape`` (no allocation); the
  train state is ``steps.abstract_state`` with ``steps.state_shardings`` attached.
  ``make_step=False`` builds only the abstract arguments (``Built.step`` is None).
  """
  from alignjax import sharding as sharding_lib  # noqa: PLC0415
  from alignjax.training import algorithms, reference as reference_lib, steps  # noqa: PLC0415

  mesh = check_mesh(mesh, topology, experiment)
  cfg = experiment.model_config(remat)
  dm = sharding_lib.make_mesh(*mesh, devices=list(topology.devices))
  model = abstract_model(cfg)
  if experiment.algorithm_spec.make_model is not None:   # the model the algorithm trains (e.g. a reward model)
    from flax import nnx  # noqa: PLC0415
    policy = model
    model = nnx.eval_shape(lambda: experiment.algorithm_spec.make_model(
        policy, _ShapeRngs(), algorithms.loss(experiment.algorithm).hparams))
  tx = make_optimizer(experiment)
  loss = algorithms.loss(experiment.algorithm)
  mode = experiment.reference_mode
  frozen_cfg = dataclasses.replace(cfg, param_dtype=experiment.frozen_dtype)
  if mode in ("online", "teachers"):
    names = ("reference",) if mode == "online" else experiment.algorithm_spec.frozen
    fmodel = abstract_model(frozen_cfg)
    if mode == "online":
      ref, frozen = reference_lib.online(fmodel)
    else:
      ref, frozen = reference_lib.teachers(**{n: fmodel for n in names})
    fsh = steps.state_shardings(fmodel, tx, dm).params
    ref = dataclasses.replace(ref, shardings={n: fsh for n in names})
    frozen = {n: _with_sharding(frozen[n], fsh) for n in names}
  else:
    names = ()
    ref, frozen = {"precomputed": reference_lib.precomputed, "free": reference_lib.free,
                   "none": reference_lib.none}[mode]()
  step = None
  if make_step:
    step = steps.make_train_step(model, tx, loss, ref, mesh=dm, grad_accum=experiment.grad_accum,
                                 max_grad_norm=experiment.max_grad_norm,
                                 compute_dtype=jnp.dtype(experiment.dtype), chunk_size=experiment.chunk_size)
  sh = steps.state_shardings(model, tx, dm)
  state = _with_sharding(steps.abstract_state(model, tx), sh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.batch_sharding(dm, len(v.shape)))
           for k, v in _abstract_batch(experiment, mode).items()}
  return Built(step, (state, batch, frozen), cfg, dm, sh, mode, names)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def formula_flops(experiment: Experiment, num_params: int, num_frozen: int) -> float:
  """(6 + 2·frozen)·N·T: forward+backward of the policy, a forward per frozen model.

  T counts the tokens of every row the algorithm scores (chosen and rejected:
  2·B·(prompt+response)); attention FLOPs and rematerialised forwards are not in
  the formula (Kaplan et al. 2020, arXiv:2001.08361).
  """
  T = experiment.batch_size * experiment.algorithm_spec.tokens_per_example(experiment.seq_len)
  return (6 + 2 * num_frozen) * num_params * T


def plan(experiment: Experiment, topology: Topology, mesh: Sequence[int], *,
         remat: Optional[str] = None, compile: bool = True) -> PlanResult:  # noqa: A002
  """Compiles the training step for ``topology`` on ``mesh`` and reports per-device figures.

  ``compile=False`` skips the compile: ``peak_bytes`` is then the lower bound params +
  optimizer + frozen models + batch (from the shardings), enough to prove a shortfall.
  """
  built = build_step(experiment, topology, mesh, remat=remat, make_step=compile)
  state, batch, frozen = built.args
  cfg = built.model_config
  t0 = time.perf_counter()
  compiled = built.step.lower(*built.args).compile() if compile else None
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis() if compiled is not None else None
  cost = _cost(compiled) if compiled is not None else {}
  res = PlanResult(
      topology=topology.name, num_slices=topology.num_slices, backend=topology.backend,
      device_kind=str(getattr(topology.devices[0], "device_kind", "")), num_devices=topology.num_devices,
      mesh=tuple(int(m) for m in mesh), remat=cfg.remat, algorithm=experiment.algorithm,
      reference=built.reference_mode, model_params=int(cfg.num_params),
      tokens_per_step=experiment.batch_size * experiment.algorithm_spec.tokens_per_example(experiment.seq_len))
  res.params_bytes = _nbytes_per_device(state.params, built.state_shardings.params)
  res.opt_bytes = _nbytes_per_device(state.opt_state, built.state_shardings.opt_state)
  res.frozen_bytes = sum(_nbytes_per_device(frozen[n], jax.tree.map(lambda x: x.sharding, frozen[n]))
                         for n in built.frozen_names)
  res.batch_bytes = sum(_nbytes_per_device(v, v.sharding) for v in batch.values())
  if mem is not None:
    res.argument_bytes = int(mem.argument_size_in_bytes)
    res.output_bytes = int(mem.output_size_in_bytes)
    res.alias_bytes = int(mem.alias_size_in_bytes)
    res.temp_bytes = int(mem.temp_size_in_bytes)
    res.code_bytes = int(mem.generated_code_size_in_bytes)
    res.peak_bytes = res.argument_bytes + res.output_bytes - res.alias_bytes + res.temp_bytes + res.code_bytes
  else:
    res.compiled = False
    res.peak_bytes = res.params_bytes + res.opt_bytes + res.frozen_bytes + res.batch_bytes
  res.hbm_bytes = topology.hbm_bytes_per_device
  res.fits = res.peak_bytes <= res.hbm_bytes
  res.flops = float(cost.get("flops", 0.0))
  res.bytes_accessed = float(cost.get("bytes accessed", 0.0))
  res.formula_flops = formula_flops(experiment, cfg.num_params, len(built.frozen_names))
  if compiled is None:
    res.flops = res.formula_flops / topology.num_devices
    res.note = "not compiled: peak is the lower bound params+optimizer+frozen+batch; FLOPs from the formula"
  res.step_time_s = max(res.flops / topology.peak_flops_per_device,
                        res.bytes_accessed / topology.hbm_bw_per_device)
  res.tokens_per_s = res.tokens_per_step / res.step_time_s if res.step_time_s > 0 else 0.0
  res.compile_s = compile_s
  if topology.backend == "cpu":
    res.note = (res.note + "; " if res.note else "") + "CPU fallback: memory figures are the CPU compiler's, not the TPU's"
  return res


def plan_sampler(experiment: Experiment, topology: Topology, mesh: Sequence[int], *,
                 batch_size: Optional[int] = None, greedy: bool = False) -> PlanResult:
  """Compiles the sampler's program (``alignjax.decoding.sampler``) for ``topology``.

  The same jitted program ``decoding.generate`` runs: prefill of ``prompt_len`` tokens, then
  ``response_len`` decode steps in a ``while_loop`` with the static KV cache, for the policy
  in ``frozen_dtype`` (weights as served for sampling). ``batch_size`` defaults to the
  experiment's. FLOPs/formula use 2·N per generated or prefilled token.
  """
  from flax import nnx  # noqa: PLC0415
  from alignjax import sharding as sharding_lib  # noqa: PLC0415
  from alignjax.decoding import sampler  # noqa: PLC0415

  B = experiment.batch_size if batch_size is None else batch_size
  exp = dataclasses.replace(experiment, batch_size=B)
  mesh = check_mesh(mesh, topology, exp)
  cfg = dataclasses.replace(exp.model_config(), param_dtype=exp.frozen_dtype)
  dm = sharding_lib.make_mesh(*mesh, devices=list(topology.devices))
  graphdef, state = nnx.split(abstract_model(cfg))
  sh = sharding_lib.state_shardings(state, dm)
  leaves, treedef = jax.tree.flatten(state)
  sh = jax.tree.leaves(sh)
  state = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                       for x, s in zip(leaves, sh)])
  bsh1, bsh2 = sharding_lib.batch_sharding(dm, 1), sharding_lib.batch_sharding(dm, 2)
  P, N = exp.prompt_len, exp.response_len
  args = ((state,), jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=bsh2),
          jax.ShapeDtypeStruct((B, P), jnp.bool_, sharding=bsh2),
          jax.ShapeDtypeStruct((B,), jnp.float32, sharding=bsh1), jax.ShapeDtypeStruct((B,), jnp.int32, sharding=bsh1),
          jax.ShapeDtypeStruct((B,), jnp.float32, sharding=bsh1), jax.ShapeDtypeStruct((1,), jnp.int32),
          jax.ShapeDtypeStruct((), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)), None, None, None)
  t0 = time.perf_counter()
  compiled = sampler._program.lower((graphdef,), *args, max_new_tokens=N, cache_len=P + N, greedy=greedy,
                                    return_model_logprobs=False, mesh=dm).compile()
  compile_s = time.perf_counter() - t0
  mem, cost = compiled.memory_analysis(), _cost(compiled)
  res = PlanResult(topology=topology.name, num_slices=topology.num_slices, backend=topology.backend,
                   device_kind=str(getattr(topology.devices[0], "device_kind", "")),
                   num_devices=topology.num_devices, mesh=tuple(mesh), remat="none", algorithm="sample",
                   reference="none", model_params=int(cfg.num_params), tokens_per_step=B * N)
  res.params_bytes = _nbytes_per_device(jax.tree.leaves(state), sh)
  res.argument_bytes, res.output_bytes = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  res.alias_bytes, res.temp_bytes = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  res.code_bytes = int(mem.generated_code_size_in_bytes)
  res.peak_bytes = res.argument_bytes + res.output_bytes - res.alias_bytes + res.temp_bytes + res.code_bytes
  res.hbm_bytes = topology.hbm_bytes_per_device
  res.fits = res.peak_bytes <= res.hbm_bytes
  # A while_loop's body is counted once by cost_analysis: the figures are prefill + one
  # decode step, i.e. the cost of "one decode step" plus the prompt.
  res.flops = float(cost.get("flops", 0.0))
  res.bytes_accessed = float(cost.get("bytes accessed", 0.0))
  res.formula_flops = 2.0 * cfg.num_params * B * (P + 1)
  # Roofline of the whole generation: prefill compute + N weight-streaming decode steps.
  decode_bytes = res.params_bytes
  res.step_time_s = (res.flops / topology.peak_flops_per_device
                     + N * decode_bytes / topology.hbm_bw_per_device)
  res.tokens_per_s = res.tokens_per_step / res.step_time_s if res.step_time_s > 0 else 0.0
  res.compile_s = compile_s
  res.note = "sampler program: cost_analysis counts the while_loop body once (prefill + one decode step)"
  if topology.backend == "cpu":
    res.note += "; CPU fallback: memory figures are the CPU compiler's, not the TPU's"
  return res


# ------------------------------------------------------------------- search
def _versions() -> dict:
  v = {"jax": jax.__version__}
  try:
    from importlib import metadata  # noqa: PLC0415
    v["libtpu"] = metadata.version("libtpu")
  except Exception:
    v["libtpu"] = None
  return v


def config_hash(experiment: Experiment, topology: Topology, mesh, remat: str) -> str:
  """SHA-256 (hex, 24 chars) of everything a compile result depends on."""
  key = {"experiment": experiment.key(), "topology": topology.name, "num_slices": topology.num_slices,
         "backend": topology.backend, "num_devices": topology.num_devices, "mesh": list(mesh),
         "remat": remat, "versions": _versions(), "format": 1}
  try:
    from alignjax.training import steps  # noqa: PLC0415
    src = open(steps.__file__, "rb").read()
    key["steps_sha"] = hashlib.sha256(src).hexdigest()
  except OSError:  # pragma: no cover
    pass
  return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def default_cache_dir() -> str:
  return os.environ.get("ALIGNJAX_AOT_CACHE", alignjax.cache_dir("aot"))


def static_bytes(experiment: Experiment, topology: Topology, mesh, remat: Optional[str] = None) -> int:
  """Per-device bytes of params + optimizer + frozen models (no compile): a lower bound."""
  built = build_step(experiment, topology, mesh, remat=remat, make_step=False)
  state, _, frozen = built.args
  total = _nbytes_per_device(state.params, built.state_shardings.params)
  total += _nbytes_per_device(state.opt_state, built.state_shardings.opt_state)
  for n in built.frozen_names:
    total += _nbytes_per_device(frozen[n], jax.tree.map(lambda x: x.sharding, frozen[n]))
  return total


# Least recomputation first: for one mesh, a policy later in this list recomputes more.
REMAT_ORDER = ("none", "save_attention_out", "dots", "dots_no_batch", "full")


def search(experiment: Experiment, topology: Topology, *, remats: Optional[Sequence[str]] = None,
           meshes: Optional[Sequence[Sequence[int]]] = None, cache_dir: Optional[str] = None,
           use_cache: bool = True, progress=None, include_unfit: bool = False,
           exhaustive: bool = False) -> list[PlanResult]:
  """Compiles every valid (data, fsdp, tensor) × remat and ranks those that fit by step time.

  Meshes: all factorisations of the device count with tensor dividing the number of heads
  and data·fsdp dividing the batch. Remat policies: ``ModelConfig``'s ``REMAT_POLICIES``.
  A configuration whose parameters + optimizer + frozen models alone exceed HBM is skipped
  without compiling. Per mesh, policies are tried from the least recomputation
  (:data:`REMAT_ORDER`) and, unless ``exhaustive``, the first that fits ends that mesh (the
  others recompute more, so they are not faster). Results are cached on disk by :func:`config_hash` (``cache_dir``,
  default ``$ALIGNJAX_AOT_CACHE`` or ``~/.cache/alignjax/aot``), so a re-run is instant.
  """
  from alignjax.models.config import REMAT_POLICIES  # noqa: PLC0415
  cfg = experiment.model_config()
  remats = tuple(REMAT_POLICIES if remats is None else remats)
  remats = tuple(sorted(remats, key=lambda r: REMAT_ORDER.index(r) if r in REMAT_ORDER else len(REMAT_ORDER)))
  for r in remats:
    if r not in REMAT_POLICIES:
      raise ValueError(f"search: unknown remat policy {r!r}; expected one of {list(REMAT_POLICIES)}.")
  if meshes is None:
    meshes = [m for m in mesh_factorisations(topology.num_devices, tensor_divides=cfg.num_heads)
              if experiment.batch_size % (m[0] * m[1]) == 0]
  if not meshes:
    raise ValueError(f"search: no mesh of {topology.num_devices} devices has data*fsdp dividing "
                     f"`batch_size` {experiment.batch_size}; use a multiple of {topology.num_devices // math.gcd(topology.num_devices, cfg.num_heads)}.")
  cache_dir = cache_dir or default_cache_dir()
  os.makedirs(cache_dir, exist_ok=True)
  results = []
  for mesh in meshes:
    lower = None
    for remat in remats:
      path = os.path.join(cache_dir, config_hash(experiment, topology, mesh, remat) + ".json")
      if use_cache and os.path.exists(path):
        with open(path) as f:
          res = PlanResult.from_json(json.load(f))
        # The verdict follows this topology's HBM (the compile figures do not depend on it).
        res.hbm_bytes = topology.hbm_bytes_per_device
        res.fits = res.peak_bytes <= res.hbm_bytes
      else:
        if lower is None:
          lower = static_bytes(experiment, topology, mesh)
        if lower > topology.hbm_bytes_per_device:
          cfg_r = experiment.model_config(remat)
          res = PlanResult(topology=topology.name, num_slices=topology.num_slices, backend=topology.backend,
                           device_kind=str(getattr(topology.devices[0], "device_kind", "")),
                           num_devices=topology.num_devices, mesh=tuple(mesh), remat=remat,
                           algorithm=experiment.algorithm, reference=experiment.reference_mode,
                           model_params=int(cfg_r.num_params), tokens_per_step=0, peak_bytes=lower,
                           hbm_bytes=topology.hbm_bytes_per_device, fits=False, compiled=False,
                           note="skipped: params+optimizer+frozen alone exceed HBM")
        else:
          res = plan(experiment, topology, mesh, remat=remat)
        with open(path, "w") as f:
          json.dump(res.to_json(), f)
      if progress is not None:
        progress(res)
      results.append(res)
      if res.fits and not exhaustive:
        break
  fitting = sorted((r for r in results if r.fits), key=lambda r: (r.step_time_s, r.peak_bytes))
  if include_unfit:
    return fitting + [r for r in results if not r.fits]
  return fitting


# ------------------------------------------------------------------- output
def _gib(b: float) -> str:
  return f"{b / GiB:7.2f}"


def format_table(results: Sequence[PlanResult]) -> str:
  """A text table (per-device GiB, FLOPs, roofline time) of ``results``, in order."""
  head = (f"{'#':>2} {'mesh d,f,t':>11} {'remat':>14} {'params':>7} {'optim':>7} {'frozen':>7} "
          f"{'temp':>7} {'peak':>7} {'HBM':>7} {'margin':>8} {'fits':>4} {'TFLOP/dev':>9} "
          f"{'compiled/formula':>16} {'step s':>8} {'tok/s':>10}")
  lines = [head, "-" * len(head)]
  for i, r in enumerate(results, 1):
    total_flops = r.flops * r.num_devices
    ratio = total_flops / r.formula_flops if r.formula_flops else float("nan")
    lines.append(
        f"{i:>2} {','.join(map(str, r.mesh)):>11} {r.remat:>14} {_gib(r.params_bytes)} {_gib(r.opt_bytes)} "
        f"{_gib(r.frozen_bytes)} {_gib(r.temp_bytes)} {_gib(r.peak_bytes)} {_gib(r.hbm_bytes)} "
        f"{r.margin_bytes / GiB:8.2f} {'yes' if r.fits else 'NO':>4} {r.flops / 1e12:9.2f} "
        f"{ratio:16.2f} {r.step_time_s:8.3f} {r.tokens_per_s:10.0f}")
  return "\n".join(lines)


def describe(r: PlanResult) -> str:
  """A multi-line report of one plan (per device)."""
  total = r.flops * r.num_devices
  lines = [
      f"{r.algorithm} (reference: {r.reference}) on {r.topology} x{r.num_slices} [{r.backend}: {r.num_devices} x {r.device_kind}], "
      f"mesh data,fsdp,tensor = {','.join(map(str, r.mesh))}, remat {r.remat}, {r.model_params / 1e9:.2f}B params",
      f"per device: params {r.params_bytes / GiB:.2f} GiB, optimizer {r.opt_bytes / GiB:.2f} GiB, "
      f"frozen {r.frozen_bytes / GiB:.2f} GiB, batch {r.batch_bytes / GiB:.4f} GiB",
      f"memory_analysis{'' if r.compiled else ' (not compiled)'}: arguments {r.argument_bytes / GiB:.2f} GiB, outputs {r.output_bytes / GiB:.2f} GiB "
      f"(aliased {r.alias_bytes / GiB:.2f}), temp {r.temp_bytes / GiB:.2f} GiB, code {r.code_bytes / GiB:.3f} GiB",
      f"{'peak' if r.compiled else 'lower bound (not compiled)'} {r.peak_bytes / GiB:.2f} GiB of {r.hbm_bytes / GiB:.2f} GiB HBM: "
      + (f"FITS, margin {r.margin_bytes / GiB:.2f} GiB" if r.fits else f"DOES NOT FIT, short by {-r.margin_bytes / GiB:.2f} GiB"),
      f"FLOPs/step: {'compiled' if r.compiled else 'estimated'} {total:.3e} ({r.flops:.3e}/device) vs formula "
      f"{'2·N·B·(prompt+1)' if r.algorithm == 'sample' else '(6+2·frozen)·N·T'} {r.formula_flops:.3e} "
      f"(ratio {total / r.formula_flops if r.formula_flops else float('nan'):.2f})",
      f"roofline step {r.step_time_s * 1e3:.1f} ms -> {r.tokens_per_s:,.0f} tokens/s "
      f"(compile {r.compile_s:.1f} s)",
  ]
  if r.note:
    lines.append(f"note: {r.note}")
  return "\n".join(lines)


def chip_table() -> str:
  """The cited chip figures."""
  rows = [f"{'chip':>4} {'HBM GiB':>8} {'bf16 TFLOP/s':>12} {'HBM GB/s':>9}  source"]
  for c in CHIPS.values():
    rows.append(f"{c.name:>4} {c.hbm_gib:>8} {c.bf16_tflops:>12} {c.hbm_gbps:>9}  {c.source}")
  return "\n".join(rows)


def local_topology(num_devices: Optional[int] = None) -> Topology:
  """This process's own devices as a :class:`Topology` (memory figures for a run on this machine)."""
  devices = tuple(jax.devices()[:num_devices] if num_devices else jax.devices())
  return Topology(f"local:{len(devices)}", CHIPS["v5e"], 1, len(devices), devices, jax.default_backend())


def run_fields(experiment: Experiment, mesh: Sequence[int], remat: Optional[str] = None) -> dict[str, Any]:
  """The ``launch/train.py`` config fields (dotted) that run ``experiment`` as planned on ``mesh``.

  The model preset, remat policy and layer scan, mesh, precision, global batch,
  accumulation, chunking, reference mode and sequence length: the plan, as a run.
  Data, steps and learning rates stay the training config's.
  """
  if not isinstance(experiment.model, str):
    raise ValueError("run_fields: the experiment's `model` must be a preset name to be written as a run config.")
  cfg = experiment.model_config(remat)
  data, fsdp, tensor = (int(x) for x in mesh)
  fields = {
      "loss.name": experiment.algorithm, "model.preset": experiment.model, "model.remat": cfg.remat,
      "model.scan_layers": bool(cfg.scan_layers), "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
      "precision.compute_dtype": experiment.dtype, "precision.param_dtype": experiment.param_dtype,
      "precision.frozen_dtype": experiment.frozen_dtype, "batch_size": experiment.batch_size,
      "grad_accum": experiment.grad_accum, "chunk_size": experiment.chunk_size,
      "data.seq_len": experiment.seq_len, "max_grad_norm": float(experiment.max_grad_norm or 1e9),
  }
  if experiment.algorithm_spec.needs == "reference_logps":
    fields["reference.mode"] = experiment.reference
  return fields


def write_run_config(path: str, fields: Mapping[str, Any], *, note: str = "") -> str:
  """Writes a ``launch/train.py --config=PATH`` file whose ``get_config()`` is the defaults plus ``fields``.

  The fields are validated now (a plan that its launcher cannot run is refused here);
  any of them can still be overridden on the command line (``--config.model.preset=
  llama_tiny --config.mesh.fsdp=4`` runs the same plan shrunk on fake CPU devices).
  """
  from alignjax.training import config as config_lib  # noqa: PLC0415
  config_lib.build(None, **fields)
  body = ",\n".join(f"    {k!r}: {v!r}" for k, v in fields.items())
  text = (f'"""Run config written by launch/plan.py --emit_config.\n\n{note}\n"""\n\n'
          "from alignjax.training import config as config_lib\n\n"
          f"PLANNED = {{\n{body},\n}}\n\n\n"
          "def get_config():\n"
          "  return config_lib.to_config_dict(config_lib.build(None, **PLANNED))\n")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def report(experiment: Experiment, topology: Topology, mesh: Optional[str] = None, *, search_meshes: bool = False,
           remat: Optional[str] = None, compile: bool = True, sampler: bool = False,  # pylint: disable=redefined-builtin
           cache_dir: Optional[str] = None, top: int = 10, emit=print, emit_config: Optional[str] = None) -> None:
  """``launch/plan.py``'s report, one line at a time to ``emit``: a plan on ``mesh``, or a search.

  ``mesh`` is ``"data,fsdp,tensor"`` (default: every device on fsdp; with
  ``search_meshes``, the search's only mesh). A header (model, batch, chips), then
  :func:`format_table` and :func:`describe` of the plan (and :func:`plan_sampler`'s
  with ``sampler``) or of the fitting search results, fastest first
  (:func:`search`), then :func:`chip_table`. Raises ValueError/TypeError on bad input.
  """
  cfg = experiment.model_config()
  shape = None
  if mesh:
    parts = mesh.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
      raise ValueError(f"plan: --mesh must be data,fsdp,tensor (three positive ints), got {mesh!r}.")
    shape = check_mesh([int(p) for p in parts], topology, experiment)
  e, t = experiment, topology
  emit(f"{e.algorithm} | {cfg.family} {cfg.num_params / 1e9:.2f}B params | batch {e.batch_size} x "
       f"({e.prompt_len}+{e.response_len}) | {t.name} x{t.num_slices}: {t.num_devices} {t.backend} devices "
       f"({t.chip.name}: {t.chip.hbm_gib} GiB HBM, {t.chip.bf16_tflops} bf16 TFLOP/s, {t.chip.hbm_gbps} GB/s per chip)")
  if t.backend == "cpu":
    emit("NOTE: libtpu is not installed: compiled for fake CPU devices; memory figures are CPU figures.")
  if search_meshes:
    def progress(r):
      status = "fits" if r.fits else ("skipped" if not r.compiled else "does not fit")
      emit(f"  mesh {','.join(map(str, r.mesh)):>9} remat {r.remat:<18} peak {r.peak_bytes / GiB:8.2f} GiB  {status}")
    results = search(e, t, remats=None if remat is None else [remat], meshes=None if shape is None else [shape],
                     cache_dir=cache_dir, progress=progress)
    if not results:
      emit("No configuration fits: add chips, shorten sequences, or shrink the batch.")
      return
    emit(format_table(results[:top]) + "\n")
    emit(describe(results[0]))
    chosen = results[0]
  else:
    shape = shape or (1, t.num_devices, 1)
    result = plan(e, t, shape, compile=compile)
    emit(format_table([result]) + "\n")
    emit(describe(result))
    chosen = result
    if sampler:
      emit("\n" + describe(plan_sampler(e, t, shape)))
  emit("\n" + chip_table())
  if emit_config:
    note = (f"{e.algorithm} on {t.name} x{t.num_slices}, mesh data,fsdp,tensor = {','.join(map(str, chosen.mesh))}, "
            f"remat {chosen.remat}: planned per-device peak {chosen.peak_bytes / GiB:.2f} GiB.")
    path = write_run_config(emit_config, run_fields(e, chosen.mesh, chosen.remat), note=note)
    emit(f"wrote {path}: python -m launch.train --config={path}")


__all__ = ["CHIPS", "Chip", "Experiment", "PlanResult", "Topology", "build_step", "check_mesh",
           "chip_table", "config_hash", "describe", "format_table", "formula_flops", "get_topology",
           "libtpu_available", "local_topology", "mesh_factorisations", "parse_topology", "plan", "plan_sampler", "report", "run_fields",
           "search", "static_bytes", "write_run_config"]
