"""Reference-model modes for preference training.

* ``online``: frozen reference parameters travel into the step as a separate,
  non-donated argument; the reference forward runs inside the step under
  ``stop_gradient`` and has no optimizer state. AlignDistil's frozen teachers
  (``dpo`` and ``contrast``) use the same mechanism (:func:`teachers`).
* ``precomputed``: one pass over a data source (:func:`precompute`) computes the
  reference sequence log-probabilities (sum and token mean) of every side of the
  batch schema (chosen/rejected, or the unpaired completion and KL rows) and
  writes them next to the data set as ``.npy`` files indexed by example index;
  later steps read them from the batch (:func:`attach` adds them by index), so no
  reference weights are in memory. Algorithms that need only reference
  log-probs (``needs == "reference_logps"``; TDPO needs the full reference
  distribution, AlignDistil full teacher distributions).
* ``free``: reference-free, a zero reference log-prob (SimPO-style, Meng et al.
  2024, "SimPO", arXiv:2405.14734, Eq. 4 without the length margin); only for
  objectives with ``reference_free_ok``.

A :class:`Reference` is static (mode + graphdefs of the frozen models); the
frozen *parameters* are a dict ``name -> nnx.State`` passed to the step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax import sharding as sharding_lib
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base as algo_base

MODES = ("online", "precomputed", "free", "none", "adapter_off")
REFERENCE_KEYS = batch_lib.reference_keys(batch_lib.PAIRED)
_FILE = "{key}.npy"
_META = "reference_logps.json"


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
  """Static description of a reference mode.

  Attributes:
    mode: one of :data:`MODES`.
    graphdefs: name -> (graphdef, non-parameter state) of each frozen model.
    shardings: name -> parameter shardings on a mesh (None without a mesh).
  """
  mode: str
  graphdefs: Mapping[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
  shardings: Mapping[str, Any] | None = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Reference: `mode` must be one of {list(MODES)}, got {self.mode!r}.")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self.graphdefs))

  def merge(self, params: Mapping[str, Any] | None, cast=None) -> dict[str, Any]:
    """Rebuilds the frozen models from ``params`` (stop-gradient, optionally cast)."""
    params = params or {}
    if set(params) != set(self.graphdefs):
      raise ValueError(f"Reference.merge: `frozen` params have models {sorted(params)}, expected {sorted(self.graphdefs)}.")
    out = {}
    for name, (graphdef, rest) in self.graphdefs.items():
      p = jax.lax.stop_gradient(params[name])
      if cast is not None:
        p = cast(p)
      out[name] = nnx.merge(graphdef, p, rest) if rest is not None else nnx.merge(graphdef, p)
    return out


def _freeze(models: Mapping[str, nnx.Module], mode: str, mesh) -> tuple[Reference, dict[str, Any]]:
  graphdefs, params, shardings = {}, {}, {}
  for name, model in models.items():
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    graphdefs[name] = (graphdef, rest)
    if mesh is not None:
      shardings[name] = sharding_lib.param_shardings(model, mesh, p)
      p = sharding_lib.put_tree(p, shardings[name])
    params[name] = p
  return Reference(mode, graphdefs, shardings if mesh is not None else None), params


def online(model: nnx.Module, *, mesh=None) -> tuple[Reference, dict[str, Any]]:
  """Online reference: ``(Reference, frozen={"reference": params})``, sharded over ``mesh`` if given."""
  return _freeze({"reference": model}, "online", mesh)


def teachers(*, mesh=None, **models: nnx.Module) -> tuple[Reference, dict[str, Any]]:
  """An algorithm's own frozen models (``Algorithm.frozen``), e.g. AlignDistil's ``dpo=`` and ``contrast=``."""
  if not models:
    raise ValueError("reference.teachers: pass the frozen models by name, e.g. teachers(dpo=m1, contrast=m2).")
  return _freeze(models, "online", mesh)


def precomputed() -> tuple[Reference, dict[str, Any]]:
  """Precomputed mode: reference log-probs come from the batch keys :data:`REFERENCE_KEYS`."""
  return Reference("precomputed"), {}


def free() -> tuple[Reference, dict[str, Any]]:
  """Reference-free mode (zero reference log-probs)."""
  return Reference("free"), {}


def adapter_off() -> tuple[Reference, dict[str, Any]]:
  """LoRA: the reference is the policy's own weights with the adapters switched off (no second copy)."""
  return Reference("adapter_off"), {}


def none() -> tuple[Reference, dict[str, Any]]:
  """No reference at all (SFT)."""
  return Reference("none"), {}


