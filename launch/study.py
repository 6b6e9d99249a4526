r"""The reward--KL frontier study (``alignjax.study.frontier.run_study``).

SFT, sampled preferences, a sweep of methods (each a ``launch/train.py``-equivalent run, resumable in
``<workdir>/runs/<name>``), DeRa; writes ``results.jsonl``, ``results.md`` and ``frontier.png``.
Re-running the same command skips finished runs and evaluations.

  python -m launch.study                                       # embedded default (CPU, minutes)
  python -m launch.study --config=configs/study_test.py --workdir=runs/study_test
  python -m launch.study --config.betas='(0.05,0.2,1.0)' --config.methods='("dpo","ipo","tdpo2")'
"""

from pathlib import Path

from absl import flags

from launch import common

_CONFIG = common.define_config_file("config", str(Path(__file__).resolve().parents[1] / "configs" / "study.py"),
                                    "Study configuration file (fields of alignjax.study.frontier.StudyConfig).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "Directory for data sets, runs, evaluations, results and the plot.")


def main(argv):
  del argv
  from alignjax.study import frontier  # pylint: disable=import-outside-toplevel
  cfg = frontier.build(common.read_config(_CONFIG, frontier.StudyError))
  result = frontier.run_study(cfg, workdir=_WORKDIR.value)
  print(f"plot: {result['plot']}", flush=True)
  return 0


if __name__ == "__main__":
  common.run(main, help_fn=common.field_help("alignjax.study.frontier", "StudyConfig"))
