"""The generated sorting preference set as a TFDS dataset in array_record files.

Built once per configuration into ``data_dir`` (no TensorFlow needed: TFDS
writes array_record shards into an ``incomplete.*`` directory and renames it
into place when done), then read back as random-access data sources that grain
pipelines index directly.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from alignjax.data.files import LocalBuilder, LocalDatasetInfo, make_builder, preference_features
from alignjax.data.synthetic import SortingTask


@dataclasses.dataclass
class SortingPreferencesConfig(tfds.core.BuilderConfig):
  num_symbols: int = 10
  min_len: int = 3
  max_len: int = 8
  train_examples: int = 2048
  eval_examples: int = 256
  seed: int = 0


class SortingPreferences(LocalBuilder):
  """Pairs of (sorted, corrupted) responses to digit-sorting prompts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [SortingPreferencesConfig(name="default")]

  @property
  def task(self) -> SortingTask:
    c = self.builder_config
    return SortingTask(c.num_symbols, c.min_len, c.max_len)

  def _info(self) -> tfds.core.DatasetInfo:
    return LocalDatasetInfo(
        builder=self,
        description=__doc__,
        features=preference_features(self.task.seq_len),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {
        "train": self._generate_examples(c.train_examples, c.seed),
        "eval": self._generate_examples(c.eval_examples, c.seed + 1),
    }

  def _generate_examples(self, num_examples: int, seed: int):
    data = self.task.generate(num_examples, seed)
    for i in range(num_examples):
      yield i, {k: v[i] for k, v in data.items()}


def config_name(task: SortingTask, train_examples: int, eval_examples: int, seed: int) -> str:
  return (
      f"sym{task.num_symbols}_len{task.min_len}-{task.max_len}_"
      f"n{train_examples}-{eval_examples}_seed{seed}"
  )


def sorting_preferences(
    task: SortingTask, *, train_examples: int, eval_examples: int, seed: int, data_dir: str
):
  """Builds (if needed) and opens the data set; returns ``(train, eval)`` data sources.

  Each source supports ``len()`` and ``source[i] -> dict of arrays``.
  """
  config = SortingPreferencesConfig(
      name=config_name(task, train_examples, eval_examples, seed),
      num_symbols=task.num_symbols, min_len=task.min_len, max_len=task.max_len,
      train_examples=train_examples, eval_examples=eval_examples, seed=seed,
  )
  builder = make_builder(SortingPreferences, config=config, data_dir=data_dir, file_format="array_record")
  tfds.disable_progress_bar()
  builder.download_and_prepare()
  return builder.as_data_source(split="train"), builder.as_data_source(split="eval")
