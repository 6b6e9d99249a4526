"""Runs that never lie and never lose work: one test per row of the reliability issue.

Each test reproduces the situation for real (a changed config on re-run, real
signals to a launcher subprocess, two launchers, damaged files, injected NaN)
and checks the observable outcome: exit code, a one-line message, which step is
resumed, what is on disk.
"""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alignjax.training import config as config_lib
from alignjax.training import loop
from alignjax.training import runtime as run_lib
from tests import launcher_zygote
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

TINY = {
    "data.train_examples": 64, "data.eval_examples": 16, "model.hidden_size": 16,
    "model.intermediate_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.head_dim": 8, "sft.steps": 0, "sft.warmup_steps": 1,
    "dpo.steps": 6, "dpo.warmup_steps": 1, "batch_size": 8, "eval_batch_size": 16,
    "log_every": 2, "checkpoint_every": 2,
}


def tiny(**overrides):
  return config_lib.build(None, **{**TINY, **overrides})


def flags(**overrides):
  """Command-line overrides of TINY; a value of None leaves the field at the launcher's default."""
  return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items() if v is not None]


def env():
  # The launcher subprocesses share the suite's persistent compilation cache (tests/conftest.py
  # exports its JAX_COMPILATION_CACHE_* settings).
  # One device is enough for the launcher.
  return subprocess_env(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def launch(*args, cwd=ROOT, timeout=300):
  return launcher_zygote.run([PY, "-m", "launch.train", *args], cwd=cwd, env=env(), timeout=timeout)


def start(*args, cwd=ROOT):
  return launcher_zygote.popen([PY, "-m", "launch.train", *args], cwd=cwd, env=env())


def error_lines(proc):
  return [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("W1", "I1"))]


