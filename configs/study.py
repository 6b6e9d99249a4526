"""The reward--KL frontier study (``launch/study.py``), embedded default: minutes on 2 CPU cores.

SFT of a ``llama_tiny`` model on generated reviews, preference pairs sampled
from it and labelled by the gold reward, then every study method of the
algorithm registry (DPO, cDPO, the GPO functions, TDPO1/2, KTO, SimPO, ORPO,
SparsePO with learned and with fixed masks, critical-token cDPO, AlignDistil
with both position conventions; the GenARM ARM and a reward model are trained
for decoding) at ``betas`` (DPO also at ``dpo_betas``), DeRa between the SFT and
DPO models, best-of-N, ARGS and GenARM decoding from the SFT model, and the
reward--KL plot. Every field is a :class:`alignjax.study.frontier.StudyConfig`
field; override any on the command line, e.g. ``--config.betas='(0.05,0.2,1.0)'``
or ``--config.methods='("dpo","ipo")'``. On a GPU/TPU scale the sizes up
(e.g. ``--config.sft_steps=2000 --config.steps=1000 --config.preference_prompts=8192``).
"""

import dataclasses

import ml_collections

from alignjax.study import frontier


def get_config():
  cfg = frontier.StudyConfig()
  return ml_collections.ConfigDict({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
