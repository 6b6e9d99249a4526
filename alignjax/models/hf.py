"""Load and save Hugging Face checkpoints (config.json + safetensors) as `Transformer`s.

`from_hf` streams the checkpoint tensor by tensor (memory-mapped safetensors; one HF tensor
in host memory at a time) into the parameters, placing each directly onto its NamedSharding
when a mesh is given (each process only materialises the shards its devices hold).
`to_hf` writes a directory `transformers.AutoModelForCausalLM.from_pretrained` loads unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from alignjax import sharding as sharding_lib
from alignjax.models import families
from alignjax.models.config import ModelConfig, dtype_name
from alignjax.models import reward as reward_lib
from alignjax.models.reward import RewardModel
from alignjax.models.transformer import Block, Transformer

_ST_TO_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}
_NP_TO_ST = {np.dtype(v).name: k for k, v in _ST_TO_NP.items()}
_FLOAT_ST = ("F64", "F32", "F16", "BF16")
# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(\.attn\.(bias|masked_bias)$)|(rotary_emb\.inv_freq$)")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
# What `to_hf(..., tokenizer_dir=)` copies: the tokenizer, its chat template, the generation config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "generation_config.json")

config_from_hf = families.config_from_hf
config_to_hf = families.config_to_hf


# ---------------------------------------------------------------------------- safetensors
class _SafetensorsFile:
  """Memory-mapped safetensors file: header parsed once, tensors viewed lazily."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    self.header = header
    self.data_offset = 8 + n

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in _ST_TO_NP:
      raise ValueError(f"from_hf: tensor {name!r} in {self.path} has unsupported dtype {info['dtype']}.")
    start, end = info["data_offsets"]
    dt = np.dtype(_ST_TO_NP[info["dtype"]])
    count = (end - start) // dt.itemsize
    mm = np.memmap(self.path, dtype=dt, mode="r", offset=self.data_offset + start, shape=(count,))
    return mm.reshape(info["shape"])