def rows(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def steps_on_disk(workdir):
  return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def wait_for(predicate, proc, timeout=120):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"launcher exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


def logged_step(workdir):
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  return json.loads(lines[-1])["step"] if lines else 0


# Row 1: re-run with a different loss.name / seed -> refused with a diff, exit 2.
def test_changed_identity_is_refused_with_a_diff(tmp_path):
  wd = tmp_path / "run"
  loop.run(tiny(), workdir=str(wd))
  stored = (wd / "metrics.jsonl").read_text()
  proc = launch(f"--workdir={wd}", *flags(**{"loss.name": "ipo", "seed": 3}))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = error_lines(proc)
  assert "holds a run with a different config" in lines[0]
  assert lines[1:] == ["config.loss.name: stored 'dpo', given 'ipo'", "config.seed: stored 0, given 3"]
  assert "Traceback" not in proc.stderr
  assert (wd / "metrics.jsonl").read_text() == stored  # nothing touched
  assert json.loads((wd / "config.json").read_text())["loss.name"] == "dpo"
  # --fresh starts a new run in a new workdir and leaves the old one alone.
  result = loop.run(tiny(**{"loss.name": "ipo", "seed": 3, "dpo.steps": 2}), workdir=str(wd), fresh=True)
  assert result["workdir"] == str(tmp_path / "run-2")
  assert json.loads((tmp_path / "run-2" / "config.json").read_text())["loss.name"] == "ipo"
  assert (wd / "metrics.jsonl").read_text() == stored


# Rows 2, 8, 9, 10, 11: SIGKILL, SIGTERM, SIGINT mid-run, a second launcher refused while the run holds the
# workdir, and the re-run with the default budget through train.sh; every launch from another directory with
# relative paths, which resolve against the caller's cwd.
def test_signals_checkpoint_and_resume_with_the_stored_budget(tmp_path):
  wd = tmp_path / "myrun"
  where = ("--workdir=myrun", "--config.data.dir=mydata")  # relative to cwd=tmp_path
  long = {"dpo.steps": 100, "log_every": 5, "checkpoint_every": 1000}
  # A crash (SIGKILL) after rows were logged past the last checkpoint (there is none yet).
  p = start(*where, *flags(**long), cwd=tmp_path)
  wait_for(lambda: logged_step(wd) >= 10, p)
  p.kill()
  p.wait()
  killed = logged_step(wd)
  assert steps_on_disk(wd) == [] and killed >= 10
  p = start(*where, *flags(**long), cwd=tmp_path)
  # Rows the new run logged (it drops the crashed run's rows past its restored step 0), so it holds the lock.
  wait_for(lambda: logged_step(wd) >= max(20, killed + 5), p)
  # Row 9: a second launcher on the workdir is refused naming the holder's PID. The holder is paused
  # (SIGSTOP) meanwhile, so it cannot finish its budget first; a stopped process keeps its lock.
  p.send_signal(signal.SIGSTOP)
  try:
    second = launch(*where, *flags(), cwd=tmp_path)
  finally:
    p.send_signal(signal.SIGCONT)
  assert second.returncode == 2, second.stderr[-2000:]
  lines = error_lines(second)
  assert len(lines) == 1 and f"in use by process {p.pid}" in lines[0], lines
  # SIGTERM: finishes the step, writes a checkpoint, exits 143 with no traceback.
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 143, err[-2000:]
  assert "Traceback" not in err and "re-run the same command to resume" in out + err
  term_step = steps_on_disk(wd)[-1]
  assert term_step >= 20 and "resumed" not in out
  # The lock died with its holder: the workdir is usable again.
  with run_lib.WorkdirLock(str(wd)):
    pass
  # SIGINT (Ctrl-C): the same, exit 130, no traceback.
  p = start(*where, *flags(**long), cwd=tmp_path)
  wait_for(lambda: logged_step(wd) >= term_step + 10, p)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 130, err[-2000:]
  assert "Traceback" not in err and f"resumed from step {term_step} of 100" in out
  int_step = steps_on_disk(wd)[-1]
  assert int_step >= term_step + 10
  # Re-run through train.sh with the default budget (dpo.steps not given, default 200): resumes with the
  # stored 100.
  proc = subprocess.run([str(ROOT / "train.sh"), "train", *where, *flags(**{**long, "dpo.steps": None})],
                        cwd=tmp_path, env=dict(env(), ALIGNJAX_SKIP_BOOTSTRAP="1"), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"resumed from step {int_step} of 100" in proc.stdout
  # The launcher's main job (moved from tests/test_launch.py): progress lines and the closing summary.
  assert "held-out preference accuracy" in proc.stdout
  assert "steps/s" in proc.stdout and "tok/s" in proc.stdout and "MFU" in proc.stdout and "ETA" in proc.stdout
  final = json.loads((wd / "final_metrics.json").read_text())
  assert final["steps"] == 100 and final["resumed_from"] == int_step
  # Row 10: exactly one row per logged step after a crash and two resumes.
  assert [r["step"] for r in rows(wd)] == list(range(5, 101, 5))
  # Row 11: the relative workdir and data dir are the caller's, never the repository's.
  assert (tmp_path / "mydata").is_dir() and (wd / "checkpoints").is_dir()
  assert not (ROOT / "myrun").exists() and not (ROOT / "mydata").exists()


# Row 3: damaged latest checkpoint -> warning, resume from the newest readable step.
# Also: extending the step budget is allowed and recorded.
def test_damaged_latest_checkpoint_falls_back(tmp_path, capfd):
  wd = tmp_path / "run"
  loop.run(tiny(**{"max_checkpoints": 3}), workdir=str(wd))
  assert steps_on_disk(wd) == [2, 4, 6]
  for f in (wd / "checkpoints" / "6").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:5])
  capfd.readouterr()
  result = loop.run(tiny(**{"max_checkpoints": 3, "dpo.steps": 8}), workdir=str(wd))
  err = capfd.readouterr().err
  assert "checkpoint step 6" in err and "falling back to step 4" in err
  assert result["resumed_from"] == 4 and result["steps"] == 8
  assert steps_on_disk(wd) == [4, 6, 8] and (wd / "checkpoints" / "6.damaged").exists()
  assert [r["step"] for r in rows(wd)] == [2, 4, 6, 8]
  # The logged rate follows optax's schedule over the first budget (6 steps), then over the extended one (8).
  import optax
  lr = TINY.get("dpo.learning_rate", config_lib.RunConfig().dpo.learning_rate)
  schedule = lambda total: optax.warmup_cosine_decay_schedule(0.0, lr, 1, total, end_value=0.1 * lr)
  want = [float(schedule(6)(1)), float(schedule(6)(3)), float(schedule(8)(5)), float(schedule(8)(7))]
  np.testing.assert_allclose([r["learning_rate"] for r in rows(wd)], want, rtol=1e-6)
  history = json.loads((wd / "checkpoints" / "run.json").read_text())["history"]
  assert history[-1] == {"event": "budget", "step": 4, "total": 8, "dpo.steps": [6, 8]}
  assert result["budget_history"] == history


