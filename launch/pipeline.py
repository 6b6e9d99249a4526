r"""The AlignDistil pipeline (``alignjax.study.aligndistil.run_pipeline``).

SFT -> DPO, reverse DPO -> off-/on-policy AlignDistil; each stage is the run of ``launch/train.py
--config=configs/aligndistil.py:<stage>`` in ``<workdir>/<stage>``, evaluated after it (gold reward,
KL to SFT: ``results.jsonl``, ``results.md``). Re-running skips finished stages, resumes a partial one.

  python -m launch.pipeline --config=configs/aligndistil.py:test --workdir=runs/aligndistil_test
  python -m launch.pipeline --config.beta2_offpolicy=5 --stages=sft,dpo   # stop after DPO
"""

from pathlib import Path

from absl import flags

from launch import common

_CONFIG = common.define_config_file("config", str(Path(__file__).resolve().parents[1] / "configs" / "aligndistil.py"),
                                    "Pipeline configuration file (fields of alignjax.study.aligndistil.PipelineConfig).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/aligndistil", "Directory for data sets, stage runs, evaluations, results.")
_STAGES = flags.DEFINE_list("stages", [], "Run the stages up to the last of these (default: all): "
                            "data, sft, preferences, dpo, rdpo, offpolicy, onpolicy.")


def main(argv):
  del argv
  from alignjax.study import aligndistil  # pylint: disable=import-outside-toplevel
  cfg = aligndistil.build(common.read_config(_CONFIG, aligndistil.PipelineError))
  result = aligndistil.run_pipeline(cfg, workdir=_WORKDIR.value, stages=tuple(_STAGES.value) or None)
  print(f"results: {result['table']}", flush=True)
  return 0


if __name__ == "__main__":
  common.run(main, help_fn=common.field_help("alignjax.study.aligndistil", "PipelineConfig"))
