"""Launcher subprocesses forked from a pre-imported Python ("zygote"): the launcher tests' ``subprocess``.

A launcher process spends ~2 s of CPU importing JAX, Flax, Optax, Orbax, grain, TFDS
and alignjax before it reads its first flag, and the suite starts ~35 of them. The
zygote (one per pytest worker, started on first use) imports those libraries once,
without starting a JAX backend, and forks a child per launch. The child is a real
process with its own pid, signals, exit code and output: it takes the request's cwd,
environment, argv and ``sys.path[0]`` as ``python -m module`` / ``python script.py`` /
``python -c code`` would, writes stdout/stderr to files, runs the code as ``__main__``
(its own absl flags, JAX backend, XLA_FLAGS, compilation cache) and exits through the
interpreter's normal shutdown. Only the imported libraries are shared.

:func:`run` and :func:`popen` stand in for ``subprocess.run(..., capture_output=True,
text=True)`` and ``subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)``. They
fall back to a real subprocess when the command is none of those three forms, when the
request's ``JAX_*`` variables (read when JAX is imported) differ from the zygote's, or
when the zygote cannot start (``disabled`` says why). ``ALIGNJAX_TEST_ZYGOTE=0`` always
uses real subprocesses. Tests of start-up itself (``tests/test_quiet_startup.py``,
``tests/test_imports.py``), ``train.sh`` runs and notebook kernels keep real processes.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
# What the launchers import: libraries only (no launch.* module: launchers define their own absl flags).
PRELOAD = ("numpy", "jax", "jax.numpy", "flax.nnx", "optax", "orbax.checkpoint", "grain", "ml_collections",
           "tensorflow_datasets", "absl.app", "absl.flags", "absl.logging", "alignjax.training.loop",
           "alignjax.training.checkpoint", "alignjax.data.arrays_tfds", "alignjax.data.tfds_sorting",
           "alignjax.decoding", "alignjax.models", "alignjax.study.frontier")


# ----------------------------------------------------------------------------- the zygote (its own process)


def _child(req: dict) -> None:
  """In the forked child: become ``python -m module`` / ``python script`` / ``python -c code``; never returns."""
  import runpy  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY),
                         (2, req["stderr"], os.O_WRONLY)):
    if path is None:  # stderr=STDOUT
      os.dup2(1, fd)
      continue
    new = os.open(path, mode)
    os.dup2(new, fd)
    os.close(new)
  os.close(req["_proto_fd"])
  os.chdir(req["cwd"])
  os.environ.clear()
  os.environ.update(req["env"])
  sys.argv = list(req["argv"])
  global _exit_status
  try:
    if req["module"]:
      sys.path[0] = os.getcwd()
      runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    elif req["code"] is not None:
      sys.path[0] = ""
      main = types.ModuleType("__main__")
      sys.modules["__main__"] = main
      exec(compile(req["code"], "<string>", "exec"), main.__dict__)  # pylint: disable=exec-used
    else:
      sys.path[0] = os.path.dirname(os.path.abspath(req["argv"][0]))
      runpy.run_path(req["argv"][0], run_name="__main__")
  except SystemExit as e:  # a code that is not an int: the interpreter prints it and exits 1
    _exit_status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    raise
  except KeyboardInterrupt:  # the interpreter re-raises SIGINT on itself: its normal shutdown
    raise
  except BaseException:  # the interpreter prints the traceback
    _exit_status = 1
    raise
  _exit_status = 0
  sys.exit(0)


_exit_status: Optional[int] = None


def _exit_without_teardown() -> None:
  """A child's last exit handler: after every other one has run (the code's own, JAX's, logging's) and
  the non-daemon threads have finished, flush stdio and exit with the status the interpreter would
  have, skipping the teardown of the preloaded modules (~0.7 s of CPU, the same in a real launcher)."""
  if _exit_status is not None:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    os._exit(_exit_status)  # pylint: disable=protected-access


def _serve() -> None:
  """The zygote: preload, then fork a child per request line on stdin; report pids and exit codes on stdout."""
  import importlib  # pylint: disable=import-outside-toplevel
  atexit.register(_exit_without_teardown)  # registered first: runs last
  for name in PRELOAD:
    importlib.import_module(name)
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  assert not xla_bridge._backends, "a preloaded module started a JAX backend"  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  proto = os.dup(1)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)  # stray prints of the zygote never reach the protocol
  os.close(devnull)

  def send(msg: dict) -> None:
    os.write(proto, (json.dumps(msg) + "\n").encode())

  send({"ready": os.getpid()})
  buf = b""
  while True:
    ready, _, _ = select.select([0], [], [], 0.05)
    if ready:
      data = os.read(0, 1 << 16)
      if not data:
        return
      buf += data
      while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        req = json.loads(line)
        req["_proto_fd"] = proto
        pid = os.fork()
        if pid == 0:
          _child(req)
        send({"id": req["id"], "pid": pid})
    while True:
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if pid == 0:
        break
      send({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})


# ----------------------------------------------------------------------------- the client (the pytest worker)


def _env() -> dict[str, str]:
  from tests.conftest import subprocess_env  # pylint: disable=import-outside-toplevel
  return subprocess_env(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _jax_vars(env: dict[str, str]) -> dict[str, str]:
  return {k: v for k, v in env.items() if k.startswith("JAX_")}


class _Zygote:
  def __init__(self):
    self.env = _env()
    self.dir = tempfile.mkdtemp(prefix="alignjax_launchers_")  # the zygote's log, the children's outputs
    with open(os.path.join(self.dir, "zygote.log"), "wb") as log:
      self.proc = subprocess.Popen([sys.executable, "-m", "tests.launcher_zygote"], cwd=ROOT, env=self.env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    self.cond = threading.Condition()
    self.started: dict[int, int] = {}   # request id -> pid
    self.exited: dict[int, int] = {}    # pid -> returncode
    self.ready = False
    self.dead = False
    self.next_id = 0
    threading.Thread(target=self._read, daemon=True).start()
    with self.cond:
      self.cond.wait_for(lambda: self.ready or self.dead, timeout=300)
    if not self.ready:
      log = Path(self.dir, "zygote.log").read_text(errors="replace")[-2000:]
      self.close()
      raise RuntimeError(f"the launcher zygote did not start: {log}")

  def _read(self) -> None:
    for line in self.proc.stdout:
      msg = json.loads(line)
      with self.cond:
        if "ready" in msg:
          self.ready = True
        elif "id" in msg:
          self.started[msg["id"]] = msg["pid"]
          self.exited.pop(msg["pid"], None)  # an earlier child's entry under a reused pid
        else:
          self.exited[msg["pid"]] = msg["returncode"]
        self.cond.notify_all()
    with self.cond:
      self.dead = True
      self.cond.notify_all()

  def spawn(self, req: dict) -> int:
    with self.cond:
      if self.dead:
        raise RuntimeError("the launcher zygote exited")
      self.next_id += 1
      req = dict(req, id=self.next_id)
    self.proc.stdin.write((json.dumps(req) + "\n").encode())  # not under the lock the reader thread takes
    self.proc.stdin.flush()
    with self.cond:
      if not self.cond.wait_for(lambda: req["id"] in self.started or self.dead, timeout=60):
        raise RuntimeError("the launcher zygote did not fork")
      if self.dead:
        raise RuntimeError("the launcher zygote exited")
      return self.started.pop(req["id"])

  def returncode(self, pid: int, timeout: Optional[float]) -> Optional[int]:
    with self.cond:
      self.cond.wait_for(lambda: pid in self.exited or self.dead, timeout=timeout)
      return self.exited.get(pid)

  def close(self) -> None:
    try:
      self.proc.stdin.close()
    except OSError:
      pass
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    shutil.rmtree(self.dir, ignore_errors=True)


_zygote: Optional[_Zygote] = None
disabled: Optional[str] = "ALIGNJAX_TEST_ZYGOTE=0" if os.environ.get("ALIGNJAX_TEST_ZYGOTE") == "0" else None


def _get() -> Optional[_Zygote]:
  global _zygote, disabled
  if disabled:
    return None
  if _zygote is None or _zygote.dead:
    try:
      _zygote = _Zygote()
    except Exception as e:  # pylint: disable=broad-except
      disabled = str(e)  # real subprocesses from now on
      return None
    atexit.register(_zygote.close)
  return _zygote


class _Output:
  def __init__(self, path: str):
    self.path = path

  def read(self) -> str:
    return Path(self.path).read_text(errors="replace")


class Process:
  """A forked launcher, as much of ``subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)`` as tests use."""

  def __init__(self, zygote: _Zygote, args: list[str], pid: int, files: tuple[str, ...]):  # stdout[, stderr]
    self._zygote, self.args, self.pid, self._files = zygote, args, pid, files
    self.returncode: Optional[int] = None
    self.stdout, self.stderr = _Output(files[0]), (_Output(files[1]) if len(files) > 1 else None)

  def poll(self) -> Optional[int]:
    if self.returncode is None:
      self.returncode = self._zygote.returncode(self.pid, timeout=0)
    return self.returncode

  def wait(self, timeout: Optional[float] = None) -> int:
    if self.returncode is None:
      self.returncode = self._zygote.returncode(self.pid, timeout=timeout)
      if self.returncode is None:
        if self._zygote.dead:
          raise RuntimeError(f"the launcher zygote exited while {self.args} ran")
        raise subprocess.TimeoutExpired(self.args, timeout)
    return self.returncode

  def communicate(self, timeout: Optional[float] = None) -> tuple[str, str]:
    self.wait(timeout)
    out, err = self.stdout.read(), (self.stderr.read() if self.stderr is not None else None)
    for f in self._files:
      os.remove(f)
    return out, err

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def terminate(self) -> None:
    self.send_signal(signal.SIGTERM)


def _request(args: Sequence[str], cwd, env) -> Optional[dict]:
  args = [str(a) for a in args]
  # Not resolved through symlinks: another virtualenv's python (the same binary) has its own packages.
  if len(args) < 2 or os.path.abspath(args[0]) != os.path.abspath(sys.executable):
    return None
  env = dict(os.environ if env is None else env)
  if _jax_vars(env) != _jax_vars(_env()):
    return None
  module = code = None
  if args[1] == "-m" and len(args) > 2:
    module, argv = args[2], [args[2], *args[3:]]
  elif args[1] == "-c" and len(args) > 2:
    code, argv = args[2], ["-c", *args[3:]]
  elif not args[1].startswith("-") and args[1].endswith(".py"):
    argv = args[1:]
  else:
    return None
  return {"module": module, "code": code, "argv": argv, "cwd": os.path.abspath(cwd or os.getcwd()), "env": env}


def popen(args: Sequence[str], *, cwd=None, env: Optional[dict] = None, stderr_to_stdout: bool = False):
  """``subprocess.Popen(args, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE or STDOUT, text=True)``, forked."""
  req = _request(args, cwd, env)
  zygote = _get() if req is not None else None
  if zygote is None:
    return subprocess.Popen(list(map(str, args)), cwd=cwd, env=env, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.STDOUT if stderr_to_stdout else subprocess.PIPE)
  files = []
  for name in ("stdout",) if stderr_to_stdout else ("stdout", "stderr"):
    fd, path = tempfile.mkstemp(prefix=f"{name}_", dir=zygote.dir)
    os.close(fd)
    files.append(path)
  pid = zygote.spawn(dict(req, stdout=files[0], stderr=None if stderr_to_stdout else files[1]))
  return Process(zygote, list(map(str, args)), pid, tuple(files))


def run(args: Sequence[str], *, cwd=None, env: Optional[dict] = None, timeout: Optional[float] = None
        ) -> subprocess.CompletedProcess:
  """``subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``, forked."""
  p = popen(args, cwd=cwd, env=env)
  try:
    out, err = p.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
    raise
  return subprocess.CompletedProcess(list(map(str, args)), p.returncode, out, err)


if __name__ == "__main__":
  _serve()
