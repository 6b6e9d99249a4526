"""Shared launcher plumbing: config building, user errors, help, exit codes.

Exit codes of every launcher built on :func:`run`:

* 0   -- finished.
* 1   -- a bug (Python traceback).
* 2   -- user error: invalid flag or config field, a workdir holding another run
  (the differing fields are listed), a workdir locked by another process.
  One line(s) on stderr, no traceback (``--verbose`` shows it).
* 3   -- training stopped: non-finite loss/gradients/parameters or divergence
  (``config.max_loss``); nothing non-finite was checkpointed.
* 130 / 143 -- interrupted by SIGINT (Ctrl-C) / SIGTERM after writing a checkpoint
  of the last finished step; re-run the same command to resume.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from absl import app, flags, logging

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show Python tracebacks for user errors.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host: call jax.distributed.initialize() first (run the same command on every host; on Cloud TPU "
    "and under SLURM the coordinator is found automatically).")
_CONFIG_HELP = flags.DEFINE_bool(
    "config_help", False, "List every config field with its default, and the valid loss names, then exit.")


def config_help() -> str:
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.field_help()


def explicit_fields(config_flag) -> Optional[set[str]]:
  """Dotted config fields set on the command line; ``None`` if a config file was given (all explicit)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  if any(a == f"--{config_flag.name}" or a.startswith(f"--{config_flag.name}=") for a in sys.argv[1:]):
    return None
  return set(config_flags.get_override_values(flags.FLAGS[config_flag.name]))


def _one_line(e: BaseException) -> str:
  text = str(e).replace("\\n", " ").replace("\\'", "'")
  return " ".join(text.split()) or type(e).__name__


def define_config_file(name: str, default: str, help_string: str):
  """``config_flags.DEFINE_config_file`` whose command-line override errors are one line (exit 2).

  ml_collections applies ``--config.x=...`` overrides while the flag is defined,
  i.e. at import of the launcher module.
  """
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    if "--verbose" in sys.argv:
      raise
    _error(f"bad config override: {_one_line(e)} (see --config_help)", 2)


def build_config(config_flag):
  """The validated :class:`~alignjax.training.config.RunConfig` of a ``config_flags`` flag.

  Relative ``data.dir`` paths are resolved against the caller's working directory.
  """
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  try:
    cd = config_flag.value
    cd.to_dict()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except  # unreadable or broken config file
    raise config_lib.ConfigError(f"--{config_flag.name}: {_one_line(e)}") from e
  cfg = config_lib.build(cd)
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


def _wrap(main: Callable) -> Callable:
  def wrapped(argv):
    if len(argv) > 1:
      _error(f"unexpected arguments: {argv[1:]} (flags look like --name=value)", 2)
    if _CONFIG_HELP.value:
      print(config_help())
      return 0
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    if _DISTRIBUTED.value:
      import jax  # pylint: disable=import-outside-toplevel
      jax.distributed.initialize()
    from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
    from alignjax.training import run as run_lib  # pylint: disable=import-outside-toplevel
    from alignjax.data.tokenize import DataError  # pylint: disable=import-outside-toplevel
    try:
      return main(argv)
    except (config_lib.ConfigError, run_lib.RunLockedError, DataError) as e:
      if _VERBOSE.value:
        raise
      _error(str(e), run_lib.EXIT_USER_ERROR)
    except run_lib.TrainingFailed as e:
      if _VERBOSE.value:
        raise
      _error(str(e), run_lib.EXIT_TRAINING_FAILED)
    except run_lib.Preempted as e:
      print(f"preempted: {e}; checkpoint written, re-run the same command to resume.", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      if _VERBOSE.value:
        raise
      _error("interrupted (Ctrl-C) before training started; nothing was lost.", 130)
  return wrapped


def _quiet_unraisable(hook):
  """Drops the 'Event loop is closed' noise Orbax's asyncio leaves after reading a damaged step."""
  def quiet(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    hook(unraisable)
  return quiet


def run(main: Callable) -> None:
  """``absl.app.run`` with one-line user errors, ``--config_help`` and documented exit codes.

  ``--help`` also lists the config fields and loss names.
  """
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
    mod = sys.modules.get("__main__")
    if mod is not None:
      mod.__doc__ = (mod.__doc__ or "") + "\n" + config_help() + "\n\n" + __doc__.split("\n\n", 1)[1]
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  try:
    app.run(_wrap(main), flags_parser=_parse_flags)
  except KeyboardInterrupt:
    print("error: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
    sys.exit(130)