class _Checkpoint:
  """All tensors of a save_pretrained directory (single file or sharded with an index)."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {fn: _SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
      self.where = {name: files[fn] for name, fn in weight_map.items()}
    elif os.path.exists(single):
      f = _SafetensorsFile(single)
      self.where = {name: f for name in f.header}
    else:
      found = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
      if not found:
        raise ValueError(f"from_hf: no model.safetensors (or index) in `path` {path!r}.")
      self.where = {}
      for fn in found:
        f = _SafetensorsFile(os.path.join(path, fn))
        self.where.update({name: f for name in f.header})

  def resolve(self, name: str) -> str | None:
    if name in self.where:
      return name
    for prefix in ("model.", "transformer."):  # e.g. original GPT-2 files lack "transformer."
      if name.startswith(prefix) and name[len(prefix):] in self.where:
        return name[len(prefix):]
    return None

  def info(self, name: str) -> dict:
    return self.where[name].header[name]

  def get(self, name: str) -> np.ndarray:
    return self.where[name].get(name)


def _write_safetensors(path: str, entries: list[tuple[str, str, tuple, Any]], *, metadata=None):
  """Stream tensors to a safetensors file; entries: (name, st_dtype, shape, producer())."""
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, st, shape, _ in entries:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_TO_NP[st]).itemsize
    header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name, st, shape, produce in entries:
      arr = np.ascontiguousarray(produce(), dtype=_ST_TO_NP[st])
      if arr.shape != tuple(shape):
        raise ValueError(f"to_hf: tensor {name!r} has shape {arr.shape}, expected {tuple(shape)}.")
      f.write(arr.tobytes())


# ---------------------------------------------------------------------------- helpers
def _lookup(model: nnx.Module, path: tuple):
  obj = model
  for key in path:
    obj = obj[key] if isinstance(key, int) else getattr(obj, key)
  return obj


def _value(var):
  return var.get_value() if hasattr(var, "get_value") else var.value


def _slot(model: nnx.Module, path: tuple):
  """(Variable, layer) of a per-layer parameter path such as ("layers", 3, "attn", "q").

  In a ``scan_layers`` model the layers are one stacked Block: the path's layer index is
  then a row of the stacked Variable (returned as `layer`); otherwise `layer` is None.
  """
  obj, layer = model, None
  for key in path:
    if isinstance(key, int):
      if isinstance(obj, Block):
        layer = key
      else:
        obj = obj[key]
    else:
      obj = getattr(obj, key)
  return obj, layer


def _slot_value(model: nnx.Module, path: tuple):
  var, layer = _slot(model, path)
  value = _value(var)
  return value if layer is None else value[layer]


class _StackedLoad:
  """Fills a stacked [L, ...] parameter layer by layer from per-layer host tensors.

  Without a mesh the rows go into one host buffer; with a mesh each distinct shard of
  this process's devices gets its own buffer, so host memory holds at most this process's
  shards of one stacked parameter. The Variable is set once all L rows have arrived.
  """

  def __init__(self, var, mesh):
    self.var = var
    self.mesh = mesh
    value = _value(var)
    self.shape = tuple(value.shape)
    self.dtype = np.dtype(value.dtype)
    self.seen: set[int] = set()
    if mesh is None:
      self.buffers = {None: np.empty(self.shape, self.dtype)}
      self.devices = None
    else:
      self.sharding = sharding_lib.variable_sharding(var, mesh)
      index_map = self.sharding.addressable_devices_indices_map(self.shape)
      self.devices = {d: self._key(idx) for d, idx in index_map.items()}
      self.buffers = {}
      for key in self.devices.values():
        if key not in self.buffers:
          self.buffers[key] = np.empty([len(range(*sl)) for sl in key], self.dtype)

  def _key(self, idx):
    return tuple(s.indices(n) for s, n in zip(idx, self.shape))

  def put(self, layer: int, host: np.ndarray):
    for key, buf in self.buffers.items():
      if key is None:
        buf[layer] = host
        continue
      rows = range(*key[0])
      if layer in rows:
        buf[rows.index(layer)] = host[tuple(slice(*sl) for sl in key[1:])]
    self.seen.add(layer)
    if len(self.seen) == self.shape[0]:
      self.var.set_value(self._finish())
      self.buffers = {}

  def _finish(self):
    if self.mesh is None:
      return jnp.asarray(self.buffers[None])
    arrays = [jax.device_put(self.buffers[key], d) for d, key in self.devices.items()]
    return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


def _host(x) -> np.ndarray:
  """A parameter as a host numpy array (gathered across processes if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def read_hf_config(path: str) -> dict:
  """The `config.json` dict of a save_pretrained directory."""
  if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
    raise ValueError(f"from_hf: `path` must be a local directory, got {path!r}.")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"from_hf: no config.json in `path` {path!r}.")
  with open(cfg_path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------- public API
def from_hf(path, *, dtype=jnp.float32, param_dtype=None, mesh=None,
            **config_overrides) -> Transformer | RewardModel:
  """Load a local Hugging Face `save_pretrained` directory as a `Transformer`.

  A `*ForSequenceClassification` checkpoint with one label loads as a `RewardModel`
  (scores [B] at each row's last real token; see `alignjax.models.reward`).

  Args:
    path: directory with config.json and model.safetensors (or sharded files + index),
      in the transformers 4.x or 5.x config spelling.
    dtype: computation dtype (jnp dtype or name).
    param_dtype: storage dtype of the parameters (default: `dtype`).
    mesh: optional ("data", "fsdp", "tensor") Mesh; each tensor goes straight to its
      NamedSharding (from the logical-axis rule table), each process building only the
      shards of its own devices.
    **config_overrides: ModelConfig fields to override (e.g. remat="full").

  Tensors are read one at a time from memory-mapped files, so host memory holds at most
  one HF tensor (plus its converted copy) beyond the parameters already placed.
  """
  path = os.fspath(path) if isinstance(path, os.PathLike) else path
  d = read_hf_config(path)
  dt = dtype_name(dtype, where="from_hf: `dtype`")
  pdt = dt if param_dtype is None else dtype_name(param_dtype, where="from_hf: `param_dtype`")
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"from_hf: `mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
  cfg = config_from_hf(d, dtype=dt, param_dtype=pdt, **config_overrides)
  reward = reward_lib.is_sequence_classification(d)
  specs = reward_lib.tensor_specs(cfg) if reward else families.tensor_specs(cfg)
  ckpt = _Checkpoint(path)

  names = {}
  missing = []
  for spec in specs:
    found = ckpt.resolve(spec.name)
    if found is None:
      missing.append(spec.name)
    names[spec.name] = found
  if missing:
    raise ValueError(f"from_hf: checkpoint {path!r} is missing {len(missing)} tensor(s), e.g. "
                     f"{missing[:3]}.")
  used = set(names.values())
  unexpected = [n for n in ckpt.where if n not in used and not _IGNORED.search(n)
                and not (cfg.tie_embeddings and n.endswith("lm_head.weight"))]
  if unexpected:
    raise ValueError(f"from_hf: checkpoint {path!r} has {len(unexpected)} tensor(s) this "
                     f"{cfg.family} config does not use, e.g. {unexpected[:3]}.")

  model = nnx.eval_shape(lambda: (RewardModel if reward else Transformer)(cfg, rngs=nnx.Rngs(0)))
  np_pdt = np.dtype(jnp.dtype(pdt))
  stacks: dict[int, _StackedLoad] = {}
  for spec in specs:
    name = names[spec.name]
    info = ckpt.info(name)
    if tuple(info["shape"]) != tuple(spec.hf_shape):
      raise ValueError(f"from_hf: tensor {name!r} has shape {tuple(info['shape'])}, expected "
                       f"{tuple(spec.hf_shape)} from config.json.")
    if info["dtype"] not in _FLOAT_ST:
      raise ValueError(f"from_hf: tensor {name!r} has dtype {info['dtype']}, expected a float.")
    parts = spec.to_params(ckpt.get(name))
    for ppath, part in zip(spec.paths, parts):
      var, layer = _slot(model, ppath)
      shape = tuple(_value(var).shape)
      host = np.asarray(part).astype(np_pdt)
      if host.shape != (shape if layer is None else shape[1:]):  # the adapter's consistency
        raise ValueError(f"from_hf: {name!r} -> {ppath} has shape {host.shape}, expected {shape}.")
      if layer is not None:  # scan_layers: one row of a stacked parameter
        stacks.setdefault(id(var), _StackedLoad(var, mesh)).put(layer, host)
        del host
        continue
      if mesh is None:
        value = jnp.asarray(host)
      else:
        sharding = sharding_lib.variable_sharding(var, mesh)
        value = jax.make_array_from_callback(shape, sharding, lambda idx, h=host: h[idx])
      var.set_value(value)
      del host
  for path_, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and isinstance(_value(var), jax.ShapeDtypeStruct):
      raise ValueError(f"from_hf: parameter {path_} was not loaded (adapter bug for {cfg.family}).")
  return model


def to_hf(model: Transformer, out_dir, *, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
          tokenizer_dir=None) -> str:
  """Write `model` as a Hugging Face directory: config.json + safetensors, in the param dtype.

  Above `max_shard_size` bytes the weights are split into model-0000i-of-0000n.safetensors
  files with a model.safetensors.index.json, as `save_pretrained` does. With several
  processes, every process must call this (parameters are gathered); process 0 writes.
  `tokenizer_dir` (a directory holding a Hugging Face tokenizer, e.g. the initial checkpoint)
  adds its tokenizer files, chat template and generation config (:data:`TOKENIZER_FILES`),
  so `AutoTokenizer` reads the output too. A model with LoRA adapters
  (`alignjax.models.lora`) is written merged (`lora.merge_lora`). Returns `out_dir`.
  """
  cfg = getattr(model, "config", None)
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"to_hf: `model` must be an alignjax Transformer, got {type(model).__name__}.")
  out_dir = os.fspath(out_dir)
  tokenizer_files = []
  if tokenizer_dir is not None:
    tokenizer_dir = os.fspath(tokenizer_dir)
    tokenizer_files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]
    if not any(f in tokenizer_files for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
      raise ValueError(f"to_hf: `tokenizer_dir` {tokenizer_dir!r} holds no tokenizer "
                       "(tokenizer.json, tokenizer.model or vocab.json).")
  if isinstance(model, Transformer):
    from alignjax.models import lora  # pylint: disable=import-outside-toplevel
    if lora.has_lora(model):  # LoRA: write the merged weights W + (alpha/r)·A·B
      model = lora.merge_lora(model)
  reward = isinstance(model, RewardModel)  # a *ForSequenceClassification with one label
  hf_cfg = reward_lib.hf_config(cfg) if reward else config_to_hf(cfg)
  specs = reward_lib.tensor_specs(cfg) if reward else families.tensor_specs(cfg)
  st = _NP_TO_ST[np.dtype(jnp.dtype(cfg.param_dtype)).name]
  itemsize = np.dtype(_ST_TO_NP[st]).itemsize
  write = jax.process_index() == 0

  def producer(spec):
    def produce():
      arrays = [_host(_slot_value(model, p)) for p in spec.paths]
      return spec.from_params(*arrays)
    return produce

  shards: list[list] = [[]]
  size = 0
  total = 0
  for spec in specs:
    nbytes = int(np.prod(spec.hf_shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append((spec.name, st, tuple(spec.hf_shape), producer(spec)))
    size += nbytes
    total += nbytes

  if write:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
    for name in tokenizer_files:
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  if len(shards) == 1:
    if write:
      _write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
    else:  # other processes still take part in the gathers
      for *_, produce in shards[0]:
        produce()
    return out_dir
  n = len(shards)
  weight_map = {}
  for i, entries in enumerate(shards):
    fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    if write:
      _write_safetensors(os.path.join(out_dir, fn), entries)
    else:
      for *_, produce in entries:
        produce()
    weight_map.update({e[0]: fn for e in entries})
  if write:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return out_dir


__all__ = ["config_from_hf", "config_to_hf", "from_hf", "read_hf_config", "to_hf"]