class _Inject:
  """Wraps the batch pipeline: adds `inject` (NaN at `step`, else 0) to every batch."""

  def __init__(self, ds, step):
    self.ds, self.step = ds, step

  def __getitem__(self, i):
    batch = dict(self.ds[i])
    batch["inject"] = np.float32(np.nan if i == self.step else 0.0)
    return batch


def _inject_nan(monkeypatch, at_step):
  import dataclasses
  import alignjax.data as data
  from alignjax.training import algorithms
  from alignjax.training.algorithms import base
  real_batches, real = data.preference_batches, algorithms.get("dpo")
  monkeypatch.setattr(data, "preference_batches", lambda *a, **k: _Inject(real_batches(*a, **k), at_step))

  def fn(hp, ctx, batch):
    out = real.objective(hp, ctx, {k: v for k, v in batch.items() if k != "inject"})
    return out._replace(losses=out.losses + batch.get("inject", 0.0))
  monkeypatch.setitem(base._REGISTRY, "dpo", dataclasses.replace(real, objective=fn))


# Row 4: NaN between log steps (checkpoint_every < log_every) -> stop, nothing non-finite saved.
def test_nan_between_log_steps_stops_before_saving(tmp_path, monkeypatch):
  from alignjax.training.checkpoint import Checkpointer
  wd = tmp_path / "run"
  _inject_nan(monkeypatch, at_step=6)  # the 7th step, between logs at 5 and 10
  cfg = tiny(**{"dpo.steps": 10, "log_every": 5, "checkpoint_every": 1, "max_checkpoints": 2})
  with pytest.raises(run_lib.TrainingFailed, match="non-finite .* at step 7") as info:
    loop.run(cfg, workdir=str(wd))
  assert info.value.step == 7
  assert steps_on_disk(wd) == [5, 6]  # good checkpoints kept, step 7 never written
  ckpt = Checkpointer(str(wd / "checkpoints"))
  meta = ckpt._manager.restore(6)  # raw arrays as saved
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(meta)]
  assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")
  ckpt.close()
  # With on_nonfinite=skip the update is skipped and counted (no checkpoint needed but the last).
  result = loop.run(config_lib.replace(cfg, on_nonfinite="skip", checkpoint_every=100),
                    workdir=str(tmp_path / "skip"))
  last = rows(tmp_path / "skip")[-1]
  assert result["skipped_updates"] == 1 and last["skipped_updates"] == 1.0
  assert all(math.isfinite(v) for k, v in last.items() if k != "phase")


# Rows 4-5 through the launcher: divergence (lr=1e3) -> exit 3, one line.
def test_divergence_exits_nonzero(tmp_path):
  proc = launch(f"--workdir={tmp_path}", *flags(**{"dpo.learning_rate": 1e3, "dpo.steps": 30,
                                                   "max_loss": 100.0}))
  assert proc.returncode == run_lib.EXIT_TRAINING_FAILED, proc.stderr[-2000:]
  lines = error_lines(proc)
  assert len(lines) == 1 and ("diverged" in lines[0] or "non-finite" in lines[0]), lines
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "final_metrics.json").exists()


# Rows 6-7: invalid fields -> one line, exit 2, before any data or model work.
@pytest.mark.parametrize("field, value, message", [
    ("loss.beta", -0.1, "config.loss.beta must be a finite number > 0"),
    ("loss.label_smoothing", 2, "config.loss.label_smoothing must satisfy 0 <= eps < 0.5"),
    ("loss.alpha", -5, "config.loss.alpha must be a finite number >= 0"),
    ("dpo.learning_rate", -1e-3, "config.dpo.learning_rate must be a finite number > 0"),
    ("max_checkpoints", 0, "config.max_checkpoints must be >= 1"),
    ("loss.name", "dpoo", "unknown loss 'dpoo'; valid loss names: aligndistil, "),
    ("batch_size", 0, "config.batch_size must be positive"),
    ("seed", 2**32, "config.seed must be in [0, 2**32)"),
])
def test_invalid_config_field_is_one_line(field, value, message):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.build(None, **{field: value})
  assert message in str(info.value) and "\n" not in str(info.value)


