r"""One training run (``alignjax.training.loop.run``): optional SFT warm-up, then a preference loss.

Orbax checkpoints in --workdir; re-running with the same --workdir resumes (a different config is
refused; --fresh starts a new run in <workdir>-N). Relative paths resolve against the cwd.

  python -m launch.train                                   # embedded default (configs/dpo_tiny.py)
  python -m launch.train --config.loss.name=tdpo2 --config.loss.alpha=0.5 --workdir=runs/tdpo2
  python -m launch.train --config_help                     # every config field, loss names
"""

import os
import sys
from pathlib import Path

from absl import flags

from launch import common

_CONFIG = common.define_config_file("config", str(Path(__file__).resolve().parents[1] / "configs" / "dpo_tiny.py"),
                                    "Training configuration file (see --config_help).")
_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/dpo_tiny", "Directory for checkpoints, metrics.jsonl, TensorBoard events and final_metrics.json.")
_FRESH = flags.DEFINE_bool("fresh", False, "If --workdir holds a run, start a new run in <workdir>-N instead.")


def main(argv):
  del argv
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel
  cfg = common.build_config(_CONFIG)
  workdir = os.path.abspath(_WORKDIR.value)
  if _FRESH.value and (new := loop.fresh_workdir(workdir)) != workdir:
    print(f"--fresh: {workdir} holds another run (left untouched); starting a new run in {new}", file=sys.stderr)
    workdir = new
  loop.run(cfg, workdir=workdir, explicit=common.explicit_fields(_CONFIG))  # metrics: run.metrics_writer(workdir)
  return 0


if __name__ == "__main__":
  common.run(main)
