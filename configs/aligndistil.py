r"""The AlignDistil pipeline (Zhang et al. 2025, arXiv:2503.02832): SFT -> DPO, reverse DPO -> distillation.

``get_config(arg)``, with ``arg`` after the colon of ``--config=configs/aligndistil.py:<arg>``:

* ``""`` (no colon) or ``"test"``: the whole pipeline, a
  :class:`alignjax.study.aligndistil.PipelineConfig`, for ``launch/pipeline.py``
  (``test``: the test-sized pipeline the tests and the Colab notebook run, ~1-2 min on 2 CPU cores);
* ``"<stage>"`` or ``"test-<stage>"`` with ``<stage>`` one of ``sft``, ``dpo``, ``rdpo``,
  ``offpolicy``, ``onpolicy``: that stage's training config for ``launch/train.py``, whose
  input runs and data sets live under ``runs/aligndistil`` (``runs/aligndistil_test``).

  python -m launch.pipeline --config=configs/aligndistil.py --workdir=runs/aligndistil
  python -m launch.pipeline --config=configs/aligndistil.py:test --workdir=runs/aligndistil_test
  # one stage at a time (the data sets come from launch.pipeline's data/preferences stages):
  python -m launch.train --config=configs/aligndistil.py:offpolicy --workdir=runs/aligndistil/offpolicy

Defaults follow the authors' scripts: beta = 0.1 (the DPO models' beta), beta2 = 10
off-policy and 15 on-policy, tau = 1, length-normalised; off-policy data are the chosen
responses of the preference set, on-policy one student sample per prompt (temperature 1,
top-p 1). The test size uses beta = 0.5 and beta2 = 1 / 1.5 (see TEST).
"""

import dataclasses

import ml_collections

from alignjax.study import aligndistil as pipeline
from alignjax.training import config as config_lib

# Test-sized pipeline. The tiny DPO and reverse-DPO models end up far apart
# (sum_v |p_d - p_c| ~ 1.1 per token at beta = 0.5, ~1.35 at beta = 0.1), where the
# authors' LLMs differ by ~0.1: at beta2 = 10 the weight w_t ~ 11-14 makes the teacher
# z_d + w_t (z_d - z_c) degenerate (the student learns to stop at once). beta2 is scaled
# by 1/10 (1 off-policy, 1.5 on-policy, the authors' 10:15) so that w_t ~ 1-2, the
# authors' regime; beta = 0.5 keeps the two DPO models closer.
TEST = dict(
    sft_examples=512, sft_steps=120, sft_learning_rate=5e-3,
    preference_prompts=128, samples_per_prompt=4,
    beta=0.5, dpo_steps=40, dpo_learning_rate=2e-3,
    beta2_offpolicy=1.0, beta2_onpolicy=1.5,
    distill_steps=40, onpolicy_steps=40, distill_learning_rate=1e-3,
    eval_prompts=32, eval_samples=4,
)

ROOTS = {"": "runs/aligndistil", "test": "runs/aligndistil_test"}


def _pipeline(size: str) -> pipeline.PipelineConfig:
  return pipeline.build(None, **(TEST if size == "test" else {}))


def get_config(arg: str = ""):
  size, _, stage = arg.rpartition("-") if "-" in arg else ("", "", arg)
  if stage in ("", "test") and not size:
    cfg = _pipeline(stage)
    return ml_collections.ConfigDict({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
  if size not in ROOTS or stage not in pipeline.TRAIN_STAGES:
    raise ValueError(f"configs/aligndistil.py: unknown argument {arg!r}; expected '', 'test', "
                     f"'<stage>' or 'test-<stage>' with <stage> in {list(pipeline.TRAIN_STAGES)}.")
  fields = pipeline.stage_fields(_pipeline(size), stage, ROOTS[size])
  # Not validated here: the input runs may not exist yet; launch/train.py validates (and refuses).
  cd = config_lib.to_config_dict()
  for k, v in fields.items():
    node = cd
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return cd
