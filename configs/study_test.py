"""A test-sized frontier study (CI, the Colab notebook): every method at one beta, DPO at two.

Under two minutes on 2 CPU cores; the same stages and library calls as
``configs/study.py``.
"""

import dataclasses

import ml_collections

from alignjax.study import frontier

TEST = dict(
    sft_examples=512, sft_steps=100, sft_learning_rate=5e-3,
    preference_prompts=128, samples_per_prompt=4,
    betas=(0.5,), dpo_betas=(0.05,), steps=30, learning_rate=3e-3,
    dera_lambdas=(0.0, 1.0, 2.0), eval_prompts=32, eval_samples=4,
)


def get_config():
  cfg = frontier.build(None, **TEST)
  return ml_collections.ConfigDict({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
