"""alignjax: preference-alignment research in JAX/Flax NNX.

Submodules (imported on first use): ``alignjax.losses``, ``alignjax.models``,
``alignjax.decoding``, ``alignjax.training``, ``alignjax.data``,
``alignjax.sharding``.
"""

import importlib
import importlib.util
import os

__version__ = "0.1.0"


def _no_libtpu_backend_without_a_tpu() -> None:
  """On a machine without a TPU chip, JAX does not load libtpu as a backend.

  The ``tpu`` extra installs libtpu for the planner (:mod:`alignjax.aot` compiles
  for a TPU topology on any machine, loading libtpu itself). JAX would also try
  it as a backend on the first device use, and libtpu then prints warnings and an
  ``INVALID_ARGUMENT`` line on every machine without a TPU. JAX skips CUDA the
  same way when no NVIDIA GPU is visible. ``JAX_PLATFORMS`` or
  ``JAX_FORCE_TPU_INIT`` set by the user: left alone.
  """
  if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  try:
    import dataclasses  # pylint: disable=import-outside-toplevel
    from jax._src import hardware_utils, xla_bridge  # pylint: disable=import-outside-toplevel
    factories = xla_bridge._backend_factories  # pylint: disable=protected-access
    started = bool(xla_bridge._backends)  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # another JAX: leave it alone
    return
  if started or "tpu" not in factories or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    return

  def no_tpu():
    raise RuntimeError("no TPU chip on this machine (libtpu is installed for alignjax.aot)")

  # The platform stays registered (TPU lowering rules refer to it); initialising it fails quietly.
  factories["tpu"] = dataclasses.replace(factories["tpu"], factory=no_tpu, fail_quietly=True)


_no_libtpu_backend_without_a_tpu()

_SUBMODULES = ("losses", "models", "decoding", "training", "data", "sharding")
__all__ = [*_SUBMODULES, "cache_dir"]


def cache_dir(*parts: str) -> str:
  """``$XDG_CACHE_HOME/alignjax/<parts>`` (default ``~/.cache``): real-checkpoint assets, AOT plans, compiled programs."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "alignjax", *parts)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"alignjax.{name}")
  raise AttributeError(f"module 'alignjax' has no attribute {name!r}")
