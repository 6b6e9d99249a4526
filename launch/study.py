r"""The reward--KL frontier study: SFT, sampled preferences, a sweep of methods, DeRa, a plot.

Every training run is a ``loop.run`` call with the config a ``launch/train.py``
call would build (each resumable in ``<workdir>/runs/<name>``); re-running the
same command skips finished runs and evaluations. Writes ``results.jsonl``,
``results.md`` and ``frontier.png`` to --workdir and prints where they are.

  python -m launch.study                                       # embedded default (CPU, minutes)
  python -m launch.study --config=configs/study_test.py --workdir=runs/study_test
  python -m launch.study --config.betas='(0.05,0.2,1.0)' --config.methods='("dpo","ipo","tdpo2")'
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags

from launch import common

ROOT = Path(__file__).resolve().parents[1]

_CONFIG = common.define_config_file(
    "config", str(ROOT / "configs" / "study.py"), "Study configuration file (fields of alignjax.study.frontier.StudyConfig).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "Directory for data sets, runs, evaluations, results and the plot.")


def main(argv):
  del argv
  from alignjax.study import frontier  # pylint: disable=import-outside-toplevel
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel
  from alignjax.training import run as run_lib  # pylint: disable=import-outside-toplevel

  try:
    cd = _CONFIG.value
    cd.to_dict()
  except Exception as e:  # pylint: disable=broad-except  # unreadable config file
    raise frontier.StudyError(f"--config: {' '.join(str(e).split())}") from e
  cfg = frontier.build(cd)
  workdir = os.path.abspath(_WORKDIR.value)

  def train(run_cfg, *, workdir):
    return loop.run(run_cfg, workdir=workdir, writer=run_lib.metrics_writer(workdir))

  result = frontier.run_study(cfg, workdir=workdir, train_fn=train)
  print(f"plot: {result['plot']}", file=sys.stdout, flush=True)
  return 0


if __name__ == "__main__":
  common.run(main)
