"""Embedded default: SFT then DPO of a tiny transformer on generated sorting preferences.

Runs in well under a minute on 2 CPU cores. The short warm-up leaves a
reference that still misranks some held-out pairs, which DPO then fixes.
Override any field from the command line, e.g.
``--config.loss.name=tdpo2 --config.dpo.steps=400``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Generated once into a TFDS array_record data set under `dir` (default:
  # <workdir>/data) and read back with grain.
  c.data = ml_collections.ConfigDict()
  c.data.dir = ""
  c.data.num_symbols = 8
  c.data.min_len = 3
  c.data.max_len = 6
  c.data.train_examples = 2048
  c.data.eval_examples = 256

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.d_ff = 128

  # Supervised warm-up on the chosen responses; the result becomes the
  # reference model of the preference phase. 0 skips it (random reference).
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 25
  c.sft.learning_rate = 3e-3
  c.sft.warmup_steps = 20

  c.dpo = ml_collections.ConfigDict()
  c.dpo.steps = 200
  c.dpo.learning_rate = 5e-4
  c.dpo.warmup_steps = 10

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "dpo"
  c.loss.beta = 0.1
  c.loss.label_smoothing = 0.0
  c.loss.robust = False
  c.loss.alpha = 0.5
  c.loss.average_log_prob = False

  c.batch_size = 32
  c.eval_batch_size = 128
  c.weight_decay = 0.0
  c.max_grad_norm = 1.0
  c.log_every = 25
  c.checkpoint_every = 100
  c.max_checkpoints = 2
  return c
