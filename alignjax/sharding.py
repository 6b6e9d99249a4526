"""Meshes, the ONE logical-axis rule table, and helpers that shard models and batches.

Parameters carry logical axis names (nnx metadata ``out_sharding``, e.g.
``("embed", "mlp")``); `RULES` maps each logical name to mesh axes of a
``("data", "fsdp", "tensor")`` mesh, as MaxText's ``logical_axis_rules`` do:
batch over data+fsdp, parameters' embed axis over fsdp (ZeRO-3 style), and the
heads/kv_heads/mlp/vocab axes over tensor (Megatron style). Anything else is replicated.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis / axes (None: replicated). The one table.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "positions": None,
    "length": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with `AxisType.Auto` axes over `devices` (default: all)."""
  for name, size in (("data", data), ("fsdp", fsdp), ("tensor", tensor)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"make_mesh: `{name}` must be a positive int, got {size!r}.")
  devices = list(jax.devices() if devices is None else devices)
  n = data * fsdp * tensor
  if n != len(devices):
    raise ValueError(f"make_mesh: data*fsdp*tensor = {n} must equal the number of devices "
                     f"({len(devices)}).")
  arr = np.asarray(devices, dtype=object).reshape(data, fsdp, tensor)
  if devices[0].platform != "cpu":
    try:  # topology-aware order on TPU/GPU
      from jax.experimental import mesh_utils
      arr = mesh_utils.create_device_mesh((data, fsdp, tensor), devices=devices)
    except Exception:  # odd topologies: keep the given order
      pass
  return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None] | None, *, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: dict | None = None) -> PartitionSpec:
  """PartitionSpec of an array whose axes have logical `names`, by `RULES`.

  Each mesh axis is used at most once (first axis wins). With `shape` and `mesh`, a mesh axis
  that does not divide its dimension (or has size 1) is dropped, leaving that part replicated.
  """
  rules = RULES if rules is None else rules
  if names is None:
    return PartitionSpec()
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is not None and name not in rules:
      raise ValueError(f"logical_to_spec: unknown logical axis {name!r}; known: {sorted(rules)}.")
    target = rules.get(name) if name is not None else None
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept = []
    for ax in axes:
      if ax in used:
        continue
      if mesh is not None:
        size = mesh.shape[ax]
        prod = int(np.prod([mesh.shape[a] for a in kept])) * size
        if size == 1 or (shape is not None and shape[i] % prod):
          continue
      kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return PartitionSpec(*spec)


def _names(var) -> tuple | None:
  meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
  return meta.get("out_sharding")


def variable_sharding(var, mesh: Mesh) -> NamedSharding:
  """NamedSharding of one nnx Variable (concrete or abstract) from its logical names."""
  value = var.get_value() if hasattr(var, "get_value") else var.value
  return NamedSharding(mesh, logical_to_spec(_names(var), shape=np.shape(value), mesh=mesh))


def _is_var(x):
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh):
  """The NamedSharding tree of an nnx.State (its Variables carry logical names)."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh), state, is_leaf=_is_var)


def model_shardings(model: nnx.Module, mesh: Mesh):
  """nnx.State of NamedSharding for every variable of `model`, by `RULES`."""
  return state_shardings(nnx.state(model), mesh)


def path_key(path) -> tuple:
  """A pytree path as a tuple of names (a trailing ``value`` of an nnx Variable dropped)."""
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
  if keys and keys[-1] == "value":
    keys = keys[:-1]
  return tuple(keys)


def param_shardings(model: nnx.Module, mesh: Mesh, params):
  """The NamedSharding of every leaf of ``params`` (a sub-state of ``model``), by its path; replicated if unnamed."""
  by_path = {path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(model_shardings(model, mesh))[0]}
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree_util.tree_map_with_path(lambda path, x: by_path.get(path_key(path), replicated), params)


def put(x, target: jax.sharding.Sharding):
  """``jax.device_put(x, target)``: where ``target`` spans processes, each process places its own shards of ``x``.

  ``x`` is a value every process holds the same (weights drawn from one seed, read from
  one checkpoint, a step counter). ``jax.device_put`` of a host or single-device array
  onto a sharding over several processes first checks that: it allgathers the whole
  array from every process (``multihost_utils.assert_equal``), once per array. A
  two-process run of tests/test_loop_sharded.py made 88 such checks, one per parameter
  of each copy the run places (two train states, the frozen reference twice); on a pod
  each moves a parameter's full size from every host. Here each process instead
  cuts its devices' shards from its own copy (``jax.make_array_from_callback``). An
  array already global (not fully addressable) is resharded by ``jax.device_put``; a
  target on this process's devices alone is a plain device_put.
  """
  if target.is_fully_addressable or not isinstance(x, (jax.Array, np.ndarray)) or (
      isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, target)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def put_tree(tree, shardings):
  """:func:`put` over a pytree and its matching tree of shardings (one batched device_put on this process's devices)."""
  if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
    return jax.device_put(tree, shardings)
  return jax.tree.map(put, tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Move every variable of `model` onto its NamedSharding, in place; returns the model."""
  for _, var in nnx.iter_graph(model):
    if _is_var(var):
      var.set_value(put(var.get_value(), variable_sharding(var, mesh)))
  return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """NamedSharding of a [B, ...] array: batch over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
  """Build `factory()` directly on its shardings (never materialised unsharded).

  Uses `nnx.eval_shape` for the abstract model and a jit whose `out_shardings` follow the
  rule table, so each device only ever allocates its own shard.
  """
  abstract = nnx.eval_shape(factory)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)

  def init():
    return nnx.split(factory())[1]

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


__all__ = ["MESH_AXES", "RULES", "batch_sharding", "create_sharded", "logical_to_spec",
           "make_mesh", "model_shardings", "put", "put_tree", "shard_model", "state_shardings", "variable_sharding"]
