"""Reference-model modes for preference training.

* ``online``: frozen reference parameters travel into the step as a separate,
  non-donated argument; the reference forward runs inside the step under
  ``stop_gradient`` and has no optimizer state. AlignDistil's frozen teachers
  (``dpo`` and ``contrast``) use the same mechanism (:func:`teachers`).
* ``precomputed``: one pass over a data source (:func:`precompute`) computes the
  reference chosen/rejected sequence log-probabilities (sum and token mean) and
  writes them next to the data set as ``.npy`` files indexed by example index;
  later steps read them from the batch (:func:`attach` adds them by index), so no
  reference weights are in memory. DPO-family objectives only (TDPO needs the
  full reference distribution, AlignDistil full teacher distributions).
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

from alignjax.data import batch as batch_lib

MODES = ("online", "precomputed", "free", "none")
REFERENCE_KEYS = tuple(f"reference_{side}_{kind}" for side in batch_lib.SIDES
                       for kind in ("logps", "mean_logps"))
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
  from alignjax.training import steps  # noqa: PLC0415
  graphdefs, params, shardings = {}, {}, {}
  for name, model in models.items():
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    graphdefs[name] = (graphdef, rest)
    if mesh is not None:
      shardings[name] = steps._param_shardings(model, mesh)
      p = jax.device_put(p, shardings[name])
    params[name] = p
  return Reference(mode, graphdefs, shardings if mesh is not None else None), params


def online(model: nnx.Module, *, mesh=None) -> tuple[Reference, dict[str, Any]]:
  """Online reference: ``(Reference, frozen={"reference": params})``, sharded over ``mesh`` if given."""
  return _freeze({"reference": model}, "online", mesh)


def teachers(*, dpo: nnx.Module, contrast: nnx.Module, mesh=None) -> tuple[Reference, dict[str, Any]]:
  """AlignDistil's frozen teachers: the DPO model and the contrast (reverse-DPO) model."""
  return _freeze({"dpo": dpo, "contrast": contrast}, "online", mesh)


def precomputed() -> tuple[Reference, dict[str, Any]]:
  """Precomputed mode: reference log-probs come from the batch keys :data:`REFERENCE_KEYS`."""
  return Reference("precomputed"), {}


def free() -> tuple[Reference, dict[str, Any]]:
  """Reference-free mode (zero reference log-probs)."""
  return Reference("free"), {}


def none() -> tuple[Reference, dict[str, Any]]:
  """No reference at all (SFT)."""
  return Reference("none"), {}


def check_compatible(ref: Reference, objective) -> None:
  """Raises a one-line ValueError if ``objective`` cannot run under ``ref``'s mode."""
  needs, mode, names = objective.needs, ref.mode, set(ref.graphdefs)
  ok = {
      "reference_logps": (mode == "online" and names == {"reference"}) or mode == "precomputed"
                         or (mode == "free" and objective.reference_free_ok),
      "reference_logits": mode == "online" and names == {"reference"},
      "teachers": mode == "online" and names == {"dpo", "contrast"},
      "none": mode in ("none", "free") or (mode == "online"),
  }[needs]
  if not ok:
    raise ValueError(
        f"reference: objective {objective.name!r} needs {needs!r}, which the reference mode "
        f"{mode!r} with models {sorted(names)} cannot provide.")


