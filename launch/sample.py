r"""Sample completions for a JSONL file of prompts (``alignjax.decoding.files.sample_file``).

  python -m launch.sample --config.model=/path/hf_dir --config.prompts=prompts.jsonl \
      --config.output=completions.jsonl --config.max_new_tokens=64 --config.temperature=0.7

Fields: ``configs/sample.py`` (--config_help). Exit codes: 0 finished; 1 a bug (traceback);
2 user error (a bad flag, config field, file, prompt or sampling argument), one line on stderr.
"""

from pathlib import Path

from launch import common

_CONFIG = common.define_config_file("config", str(Path(__file__).resolve().parents[1] / "configs" / "sample.py"),
                                    "Sampling configuration (see configs/sample.py).")


def main(argv):
  del argv
  from alignjax import configs  # pylint: disable=import-outside-toplevel
  from alignjax.decoding import files  # pylint: disable=import-outside-toplevel
  cfg = configs.build_dataclass(files.SampleConfig, common.read_config(_CONFIG, files.SampleError),
                                error=files.SampleError, hint=" (see configs/sample.py)")
  stats = files.sample_file(cfg)
  print(f"wrote {stats['written']} completions ({stats['finished']} ended with EOS) to {cfg.output}")
  return 0


if __name__ == "__main__":
  common.run(main, help_fn=common.field_help("alignjax.decoding.files", "SampleConfig"))
