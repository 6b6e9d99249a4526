"""Input validation shared by the loss functions.

Every check runs on static shapes and dtypes, so it works identically inside
and outside ``jax.jit``. Errors are ``ValueError`` naming the function, the
argument and what was expected.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def shape_of(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_rank(fn: str, name: str, x: Any, rank: int, layout: str) -> None:
  shape = shape_of(x)
  if len(shape) != rank:
    raise ValueError(
        f"{fn}: `{name}` must have rank {rank} with layout {layout}, "
        f"got shape {shape}."
    )


def check_same_shape(fn: str, names: tuple[str, ...], *xs: Any) -> None:
  shapes = [shape_of(x) for x in xs]
  if any(s != shapes[0] for s in shapes[1:]):
    listing = ", ".join(f"`{n}` {s}" for n, s in zip(names, shapes))
    raise ValueError(f"{fn}: arguments must share one shape, got {listing}.")


def check_integer(fn: str, name: str, x: Any) -> None:
  dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{fn}: `{name}` must hold integer token ids, got dtype {dtype}.")


def check_logits_labels(
    fn: str, logits_name: str, logits: Any, labels_name: str, labels: Any
) -> None:
  check_rank(fn, logits_name, logits, 3, "[B, T, V]")
  check_rank(fn, labels_name, labels, 2, "[B, T]")
  check_integer(fn, labels_name, labels)
  if shape_of(logits)[:2] != shape_of(labels):
    raise ValueError(
        f"{fn}: `{logits_name}` {shape_of(logits)} and `{labels_name}` "
        f"{shape_of(labels)} disagree on [B, T]; logits[:, t] must score labels[:, t] "
        "(see `shift_for_next_token`)."
    )


def check_mask(fn: str, mask_name: str, mask: Any, like_name: str, like_shape) -> None:
  if shape_of(mask) != tuple(like_shape):
    raise ValueError(
        f"{fn}: `{mask_name}` has shape {shape_of(mask)}, expected {tuple(like_shape)} "
        f"to match `{like_name}`."
    )


def _concrete(x: Any):
  """Returns a Python/NumPy value for ``x`` if known at trace time, else None."""
  if isinstance(x, numbers.Number):
    return x
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(x)
  except Exception:  # pragma: no cover - exotic array types
    return None
  return arr if arr.ndim == 0 else None


def check_positive(fn: str, name: str, value: Any) -> None:
  v = _concrete(value)
  if v is not None and not float(v) > 0.0:
    raise ValueError(f"{fn}: `{name}` must be > 0, got {float(v)}.")


def check_in_range(
    fn: str, name: str, value: Any, lo: float, hi: float, *, hi_inclusive: bool = True
) -> None:
  v = _concrete(value)
  if v is None:
    return
  v = float(v)
  ok = lo <= v <= hi if hi_inclusive else lo <= v < hi
  if not ok:
    bracket = "]" if hi_inclusive else ")"
    raise ValueError(f"{fn}: `{name}` must lie in [{lo}, {hi}{bracket}, got {v}.")


def check_choice(fn: str, name: str, value: Any, choices) -> None:
  if value not in choices:
    raise ValueError(
        f"{fn}: unknown `{name}` {value!r}; expected one of {sorted(choices)}."
    )
