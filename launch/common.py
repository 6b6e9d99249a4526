"""Shared launcher plumbing: config flags, user errors, help, exit codes.

Exit codes of every launcher built on :func:`run`:

* 0 finished; 1 a bug (Python traceback).
* 2 user error: an invalid flag or config field, a workdir holding another run (the differing
  fields are listed) or locked by another process; one line on stderr (``--verbose``: traceback).
* 3 training stopped: non-finite loss/gradients/parameters or divergence (``config.max_loss``);
  nothing non-finite was checkpointed.
* 130 / 143 interrupted by SIGINT / SIGTERM after checkpointing the last finished step; re-run the
  same command to resume.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional

from absl import app, flags, logging

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show Python tracebacks for user errors.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize() first (the same "
                                  "command on every host; Cloud TPU and SLURM find the coordinator).")
_CONFIG_HELP = flags.DEFINE_bool("config_help", False, "List every config field with its default, then exit.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "JAX's persistent compilation cache directory: reruns, resumed runs and sweep runs "
    "that share a program load it instead of compiling. Default: $JAX_COMPILATION_CACHE_DIR, else "
    "~/.cache/alignjax/jax_compilation_cache; '' turns it off.")


def field_help(module: str = "alignjax.training.config", name: str = "") -> Callable[[], str]:
  """``--config_help``: ``module.field_help()`` (the run config's), or the field table of config class ``name``."""
  from alignjax import configs  # pylint: disable=import-outside-toplevel
  mod = lambda: importlib.import_module(module)  # noqa: E731
  return lambda: configs.field_help(getattr(mod(), name)) if name else mod().field_help()


def explicit_fields(config_flag) -> Optional[set[str]]:
  """Dotted config fields set on the command line; ``None`` if a config file was given (all explicit)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  if any(a == f"--{config_flag.name}" or a.startswith(f"--{config_flag.name}=") for a in sys.argv[1:]):
    return None
  return set(config_flags.get_override_values(flags.FLAGS[config_flag.name]))


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split()) or type(e).__name__


def define_config_file(name: str, default: str, help_string: str):
  """``config_flags.DEFINE_config_file`` (overrides apply here, at import) with one-line errors (exit 2)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    if "--verbose" in sys.argv:
      raise
    _error(f"bad config override: {_one_line(e)} (see --config_help)", 2)


def read_config(config_flag, error: type):
  """The ``ConfigDict`` of a ``config_flags`` flag; an unreadable config file raises ``error`` (one line)."""
  try:
    cd = config_flag.value
    cd.to_dict()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except  # unreadable or broken config file
    raise error(f"--{config_flag.name}: {_one_line(e)}") from e
  return cd


def build_config(config_flag):
  """The validated :class:`~alignjax.training.config.RunConfig` of a flag; relative ``data.dir`` from the cwd."""
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.build(read_config(config_flag, config_lib.ConfigError))
  if cfg.data.dir:
    cfg = config_lib.replace(cfg, **{"data.dir": os.path.abspath(cfg.data.dir)})
  return cfg


def _error(message: str, code: int):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # flags and config files are user input
    if "--verbose" in argv:
      raise
    _error(f"bad flag: {_one_line(e)} (see --help and --config_help)", 2)


def _wrap(main: Callable, help_fn: Callable[[], str]) -> Callable:
  def wrapped(argv):
    if len(argv) > 1:
      _error(f"unexpected arguments: {argv[1:]} (flags look like --name=value)", 2)
    if _CONFIG_HELP.value:
      print(help_fn())
      return 0
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    if _DISTRIBUTED.value:
      import jax  # pylint: disable=import-outside-toplevel
      jax.distributed.initialize()
    from alignjax.configs import ConfigError  # pylint: disable=import-outside-toplevel
    from alignjax.training import runtime as run_lib  # pylint: disable=import-outside-toplevel
    from alignjax.data.tokenize import DataError  # pylint: disable=import-outside-toplevel
    try:
      run_lib.enable_compilation_cache(_COMPILATION_CACHE.value)
    except ValueError as e:
      _error(f"--{e}", run_lib.EXIT_USER_ERROR)
    try:
      return main(argv)
    except (ConfigError, run_lib.RunLockedError, DataError, run_lib.TrainingFailed) as e:
      if _VERBOSE.value:
        raise
      failed = isinstance(e, run_lib.TrainingFailed)
      _error(str(e), run_lib.EXIT_TRAINING_FAILED if failed else run_lib.EXIT_USER_ERROR)
    except run_lib.Preempted as e:
      print(f"preempted: {e}; checkpoint written, re-run the same command to resume.", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      if _VERBOSE.value:
        raise
      _error("interrupted (Ctrl-C) before training started; nothing was lost.", 130)
    except Exception as e:  # pylint: disable=broad-except
      # A checkpoint of another structure (e.g. written by another alignjax). Looked up, not imported:
      # launchers that never load the checkpoint module (orbax) do not pay for its import.
      ckpt = sys.modules.get("alignjax.training.checkpoint")
      if _VERBOSE.value or ckpt is None or not isinstance(e, ckpt.CheckpointMismatchError):
        raise
      hint = "--fresh starts a new run in a new workdir" if "fresh" in flags.FLAGS else "another --workdir starts anew"
      _error(f"{e} ({hint}; this one is left alone)", run_lib.EXIT_USER_ERROR)
  return wrapped


def _quiet_unraisable(hook):
  """Drops the 'Event loop is closed' noise Orbax's asyncio leaves after reading a damaged step."""
  def quiet(u):
    if not (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)):
      hook(u)
  return quiet


def run(main: Callable, *, help_fn: Callable[[], str] = field_help()) -> None:
  """``absl.app.run`` with one-line user errors, ``--config_help`` / ``--help`` (``help_fn()``), the exit codes above."""
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
    mod = sys.modules.get("__main__")
    if mod is not None:
      mod.__doc__ = (mod.__doc__ or "") + "\n" + help_fn() + "\n\n" + __doc__.split("\n\n", 1)[1]
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  try:
    app.run(_wrap(main, help_fn), flags_parser=_parse_flags)
  except KeyboardInterrupt:
    print("error: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
    sys.exit(130)
