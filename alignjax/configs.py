"""From ``ml_collections`` to typed configs: one builder for every frozen config dataclass.

``ml_collections`` stays at the launcher boundary (STYLE.md, "Configs are frozen
dataclasses"); the library sees typed, frozen dataclasses. :func:`build_dataclass`
turns a ``ConfigDict``, a nested mapping or an instance (plus dotted overrides)
into any of them -- :class:`alignjax.training.config.RunConfig`,
:class:`alignjax.study.frontier.StudyConfig`,
:class:`alignjax.study.aligndistil.PipelineConfig`,
:class:`alignjax.decoding.files.SampleConfig` -- checking each value against its
field's type and raising one line that names the field.

Types come from each field's default (nested dataclass sections take their
defaults from the parent's default, so ``RunConfig().sft`` keeps its warm-up
numbers): ``bool`` exactly; ``int`` (numpy integers and integral floats
accepted); ``float`` (ints accepted; NaN refused, and +-inf too with
``finite=True``); ``str``; ``tuple`` (a scalar becomes a 1-tuple, a list a
tuple); a dataclass (a nested section, from a mapping). Range and combination
checks stay with each config's ``validate``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional

__all__ = ["ConfigError", "build_dataclass", "coerce", "field_help", "flatten_mapping", "nested"]


class ConfigError(ValueError):
  """A user error in a config (one line naming the field); every launcher exits with code 2 on it."""


def flatten_mapping(m: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``ConfigDict`` values are read with ``to_dict``)."""
  out = {}
  for k, v in m.items():
    if hasattr(v, "to_dict"):
      v = v.to_dict()
    if isinstance(v, Mapping):
      out.update(flatten_mapping(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
  out: dict[str, Any] = {}
  for k, v in flat.items():
    node = out
    *path, last = k.split(".")
    for p in path:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def _as_dict(obj) -> dict[str, Any]:
  """A dataclass instance as a nested dict (tuples stay tuples)."""
  return {f.name: (_as_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v)
          for f in dataclasses.fields(obj)}


def _field_default(f: dataclasses.Field) -> Any:
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:  # e.g. RunConfig.loss: a class made from the registry now
    return f.default_factory()
  return dataclasses.MISSING


def build_dataclass(cls: type, config: Any = None, *, overrides: Optional[Mapping[str, Any]] = None,
                    where: str = "config", error: type = ValueError, hint: str = "",
                    finite: bool = False) -> Any:
  """An instance of the frozen dataclass ``cls`` from ``config``, type-checked field by field.

  Args:
    cls: the config dataclass (every field with a default, or given in ``config``).
    config: ``None`` (all defaults), an instance of ``cls``, an ``ml_collections``
      ``ConfigDict`` (anything with ``to_dict``) or a nested mapping.
    overrides: dotted field names and values applied on top (``{"loss.beta": 0.2}``).
    where: how errors name the root (``config`` -> ``config.loss.beta must be ...``).
    error: the exception class raised (a ``ValueError`` subclass: the launchers'
      exit code 2).
    hint: appended to the unknown-field message (e.g. `` (see --config_help)``).
    finite: also refuse infinite floats.

  Missing fields take their defaults. Raises ``error`` with one line naming the
  field on an unknown field or a value of the wrong type.
  """
  if config is None:
    mapping: dict[str, Any] = {}
  elif isinstance(config, cls):
    mapping = _as_dict(config)
  elif hasattr(config, "to_dict"):
    mapping = config.to_dict()
  elif isinstance(config, Mapping):
    mapping = dict(config)
  else:
    raise error(f"build: `config` must be a ConfigDict, a mapping or a {cls.__name__}, got {type(config).__name__}.")
  if overrides:
    flat = flatten_mapping(mapping)
    flat.update(overrides)
    mapping = nested(flat)
  defaults = {f.name: _field_default(f) for f in dataclasses.fields(cls)}
  return _section(cls, defaults, mapping, "", where=where, error=error, hint=hint, finite=finite)


def _section(cls, defaults: Mapping[str, Any], mapping: Mapping[str, Any], prefix: str, **opts):
  where, error = opts["where"], opts["error"]
  unknown = sorted(set(mapping) - set(defaults))
  if unknown:
    raise error(f"{where}{'.' + prefix[:-1] if prefix else ''}: unknown field(s) {unknown}; expected a subset of "
                f"{sorted(defaults)}{opts['hint']}.")
  kwargs = {}
  for name, default in defaults.items():
    if name not in mapping:
      if default is dataclasses.MISSING:
        raise error(f"{where}.{prefix}{name} is required.")
      kwargs[name] = default
      continue
    value = mapping[name]
    if dataclasses.is_dataclass(default):
      if hasattr(value, "to_dict"):
        value = value.to_dict()
      if not isinstance(value, Mapping):
        raise error(f"{where}.{prefix}{name} must be a section (mapping), got {value!r}.")
      sub = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
      kwargs[name] = _section(type(default), sub, value, f"{prefix}{name}.", **opts)
    else:
      kwargs[name] = coerce(f"{where}.{prefix}{name}", value, default, error=error, finite=opts["finite"])
  return cls(**kwargs)


def coerce(where: str, value: Any, default: Any, *, error: type = ValueError, finite: bool = False) -> Any:
  """``value`` checked (and converted) to the type of the field's ``default``; ``where`` names the field."""
  if isinstance(default, bool):
    if not isinstance(value, bool):
      raise error(f"{where} must be a bool (True/False), got {value!r}.")
    return value
  if isinstance(default, int):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      if isinstance(value, float) and value.is_integer():
        return int(value)
      raise error(f"{where} must be an integer, got {value!r}.")
    return int(value)
  if isinstance(default, float):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise error(f"{where} must be a number, got {value!r}.")
    value = float(value)
    if math.isnan(value) or (finite and not math.isfinite(value)):
      raise error(f"{where} must be a {'finite ' if finite else ''}number, got {value}.")
    return value
  if isinstance(default, str):
    if not isinstance(value, str):
      raise error(f"{where} must be a string, got {value!r}.")
    return value
  if isinstance(default, tuple):
    if isinstance(value, (str, numbers.Number)):
      return (value,)
    try:
      return tuple(value)
    except TypeError:
      raise error(f"{where} must be a sequence, got {value!r}.") from None
  return value


def field_help(cls: type, *, prefix: str = "--config.") -> str:
  """A table of the fields of the config dataclass ``cls``: flag, default and the field's ``help`` metadata."""
  rows = []

  def walk(c, obj, path):
    for f in dataclasses.fields(c):
      v = getattr(obj, f.name) if obj is not None else _field_default(f)
      if dataclasses.is_dataclass(v):
        walk(type(v), v, f"{path}{f.name}.")
      else:
        rows.append((f"{prefix}{path}{f.name}", repr(v), f.metadata.get("help", "")))

  walk(cls, None, "")
  width, dwidth = max(len(r[0]) for r in rows), min(24, max(len(r[1]) for r in rows))  # long defaults overflow
  return "\n".join([f"Config fields of {cls.__name__} (default, meaning):"] +
                   [f"  {n:<{width}}  {d:<{dwidth}}  {h}" for n, d, h in rows])
