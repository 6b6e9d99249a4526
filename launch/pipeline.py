r"""The AlignDistil pipeline launcher: SFT -> DPO, reverse DPO -> off-/on-policy AlignDistil.

Every training stage is a ``loop.run`` call with the config that
``launch/train.py --config=configs/aligndistil.py:<stage>`` builds, in
``<workdir>/<stage>``; each stage's checkpoint is the next one's input. After
each stage the gold reward and KL(pi || pi_SFT) on held-out prompts are printed
and written to ``results.jsonl`` / ``results.md``. Re-running the same command
skips finished stages and resumes a partial one.

  python -m launch.pipeline                                             # embedded default
  python -m launch.pipeline --config=configs/aligndistil.py:test --workdir=runs/aligndistil_test
  python -m launch.pipeline --config.beta2_offpolicy=5 --stages=sft,dpo   # stop after DPO
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags

from launch import common

ROOT = Path(__file__).resolve().parents[1]

_CONFIG = common.define_config_file(
    "config", str(ROOT / "configs" / "aligndistil.py"),
    "Pipeline configuration file (fields of alignjax.study.aligndistil.PipelineConfig).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/aligndistil", "Directory for data sets, stage runs, evaluations, results.")
_STAGES = flags.DEFINE_list("stages", [], "Run the stages up to the last of these (default: all): "
                            "data, sft, preferences, dpo, rdpo, offpolicy, onpolicy.")


def main(argv):
  del argv
  from alignjax.study import aligndistil as pipeline  # pylint: disable=import-outside-toplevel
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel
  from alignjax.training import run as run_lib  # pylint: disable=import-outside-toplevel

  try:
    cd = _CONFIG.value
    cd.to_dict()
  except Exception as e:  # pylint: disable=broad-except  # unreadable config file
    raise pipeline.PipelineError(f"--config: {' '.join(str(e).split())}") from e
  cfg = pipeline.build(cd)
  workdir = os.path.abspath(_WORKDIR.value)

  def train(run_cfg, *, workdir):
    return loop.run(run_cfg, workdir=workdir, writer=run_lib.metrics_writer(workdir))

  result = pipeline.run_pipeline(cfg, workdir=workdir, train_fn=train, stages=tuple(_STAGES.value) or None)
  print(f"results: {result['table']}", file=sys.stdout, flush=True)
  return 0


if __name__ == "__main__":
  common.run(main)
