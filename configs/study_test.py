"""A test-sized frontier study (CI, the Colab notebook): one method of every kind at one beta, DPO at two.

The kinds: DPO (and DeRa over it), a swept method (TDPO2), an unpaired one
(KTO), one with a derived data set (critical-token cDPO), two distilled from
shared teachers (AlignDistil, both position conventions), the GenARM ARM and
the reward model of the decoding points (best-of-N, ARGS, GenARM). The same
stages and library calls as ``configs/study.py``, which runs every method.
"""

import dataclasses

import ml_collections

from alignjax.study import frontier

TEST = dict(
    sft_examples=512, sft_steps=100, sft_learning_rate=5e-3,
    preference_prompts=128, samples_per_prompt=4,
    betas=(0.5,), dpo_betas=(0.05,), steps=30, learning_rate=3e-3,
    dera_lambdas=(0.0, 1.0, 2.0), eval_prompts=32, eval_samples=4,
    methods=("dpo", "tdpo2", "kto", "critical_tokens", "genarm", "aligndistil", "aligndistil_authors"),
    best_of_n=(2, 8), args_weights=(0.0, 2.0), genarm_alphas=(0.0, 1.0),
)


def get_config():
  cfg = frontier.build(None, **TEST)
  return ml_collections.ConfigDict({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
