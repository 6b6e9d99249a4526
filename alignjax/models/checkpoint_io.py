"""Model weights as an Orbax checkpoint, with the ``ModelConfig`` in its metadata.

An Orbax model checkpoint is one directory with two items:

* ``params``: the model's ``nnx.Param`` state (array-by-array, so restoring
  onto a mesh reads each process's own shards only);
* ``model_config``: the ``ModelConfig`` as JSON (``dataclasses.asdict``), so the
  checkpoint alone rebuilds the model; a reward model's adds ``"kind": "reward"``
  (:class:`alignjax.models.RewardModel`; absent: a ``Transformer``).

``save_model`` / ``load_model`` are what ``launch/convert.py`` calls to move
between Hugging Face directories (``models.from_hf`` / ``models.to_hf``) and
Orbax, the format training resumes from and MaxText/Tunix users expect.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from alignjax.models.config import ModelConfig, dtype_name

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"
KIND_KEY = "kind"   # in the model_config item: "reward" for a RewardModel (absent: a Transformer)


def config_to_dict(config) -> dict[str, Any]:
  """JSON-ready dict of a ``ModelConfig`` (tuples become lists)."""
  if not dataclasses.is_dataclass(config):
    raise TypeError(f"config_to_dict: `config` must be a ModelConfig, got {type(config).__name__}.")
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _tupled(value):
  if isinstance(value, list):
    return tuple(_tupled(v) for v in value)
  if isinstance(value, dict):
    return {k: _tupled(v) for k, v in value.items()}
  return value


def config_from_dict(data: dict[str, Any]):
  """Inverse of :func:`config_to_dict`; unknown keys are a ``ValueError``."""
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ValueError(f"config_from_dict: unknown ModelConfig fields {unknown}; "
                     f"expected a subset of {sorted(fields)}.")
  return ModelConfig(**{name: _tupled(value) for name, value in data.items()})


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{
      PARAMS_ITEM: ocp.StandardCheckpointHandler(),
      CONFIG_ITEM: ocp.JsonCheckpointHandler(),
  }))


def save_model(model, directory: str, *, force: bool = False) -> str:
  """Writes ``model``'s parameters and config to an Orbax checkpoint at ``directory``.

  Args:
    model: an ``alignjax.models.Transformer`` (sharded or not; in a
      multi-process run every process calls this and writes its own shards).
    directory: the checkpoint directory to create.
    force: overwrite an existing ``directory``.

  Returns:
    The absolute path written.
  """
  if not hasattr(model, "config"):
    raise TypeError(f"save_model: `model` must be an alignjax Transformer, got {type(model).__name__}.")
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not force:
    raise ValueError(f"save_model: `directory` {directory} exists; pass force=True to overwrite.")
  config = model.config  # kept as is (a scanned model's config says scan_layers=True)
  from alignjax.models.reward import RewardModel
  reward = isinstance(model, RewardModel)
  if getattr(config, "scan_layers", False):  # on disk, parameters stay per layer
    if reward:
      raise ValueError("save_model: a RewardModel with scan_layers=True cannot be saved; unstack its backbone.")
    from alignjax.models.transformer import unstack_layers
    model = unstack_layers(model)
  params = nnx.state(model, nnx.Param)
  meta = config_to_dict(config)
  if reward:
    meta[KIND_KEY] = "reward"
  args = ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardSave(params),
      CONFIG_ITEM: ocp.args.JsonSave(meta),
  })
  with _checkpointer() as ckptr:
    ckptr.save(directory, args=args, force=force)
  return directory


def load_config(directory: str):
  """The ``ModelConfig`` stored in an Orbax model checkpoint written by :func:`save_model`."""
  return _load_meta(directory)[0]


def load_kind(directory: str) -> str:
  """What :func:`save_model` stored: ``"reward"`` (a ``RewardModel``) or ``"transformer"``."""
  return _load_meta(directory)[1]


def _load_meta(directory: str):
  directory = os.path.abspath(directory)
  if not os.path.isdir(os.path.join(directory, CONFIG_ITEM)):
    raise ValueError(f"load_config: `directory` {directory} is not a model checkpoint written by "
                     f"save_model (no '{CONFIG_ITEM}' item).")
  with _checkpointer() as ckptr:
    restored = ckptr.restore(directory, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
  meta = dict(restored[CONFIG_ITEM])
  kind = meta.pop(KIND_KEY, "transformer")
  return config_from_dict(meta), kind


def load_model(directory: str, *, dtype=None, param_dtype=None, mesh=None, scan_layers=None):
  """Rebuilds the model saved by :func:`save_model`.

  Args:
    directory: the Orbax model checkpoint.
    dtype: computation dtype (name or jnp dtype); default: the stored config's.
    param_dtype: parameter storage dtype; default: the stored config's. Stored
      arrays are cast to it on restore.
    mesh: optional ``jax.sharding.Mesh`` (axes data/fsdp/tensor): each
      parameter is restored directly onto its shards (``sharding.model_shardings``);
      in a multi-process run each process reads only its own shards.
    scan_layers: build the model with stacked, scanned layers (True) or per-layer (False);
      default: the stored config's. Checkpoints hold per-layer parameters either way; a
      scanned model is restored per layer and then stacked.

  Returns:
    An ``alignjax.models.Transformer`` (an ``alignjax.models.RewardModel`` if one was saved).
  """
  from alignjax.models.reward import RewardModel
  from alignjax.models.transformer import Transformer, stack_layers

  fn = "load_model"
  dtype = None if dtype is None else dtype_name(dtype, where=f"{fn}: `dtype`")
  param_dtype = None if param_dtype is None else dtype_name(param_dtype, where=f"{fn}: `param_dtype`")
  config, kind = _load_meta(directory)
  model_cls = RewardModel if kind == "reward" else Transformer
  changes = {}
  if dtype is not None:
    changes["dtype"] = dtype
  if param_dtype is not None:
    changes["param_dtype"] = param_dtype
  if scan_layers is not None:
    if not isinstance(scan_layers, bool):
      raise ValueError(f"{fn}: `scan_layers` must be a bool or None, got {scan_layers!r}.")
    changes["scan_layers"] = scan_layers
  if changes:
    config = dataclasses.replace(config, **changes)
  scan = config.scan_layers
  config = dataclasses.replace(config, scan_layers=False)  # the on-disk layout

  if scan and model_cls is RewardModel:
    raise ValueError(f"{fn}: a RewardModel cannot be loaded with scan_layers=True.")
  graphdef, params, rest = _abstract_split(model_cls, config)
  if mesh is not None:
    from alignjax import sharding as sharding_lib

    def place(var):
      return sharding_lib.variable_sharding(var, mesh)
  else:
    device = jax.local_devices()[0]

    def place(var):
      return jax.sharding.SingleDeviceSharding(device)

  def abstract_leaf(var):
    value = var.get_value()
    return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=place(var)))

  target = jax.tree.map(abstract_leaf, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  directory = os.path.abspath(directory)
  with _checkpointer() as ckptr:
    saved = ckptr.metadata(directory)
    _check_structure(fn, directory, saved, params)
    restored = ckptr.restore(
        directory, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
  if jax.tree_util.tree_leaves(rest):
    raise ValueError(f"{fn}: the model has non-parameter state, which model checkpoints do not hold.")
  model = nnx.merge(graphdef, restored[PARAMS_ITEM], rest)
  return stack_layers(model) if scan else model


@functools.lru_cache(maxsize=8)
def _abstract_split(model_cls, config):
  """``nnx.split(abstract model, nnx.Param, ...)`` of ``model_cls(config)``, built once per (class, config).

  Only read: ``load_model`` builds its restore targets and the model from new Variables. The abstract
  build traces every initializer (0.1 s for a test-sized model, 4 s for gemma2_27b's config), which a
  study paid at each of its ~30 policy loads.
  """
  abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param, ...)


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = []
    for k in path:
      name = next((str(getattr(k, a)) for a in ("key", "name", "idx") if hasattr(k, a)), str(k))
      names.append(name)
    if names and names[-1] == "value":
      names = names[:-1]
    out["/".join(names)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
  return out


def _check_structure(fn: str, directory: str, saved_metadata, params) -> None:
  """Refuses, before reading any array, a checkpoint whose parameters do not fit the config."""
  saved_params = saved_metadata.item_metadata.get(PARAMS_ITEM)
  saved_params = getattr(saved_params, "tree", saved_params)
  if saved_params is None:
    raise ValueError(f"{fn}: `directory` {directory} has no '{PARAMS_ITEM}' item.")
  saved = _leaf_shapes(saved_params)
  wanted = _leaf_shapes(params)
  problems = [f"missing {k}" for k in sorted(set(wanted) - set(saved))]
  problems += [f"unexpected {k}" for k in sorted(set(saved) - set(wanted))]
  problems += [f"{k}: stored {saved[k]} vs config {wanted[k]}"
               for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  if problems:
    raise ValueError(f"{fn}: checkpoint {directory} does not match its config: "
                     + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))