def sequence_logps(ref: Reference, frozen: Mapping[str, Any], batch, *, average: bool,
                   chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Reference ``(chosen, rejected)`` sequence log-probs ``[B]`` under ``ref``'s mode (no gradient).

  ``frozen`` holds the merged frozen models (online mode).
  """
  from alignjax.training import objectives  # noqa: PLC0415 (objectives imports this module lazily)
  if ref.mode == "online":
    tokens, attention, mask = objectives.pair_inputs(batch)
    lp = objectives.label_logprobs(frozen["reference"], tokens, attention, chunk_size=chunk_size)
    lp = jax.lax.stop_gradient(lp)
    seq = objectives._reduce(lp, mask, average)
    return batch_lib.split_pair(seq)
  if ref.mode == "precomputed":
    kind = "mean_logps" if average else "logps"
    keys = [f"reference_{side}_{kind}" for side in batch_lib.SIDES]
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"reference.sequence_logps: precomputed mode needs batch keys {missing}; see reference.attach.")
    return tuple(jax.lax.stop_gradient(jnp.asarray(batch[k], jnp.float32)) for k in keys)
  if ref.mode == "free":
    b = jnp.shape(batch[batch_lib.key("chosen", "tokens")])[0]
    return jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32)
  raise ValueError(f"reference.sequence_logps: mode {ref.mode!r} has no reference log-probs.")


# ---------------------------------------------------------------- precompute

def precompute(model: nnx.Module, batches: Iterable[tuple[Any, Mapping[str, Any]]], out_dir: str, *,
               num_examples: int, chunk_size: int = 128, mesh=None) -> dict[str, np.ndarray]:
  """One pass over ``(indices [B], batch)`` pairs: writes reference log-probs to ``out_dir``.

  Writes ``{key}.npy`` for each key of :data:`REFERENCE_KEYS` (float32 ``[num_examples]``,
  row i = example i) and ``reference_logps.json`` (which rows were filled). Rows whose
  index is negative (padding examples) are skipped. Returns the arrays.
  """
  from alignjax.training import steps  # noqa: PLC0415
  if num_examples <= 0:
    raise ValueError(f"reference.precompute: `num_examples` must be > 0, got {num_examples}.")
  fn = steps.make_reference_logps_fn(model, chunk_size=chunk_size, mesh=mesh)
  graphdef_params = nnx.split(model, nnx.Param, ...)[1]
  store = {k: np.full((num_examples,), np.nan, np.float32) for k in REFERENCE_KEYS}
  filled = np.zeros((num_examples,), bool)
  for indices, batch in batches:
    indices = np.asarray(indices)
    out = jax.device_get(fn(graphdef_params, {k: batch[k] for k in batch_lib.PREFERENCE_KEYS}))
    keep = indices >= 0
    if np.any(indices[keep] >= num_examples):
      raise ValueError(f"reference.precompute: example index {indices.max()} >= `num_examples` {num_examples}.")
    for k in REFERENCE_KEYS:
      store[k][indices[keep]] = np.asarray(out[k])[keep]
    filled[indices[keep]] = True
  os.makedirs(out_dir, exist_ok=True)
  for k, v in store.items():
    np.save(os.path.join(out_dir, _FILE.format(key=k)), v)
  with open(os.path.join(out_dir, _META), "w") as f:
    json.dump({"num_examples": int(num_examples), "num_filled": int(filled.sum()),
               "keys": list(REFERENCE_KEYS)}, f)
  return store


def load(out_dir: str) -> dict[str, np.ndarray]:
  """Reads what :func:`precompute` wrote (memory-mapped)."""
  meta_path = os.path.join(out_dir, _META)
  if not os.path.exists(meta_path):
    raise ValueError(f"reference.load: no precomputed reference log-probs in {out_dir!r} ({_META} missing).")
  return {k: np.load(os.path.join(out_dir, _FILE.format(key=k)), mmap_mode="r") for k in REFERENCE_KEYS}


def attach(batch: Mapping[str, Any], store: Mapping[str, np.ndarray], indices) -> dict[str, Any]:
  """Returns ``batch`` plus the precomputed reference keys of its examples ``indices [B]``."""
  indices = np.asarray(indices)
  out = dict(batch)
  for k in REFERENCE_KEYS:
    vals = np.asarray(store[k])[indices]
    if np.isnan(vals).any():
      raise ValueError(f"reference.attach: `{k}` was never computed for some of examples {indices.tolist()}.")
    out[k] = vals.astype(np.float32)
  return out
