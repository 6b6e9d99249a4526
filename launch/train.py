r"""Preference-optimisation launcher.

Runs supervised warm-up (optional) and then a preference loss (DPO, cDPO,
robust DPO, any GPO function, TDPO1/TDPO2) on the generated sorting
preference set, with Orbax checkpoints in --workdir. Re-running with the
same --workdir resumes from the latest readable checkpoint (a run with a
different config is refused; --fresh starts a new run in a new workdir).
Relative paths resolve against the current directory.

  python -m launch.train                                   # embedded default
  python -m launch.train --config.loss.name=tdpo2 --config.loss.alpha=0.5 --workdir=runs/tdpo2
  python -m launch.train --config_help                     # every config field, loss names
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags

from launch import common

ROOT = Path(__file__).resolve().parents[1]

_CONFIG = common.define_config_file(
    "config", str(ROOT / "configs" / "dpo_tiny.py"), "Training configuration file (see --config_help).")
_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/dpo_tiny", "Directory for checkpoints, metrics.jsonl, TensorBoard events and final_metrics.json.")
_FRESH = flags.DEFINE_bool(
    "fresh", False, "If --workdir holds a run, start a new run in <workdir>-N instead of resuming it.")


def main(argv):
  del argv
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel
  from alignjax.training import run as run_lib  # pylint: disable=import-outside-toplevel

  cfg = common.build_config(_CONFIG)
  workdir = os.path.abspath(_WORKDIR.value)
  if _FRESH.value:
    new = loop.fresh_workdir(workdir)
    if new != workdir:
      print(f"--fresh: {workdir} holds another run (left untouched); starting a new run in {new}", file=sys.stderr)
    workdir = new
  loop.run(cfg, workdir=workdir, writer=run_lib.metrics_writer(workdir), explicit=common.explicit_fields(_CONFIG))
  return 0


if __name__ == "__main__":
  common.run(main)
