r"""ARGS decoding speed: alignjax's ``decoding.args_generate`` vs the authors' transformers loop.

  python bench/args.py                  # tiny Llama policy + tiny Llama reward model, k = 5, 10
  python bench/args.py --sizes=100m     # ~100M Llama policy and reward model (slow on CPU)
  python bench/args.py --quick          # smoke test: 8 + 8 tokens, one repeat

Peer: a faithful re-implementation of ``ARGS.generate`` / ``generate_step`` from the
authors' ``argsearch.py`` (github.com/deeplearning-wisc/args), in torch + transformers,
greedy ("greedy" method, B = 1 as their code assumes): per step one policy forward of the
new token with its cache, ``topk`` of the raw logits, one reward-model forward of the k
candidate sequences ``[x, y_<t, v]`` with the reward model's cache (the whole k rows at
the first step, then one new token per row), ``rewards * weight + logits``, argmax, and
the reward model's cache reordered to the chosen row (``reorder_cache([choice] * k)``).
transformers' ``prepare_inputs_for_generation`` (which their loop calls to drop the
cached tokens) is replaced by the slicing it did in transformers 4.x. No EOS: every run
makes exactly ``--new_tokens`` steps, as the authors' loop always does.

Both sides use the same random weights: alignjax ``ModelConfig`` presets are initialised
randomly (a ``Transformer`` policy, a ``RewardModel``), written with ``models.to_hf`` and
loaded by transformers (float32, eval mode) and by ``models.from_hf``. Prints tokens/s
(median of ``--repeats`` timed calls after one warm-up call), the ratio alignjax / authors,
whether the chosen tokens agree, and XLA compilations during the timed calls (0 expected).
Figures depend on the machine (and on other load on it); this script is the only place
they are claimed.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 8 prompt + 8 new tokens, one repeat.")
_SIZES = flags.DEFINE_list("sizes", ["tiny"], "Model presets for policy and reward model: tiny, 100m.")
_KS = flags.DEFINE_list("ks", ["5", "10"], "Candidates per step (ARGS's k).")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "New tokens.")
_W = flags.DEFINE_float("w", 1.0, "Reward weight.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
_THREADS = flags.DEFINE_integer("torch_threads", 1, "torch intra-op threads (0: torch's default). One "
                                "is fastest for these small models and on a loaded machine, where "
                                "several threads spin against each other (measured 40x slower).")


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def authors_args_greedy(llm, rm, tokens, *, k, weight, new_tokens):
  """The authors' ``ARGS.generate(method="greedy")`` loop (B = 1), in torch; returns [1, T + N]."""
  import torch  # pylint: disable=import-outside-toplevel
  cached, rm_cached = None, None
  with torch.no_grad():
    for _ in range(new_tokens):
      ones = torch.ones(tokens.shape, dtype=torch.long)
      feed = tokens if cached is None else tokens[:, -1:]
      mout = llm(input_ids=feed, attention_mask=ones, past_key_values=cached, use_cache=True)
      cached = mout.past_key_values
      # generate_step: top-k of the raw logits, candidates [x, y_<t, v] for the reward model.
      out_logits = mout.logits[:, -1]
      prescreen_logits, prescreen_tokens = torch.topk(out_logits, dim=-1, k=k)
      expanded = tokens.unsqueeze(1).repeat(1, k, 1)
      flat = torch.dstack((expanded, prescreen_tokens)).view(k, -1)
      rm_feed = flat if rm_cached is None else flat[:, -1:]
      rm_out = rm(input_ids=rm_feed, attention_mask=torch.ones(flat.shape, dtype=torch.long),
                  past_key_values=rm_cached, use_cache=True)
      rm_cached = rm_out.past_key_values
      rewards = rm_out.logits.flatten()
      new_scores = rewards * weight + prescreen_logits.flatten()
      _, top_k_ids = torch.topk(new_scores, dim=-1, k=1)
      rm_cached.reorder_cache(top_k_ids.repeat(k))
      tokens = flat[top_k_ids]
  return tokens


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from alignjax import decoding, models  # pylint: disable=import-outside-toplevel

  compiles = {"n": 0}

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles["n"] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)

  import warnings  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings("ignore", category=FutureWarning)  # `past_key_values`, as the authors call it
  transformers.logging.set_verbosity_error()
  if _THREADS.value > 0:
    torch.set_num_threads(_THREADS.value)
  prompt_len, new_tokens, repeats = _PROMPT.value, _NEW.value, _REPEATS.value
  if _QUICK.value:
    prompt_len, new_tokens, repeats = 8, 8, 1
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"B=1, prompt {prompt_len}, {new_tokens} new tokens, w={_W.value}, greedy, no EOS")
  for size in _SIZES.value:
    preset = {"tiny": models.ModelConfig.llama_tiny, "100m": models.ModelConfig.llama_100m}[size]
    cfg = preset()
    with tempfile.TemporaryDirectory() as tmp:
      pdir, rdir = os.path.join(tmp, "policy"), os.path.join(tmp, "rm")
      models.to_hf(models.Transformer(cfg, rngs=nnx.Rngs(0)), pdir)
      models.to_hf(models.RewardModel(cfg, rngs=nnx.Rngs(1)), rdir)
      policy, rm = models.from_hf(pdir), models.from_hf(rdir)
      llm = transformers.AutoModelForCausalLM.from_pretrained(pdir, dtype=torch.float32).eval()
      trm = transformers.AutoModelForSequenceClassification.from_pretrained(rdir, dtype=torch.float32).eval()
      # transformers scores k > 1 rows only with a pad id; one that never occurs reads the last token.
      trm.config.pad_token_id = -1
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, prompt_len)).astype(np.int32)
    mask = np.ones_like(prompt, bool)
    for k in (int(x) for x in _KS.value):
      def run_alignjax():
        out = decoding.args_generate(policy, rm, prompt, mask, max_new_tokens=new_tokens, k=k, w=_W.value)
        return jax.block_until_ready(out.tokens)

      def run_authors():
        return authors_args_greedy(llm, trm, torch.tensor(prompt, dtype=torch.long), k=k, weight=_W.value,
                                   new_tokens=new_tokens)

      warm = compiles["n"]
      ours = np.asarray(run_alignjax())
      warm = compiles["n"] - warm
      theirs = run_authors()[0, prompt_len:].numpy()
      before = compiles["n"]
      t_ours = _median_time(run_alignjax, repeats)
      timed = compiles["n"] - before
      t_theirs = _median_time(run_authors, repeats)
      agree = float(np.mean(ours[0] == theirs))
      first_diff = int(np.argmax(ours[0] != theirs)) if agree < 1 else None
      print(f"{size:5s} k={k:3d}  alignjax {new_tokens / t_ours:9.1f} tok/s   authors' loop "
            f"{new_tokens / t_theirs:9.1f} tok/s   ratio {t_theirs / t_ours:6.2f}x   tokens agree "
            f"{agree:.0%}{'' if first_diff is None else f' (first difference at step {first_diff})'}   "
            f"compiles: warm-up {warm}, timed {timed}")


if __name__ == "__main__":
  app.run(main)
