r"""The real recipe (``alignjax.study.real``): SFT-free DPO, TDPO2 and AlignDistil of SmolLM2-135M-Instruct
on LLaMA-Factory's ``dpo_en_demo`` pairs, with a held-out split.

``get_config(arg)`` with ``arg`` after the colon of ``--config=configs/smollm2_dpo.py:<arg>``:
``""`` (no colon) the recipe: seq_len 128, prompts of at most 64 tokens cut at whole turns -- 137
of the 300 pairs, 13 held out --, 30 steps of batch 2 per run with LoRA r16 adapters, four runs:
DPO, reverse DPO, TDPO2, AlignDistil; measured at 32 CPU-minutes (about 16-20 minutes on 2 idle
CPU cores); ``"test"`` two steps at seq_len 72 (the tests and the Colab notebook).
Every field is a :class:`alignjax.study.real.RealConfig` field; override any on the command line.

  ./train.sh real                                           # the recipe, runs/smollm2_dpo
  ./train.sh real --config=configs/smollm2_dpo.py:test --workdir=runs/smollm2_dpo_test
"""

import dataclasses

import ml_collections

from alignjax.study import real


def get_config(arg: str = ""):
  if arg not in ("", "test"):
    raise ValueError(f"configs/smollm2_dpo.py: unknown argument {arg!r}; expected '' or 'test'.")
  cfg = real.build(None, **(real.TEST if arg == "test" else {}))
  return ml_collections.ConfigDict({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
