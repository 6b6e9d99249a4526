r"""A beta sweep's compile reuse: the frontier study with JAX's persistent compilation cache off, cold and warm.

  python bench/study_compile.py                              # DPO, IPO, TDPO2 at the default betas
  python bench/study_compile.py --methods=dpo,ipo --betas=0.1,0.5,1.0

The train and eval steps take the loss's float hyper-parameters (beta, TDPO's alpha, ...)
as inputs, so the runs of a sweep that differ only in them are one program, and every
launcher keeps JAX's persistent compilation cache (``--compilation_cache``). Five runs of
``launch/study.py`` on one small study (SFT, the methods at ``--betas``, DPO also at the
study's ``dpo_betas``, DeRa; no reward model or GenARM), each in a fresh process and workdir:

* ``cache off`` (the peer: ``--compilation_cache=``, as before the cache): every run
  compiles its own train and eval steps;
* ``cache, cold``: an empty cache directory; the second and later betas of a method load
  the first one's programs;
* ``cache, warm``: the same directory again (a rerun, another workdir, or a resumed study);
* ``1 s threshold, cold`` / ``warm``: the same two with JAX's default
  ``jax_persistent_cache_min_compile_time_secs`` of 1 s (the launchers before they stored
  every program), in a directory of their own: the eval steps and optimizer inits of these
  small models compile in under 1 s, so every run compiled them again.

It prints wall and CPU seconds, each as a ratio to the peer, and checks that the five
results tables are identical. Figures depend on the machine and its load; compare rows of
one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _study(workdir: str, cache: str, methods: str, betas: str, threshold: str | None) -> tuple[float, float]:
  """Wall and CPU seconds of one ``launch.study`` subprocess."""
  names = ",".join(f'"{m}"' for m in methods.split(","))
  cmd = [sys.executable, "-m", "launch.study", f"--workdir={workdir}", f"--compilation_cache={cache}",
         f"--config.methods=({names},)", f"--config.betas=({betas},)", "--config.genarm_alphas=()",
         "--config.best_of_n=()", "--config.args_weights=()"]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
  if threshold is not None:
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = threshold
  cpu, t = _cpu_seconds(), time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
  if proc.returncode:
    sys.exit(f"launch.study failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return wall, cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", default="dpo,ipo,tdpo2", help="study methods, comma-separated")
  parser.add_argument("--betas", default="0.1,0.5", help="the sweep's betas, comma-separated")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="study_compile_") as tmp:
    cache, cache_1s = os.path.join(tmp, "cache"), os.path.join(tmp, "cache_1s")
    rows = []
    runs = (("cache off (peer)", "", "off", None), ("cache, cold", cache, "cold", None),
            ("cache, warm", cache, "warm", None), ("1 s threshold, cold", cache_1s, "cold_1s", "1"),
            ("1 s threshold, warm", cache_1s, "warm_1s", "1"))
    for label, cache_dir, workdir, threshold in runs:
      wall, cpu = _study(os.path.join(tmp, workdir), cache_dir, args.methods, args.betas, threshold)
      entries = len(os.listdir(cache_dir)) if cache_dir and os.path.isdir(cache_dir) else 0
      rows.append((label, wall, cpu, entries))
      print(f"  {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    tables = {(Path(tmp) / run[2] / "results.md").read_text() for run in runs}
  print(f"study: methods {args.methods}, betas {args.betas} (DPO also at the study's dpo_betas), DeRa; "
        f"{os.cpu_count()} CPUs")
  print("| run | wall s | vs peer | CPU s | vs peer | cache entries |")
  print("|---|---|---|---|---|---|")
  for label, wall, cpu, entries in rows:
    print(f"| {label} | {wall:.1f} | {wall / rows[0][1]:.2f}x | {cpu:.1f} | {cpu / rows[0][2]:.2f}x | {entries} |")
  print("results tables identical:", len(tables) == 1)


if __name__ == "__main__":
  main()