def check_compatible(ref: Reference, algorithm) -> None:
  """Raises a one-line ValueError if ``algorithm`` (an ``algorithms.Algorithm``) cannot run under ``ref``."""
  needs, mode, names = algorithm.needs, ref.mode, set(ref.graphdefs)
  ok = {
      "reference_logps": (mode == "online" and names == {"reference"}) or mode in ("precomputed", "adapter_off")
                         or (mode == "free" and algorithm.reference_free_ok),
      "reference_logits": (mode == "online" and names == {"reference"}) or mode == "adapter_off",
      "teachers": mode == "online" and names == set(algorithm.frozen),
      "none": mode in ("none", "free") or (mode == "online"),
  }[needs]
  if not ok:
    raise ValueError(
        f"reference: algorithm {algorithm.name!r} needs {needs!r}, which the reference mode "
        f"{mode!r} with models {sorted(names)} cannot provide.")


# ---------------------------------------------------------------- precompute

def precompute(model: nnx.Module, batches: Iterable[tuple[Any, Mapping[str, Any]]], out_dir: str, *,
               num_examples: int, chunk_size: int = 128, mesh=None) -> dict[str, np.ndarray]:
  """One pass over ``(indices [B], batch)`` pairs: writes reference log-probs to ``out_dir``.

  Writes ``{key}.npy`` for each key of ``batch.reference_keys`` of the batches'
  schema and sides (:data:`REFERENCE_KEYS` for pairs; float32 ``[num_examples]``,
  row i = example i) and ``reference_logps.json`` (which rows were filled). Rows
  whose index is negative (padding examples) are skipped. Returns the arrays.
  """
  if num_examples <= 0:
    raise ValueError(f"reference.precompute: `num_examples` must be > 0, got {num_examples}.")
  fn = make_reference_logps_fn(model, chunk_size=chunk_size, mesh=mesh)
  graphdef_params = nnx.split(model, nnx.Param, ...)[1]
  store, keys = None, ()
  filled = np.zeros((num_examples,), bool)
  for indices, batch in batches:
    indices = np.asarray(indices)
    schema = batch_lib.detect(batch)
    if store is None:
      keys = batch_lib.reference_keys(schema, schema.present_sides(batch))
      store = {k: np.full((num_examples,), np.nan, np.float32) for k in keys}
    out = jax.device_get(fn(graphdef_params, {k: batch[k] for k in schema.keys(optional=True) if k in batch}))
    keep = indices >= 0
    if np.any(indices[keep] >= num_examples):
      raise ValueError(f"reference.precompute: example index {indices.max()} >= `num_examples` {num_examples}.")
    for k in keys:
      store[k][indices[keep]] = np.asarray(out[k])[keep]
    filled[indices[keep]] = True
  if store is None:
    raise ValueError("reference.precompute: `batches` yielded no batch.")
  os.makedirs(out_dir, exist_ok=True)
  for k, v in store.items():
    np.save(os.path.join(out_dir, _FILE.format(key=k)), v)
  with open(os.path.join(out_dir, _META), "w") as f:
    json.dump({"num_examples": int(num_examples), "num_filled": int(filled.sum()), "keys": list(keys)}, f)
  return store


def load(out_dir: str) -> dict[str, np.ndarray]:
  """Reads what :func:`precompute` wrote (memory-mapped)."""
  meta_path = os.path.join(out_dir, _META)
  if not os.path.exists(meta_path):
    raise ValueError(f"reference.load: no precomputed reference log-probs in {out_dir!r} ({_META} missing).")
  with open(meta_path) as f:
    keys = json.load(f).get("keys", list(REFERENCE_KEYS))
  return {k: np.load(os.path.join(out_dir, _FILE.format(key=k)), mmap_mode="r") for k in keys}


def attach(batch: Mapping[str, Any], store: Mapping[str, np.ndarray], indices) -> dict[str, Any]:
  """Returns ``batch`` plus the precomputed reference keys of its examples ``indices [B]``."""
  indices = np.asarray(indices)
  out = dict(batch)
  for k in store:
    vals = np.asarray(store[k])[indices]
    if np.isnan(vals).any():
      raise ValueError(f"reference.attach: `{k}` was never computed for some of examples {indices.tolist()}.")
    out[k] = vals.astype(np.float32)
  return out


def make_reference_logps_fn(model: nnx.Module, *, chunk_size: int = 128, mesh=None):
  """Jitted ``fn(params, batch) -> {reference_{side}_{logps,mean_logps}: [B] float32}``.

  The pass :func:`alignjax.training.reference.precompute` runs once over a data set.
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)   # a frozen model: every parameter

  def fn(params, batch):
    m = nnx.merge(graphdef, params, rest)
    sides = batch_lib.detect(batch).present_sides(batch)
    lp, mask, _ = algo_base.sequence_logps(m, batch, sides, average=False, chunk_size=chunk_size)
    out = {}
    for kind, average in (("logps", False), ("mean_logps", True)):
      for side, x in zip(sides, batch_lib.split_sides(algo_base.reduce(lp, mask, average), len(sides))):
        out[f"reference_{side}_{kind}"] = x
    return out

  kwargs = {}
  if mesh is not None:
    kwargs["in_shardings"] = (None, sharding_lib.batch_sharding(mesh, ndim=1))
  return jax.jit(fn, **kwargs)