def test_invalid_config_exits_2_before_any_work(tmp_path):
  for field, value in [("loss.beta", -0.1)]:
    proc = launch(f"--workdir={tmp_path / 'run'}", f"--config.{field}={value}")
    assert proc.returncode == 2
    assert error_lines(proc) == [error_lines(proc)[0]] and f"config.{field}" in proc.stderr
    assert not (tmp_path / "run").exists()
  bad_flag = launch(f"--workdir={tmp_path / 'run'}", "--config.loss.bta=1")
  assert bad_flag.returncode == 2 and len(error_lines(bad_flag)) == 1, bad_flag.stderr
  (tmp_path / "file").write_text("")
  bad_cache = launch(f"--workdir={tmp_path / 'run'}", f"--compilation_cache={tmp_path / 'file' / 'cache'}")
  assert bad_cache.returncode == 2 and len(error_lines(bad_cache)) == 1, bad_cache.stderr
  assert "--compilation_cache: cannot create the directory" in bad_cache.stderr
  assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_structure_exits_2_and_is_kept(tmp_path, monkeypatch):
  """A workdir whose checkpoints an older alignjax wrote (here: the plain optax AdamW state, before the
  schedule's values moved into the optimizer state) gets a one-line error, not a traceback, and stays as it was."""
  import optax
  wd = tmp_path / "run"
  monkeypatch.setattr(loop, "optimizer", lambda phase, *, weight_decay, decay=None: optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, phase.learning_rate, 1, 10), weight_decay=weight_decay))
  loop.run(tiny(), workdir=str(wd), handle_signals=False)
  monkeypatch.undo()
  files = lambda: {p: p.read_bytes() for p in wd.rglob("*") if p.is_file() and p.name != ".lock"}   # (holder's PID)
  before = files()
  proc = launch(f"--workdir={wd}", *flags(**{"dpo.steps": 8}))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = error_lines(proc)
  assert len(lines) == 1 and "does not match" in lines[0] and "--fresh" in lines[0], lines
  assert "Traceback" not in proc.stderr
  assert files() == before


def test_compilation_cache_stores_programs_and_turns_off(tmp_path, monkeypatch):
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  threshold = "jax_persistent_cache_min_compile_time_secs"
  saved = {name: getattr(jax.config, name)
           for name in ("jax_enable_compilation_cache", "jax_compilation_cache_dir", threshold)}
  try:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert run_lib.default_compilation_cache() == str(tmp_path / "xdg" / "alignjax" / "jax_compilation_cache")
    # JAX's default threshold (1 s) would leave this millisecond program out; the launchers store every program.
    jax.config.update(threshold, 1.0)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    assert run_lib.enable_compilation_cache(str(tmp_path / "cache")) == str(tmp_path / "cache")
    assert getattr(jax.config, threshold) == 0.0
    compilation_cache.reset_cache()
    x = np.float32(np.pi)   # a program no other test compiles
    assert float(jax.jit(lambda a: a * 3.0 - 0.25)(x)) == pytest.approx(3 * np.pi - 0.25)
    assert any((tmp_path / "cache").iterdir())
    # A threshold the user set through JAX's environment variable is kept.
    jax.config.update(threshold, 5.0)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "5")
    run_lib.enable_compilation_cache(str(tmp_path / "cache"))
    assert getattr(jax.config, threshold) == 5.0
    assert run_lib.enable_compilation_cache("") is None and not jax.config.jax_enable_compilation_cache
    assert run_lib.enable_compilation_cache() is None    # turned off: the default leaves it off
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


# Row 12: --help lists the config fields with defaults and the loss names.
def test_help_lists_fields_and_loss_names():
  proc = launch("--help")
  assert proc.returncode == 0
  text = proc.stdout + proc.stderr
  for field, default in config_lib.flatten(config_lib.RunConfig()).items():
    assert f"--config.{field}" in text and repr(default) in text, field
  for name in config_lib.loss_names():
    assert name in text
  assert "--workdir" in text and "--fresh" in text
  short = launch("--config_help")
  assert short.returncode == 0 and "--config.loss.beta" in short.stdout and "tdpo2" in short.stdout
