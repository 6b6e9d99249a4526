r"""One accelerator, one ~1B Llama (random weights, bf16 compute): DPO step and greedy decoding.

  bench/gpu.sh                      # everything, each contender in its own process
  python bench/gpu.py --which=dpo_alignjax --size=tiny    # one contender (CPU smoke test)

Contenders (same model shape, same batch, each in a fresh process so neither framework
holds the other's memory):

* ``dpo_alignjax``: ``training.steps.make_train_step`` (float32 master weights, bf16
  compute, AdamW, clipping 1.0, online bf16 reference, chunked label log-probs).
* ``dpo_torch``: a hand-written PyTorch DPO step on ``transformers.LlamaForCausalLM``
  (float32 master weights under ``torch.autocast(bfloat16)``, SDPA attention, fused AdamW,
  clipping 1.0, bf16 reference under ``no_grad``) -- what a user writes by hand.
* ``dpo_trl``: ``trl.DPOTrainer`` (bf16=True) when trl and datasets import.
* ``decode_alignjax``: ``decoding.generate`` greedy, bf16 weights and KV cache.
* ``decode_hf``: transformers ``generate`` greedy, bf16 weights (its default cache, SDPA).
* ``bandwidth``: a large device-to-device copy (bytes read + written per second).

Printed per contender: ``RESULT {json}``. MFU = model FLOPs / time / the accelerator's
published dense peak for the compute dtype (H100/H200 bf16: 989 TFLOP/s; see
``alignjax.training.runtime.peak_flops``); model FLOPs of a DPO step = (6 + 2) * N * tokens
(policy forward + backward, reference forward), N = the matmul parameters (all but the
embedding lookup; the tied LM head counts), attention score FLOPs excluded. Decoding:
bytes read per step = the bf16 weights once (LM head included) + the KV cache, against
the measured copy bandwidth.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

_WHICH = flags.DEFINE_enum("which", "dpo_alignjax", ["dpo_alignjax", "dpo_torch", "dpo_trl", "decode_alignjax",
                                                     "decode_hf", "bandwidth", "summary"], "Contender.")
_SIZE = flags.DEFINE_enum("size", "1b", ["1b", "tiny"], "1b: Llama-3.2-1B's shape; tiny: a CPU smoke test.")
_PAIRS = flags.DEFINE_integer("pairs", 8, "DPO: preference pairs per step.")
_PROMPT = flags.DEFINE_integer("prompt_len", 256, "DPO: prompt tokens.")
_RESPONSE = flags.DEFINE_integer("response_len", 256, "DPO: response tokens.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps / decoding calls.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation).")
_CHUNK = flags.DEFINE_integer("chunk", 128, "alignjax: positions per log-prob chunk.")
_REMAT = flags.DEFINE_string("remat", "none", "alignjax: ModelConfig.remat.")
_BATCH = flags.DEFINE_integer("batch", 8, "Decoding: rows.")
_DEC_PROMPT = flags.DEFINE_integer("decode_prompt", 128, "Decoding: prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Decoding: new tokens per row.")
_RESULTS = flags.DEFINE_string("results", None, "summary: the file of RESULT lines.")

BETA, LR, CLIP = 0.1, 1e-6, 1.0
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def _config(dtype: str, param_dtype: str):
  from alignjax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  if _SIZE.value == "tiny":
    return ModelConfig.llama_tiny(vocab_size=512, dtype=dtype, param_dtype=param_dtype, remat=_REMAT.value)
  return ModelConfig(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                     num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
                     norm_eps=1e-5, tie_embeddings=True, dtype=dtype, param_dtype=param_dtype, remat=_REMAT.value)


def _matmul_params(cfg) -> int:
  """Parameters that take part in matmuls: all but the embedding lookup (a tied LM head counts once)."""
  return cfg.num_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def _hf_config(cfg):
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_position_embeddings,
      pad_token_id=0, eos_token_id=2, bos_token_id=None)


def _tokens(pairs, prompt, response, vocab):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  p = rng.integers(3, vocab, (pairs, prompt)).astype(np.int32)
  c = rng.integers(3, vocab, (pairs, response)).astype(np.int32)
  r = rng.integers(3, vocab, (pairs, response)).astype(np.int32)
  return p, c, r


def _result(**kw):
  print("RESULT " + json.dumps(kw), flush=True)


def _device_name() -> str:
  try:
    import torch  # pylint: disable=import-outside-toplevel
    if torch.cuda.is_available():
      return torch.cuda.get_device_name(0)
  except ImportError:
    pass
  import jax  # pylint: disable=import-outside-toplevel
  return jax.devices()[0].device_kind


# ------------------------------------------------------------------ DPO step

def dpo_alignjax():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from alignjax.models import Transformer  # pylint: disable=import-outside-toplevel
  from alignjax.training import reference, steps  # pylint: disable=import-outside-toplevel
  try:
    from alignjax.training import algorithms  # pylint: disable=import-outside-toplevel
    dpo = algorithms.loss("dpo", beta=BETA)
  except ImportError:
    from alignjax.training import objectives  # pylint: disable=import-outside-toplevel
    dpo = objectives.loss("dpo", beta=BETA)
  cfg = _config("bfloat16", "float32")
  pairs, prompt, response = _PAIRS.value, _PROMPT.value, _RESPONSE.value
  if _SIZE.value == "tiny":
    pairs, prompt, response = 2, 8, 8
  t0 = time.perf_counter()
  policy = Transformer(cfg, rngs=nnx.Rngs(0))
  ref_model = Transformer(_config("bfloat16", "bfloat16"), rngs=nnx.Rngs(1))
  ref, frozen = reference.online(ref_model)
  del ref_model
  tx = optax.adamw(LR)
  step = steps.make_train_step(policy, tx, dpo, ref, max_grad_norm=CLIP, chunk_size=_CHUNK.value)
  state = steps.init_state(policy, tx)
  del policy
  init_s = time.perf_counter() - t0
  p, c, r = _tokens(pairs, prompt, response, cfg.vocab_size)
  T = prompt + response
  resp = np.zeros((pairs, T), bool)
  resp[:, prompt:] = True
  batch = {"chosen_tokens": jnp.asarray(np.concatenate([p, c], 1)),
           "rejected_tokens": jnp.asarray(np.concatenate([p, r], 1)),
           "chosen_attention": jnp.ones((pairs, T), bool), "rejected_attention": jnp.ones((pairs, T), bool),
           "chosen_response": jnp.asarray(resp), "rejected_response": jnp.asarray(resp)}
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    t = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  _dpo_result("alignjax", cfg, times, 2 * pairs * T, loss=float(metrics["loss"]), init_s=init_s,
              memory=_jax_memory())


def _jax_memory():
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  return {"peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30}


def dpo_torch():
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  cfg = _config("bfloat16", "float32")
  pairs, prompt, response = _PAIRS.value, _PROMPT.value, _RESPONSE.value
  if _SIZE.value == "tiny":
    pairs, prompt, response = 2, 8, 8
  hf_cfg = _hf_config(cfg)
  hf_cfg._attn_implementation = "sdpa"  # pylint: disable=protected-access
  torch.manual_seed(0)
  policy = transformers.LlamaForCausalLM(hf_cfg).to(dev).train()
  torch.manual_seed(1)
  ref_model = transformers.LlamaForCausalLM(hf_cfg).to(dev, torch.bfloat16).eval().requires_grad_(False)
  opt = torch.optim.AdamW(policy.parameters(), lr=LR, fused=dev == "cuda")
  p, c, r = _tokens(pairs, prompt, response, cfg.vocab_size)
  tokens = torch.from_numpy(np.concatenate([np.concatenate([p, c], 1), np.concatenate([p, r], 1)])).long().to(dev)
  mask = torch.zeros(tokens.shape, dtype=torch.float32, device=dev)
  mask[:, prompt:] = 1.0
  labels, lmask = tokens[:, 1:], mask[:, 1:]

  def seq_logps(logits):
    lp = torch.gather(F.log_softmax(logits[:, :-1].float(), dim=-1), 2, labels[..., None])[..., 0]
    return (lp * lmask).sum(-1)

  times = []
  for _ in range(_WARMUP.value + _STEPS.value):
    t = time.perf_counter()
    with torch.autocast(dev, dtype=torch.bfloat16):
      with torch.no_grad():
        ref_lp = seq_logps(ref_model(input_ids=tokens).logits)
      lp = seq_logps(policy(input_ids=tokens).logits)
    u = lp - ref_lp
    loss = -F.logsigmoid(BETA * (u[:pairs] - u[pairs:])).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss_value = loss.item()  # synchronises
    times.append(time.perf_counter() - t)
  memory = {"peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30} if dev == "cuda" else {}
  _dpo_result("torch", cfg, times, tokens.numel(), loss=loss_value, memory=memory)


def dpo_trl():
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  try:
    import datasets  # pylint: disable=import-outside-toplevel
    import trl  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    _result(name="trl", skipped=f"{type(e).__name__}: {e}")
    return
  import tokenizers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  cuda = torch.cuda.is_available()
  cfg = _config("bfloat16", "float32")
  pairs, prompt, response = _PAIRS.value, _PROMPT.value, _RESPONSE.value
  if _SIZE.value == "tiny":
    pairs, prompt, response = 2, 8, 8
  vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(3, cfg.vocab_size)])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
  n_steps = _WARMUP.value + _STEPS.value
  rng = np.random.default_rng(0)
  words = lambda ids: "".join(f"w{i} " for i in ids)
  rows = []
  for _ in range(n_steps):
    for _ in range(pairs):  # TRL appends EOS itself: response_len - 1 words
      p, c, r = (rng.integers(3, cfg.vocab_size, n) for n in (prompt, response - 1, response - 1))
      rows.append(dict(prompt=words(p), chosen=words(c), rejected=words(r)))
  hf_cfg = _hf_config(cfg)
  torch.manual_seed(0)
  policy = transformers.LlamaForCausalLM(hf_cfg)
  torch.manual_seed(1)
  ref_model = transformers.LlamaForCausalLM(hf_cfg)
  times, starts = [], {}

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      if cuda:
        torch.cuda.synchronize()
      starts["t"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      if cuda:
        torch.cuda.synchronize()
      times.append(time.perf_counter() - starts["t"])

  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(
        output_dir=out, beta=BETA, learning_rate=LR, max_grad_norm=CLIP, per_device_train_batch_size=pairs,
        max_steps=n_steps, report_to=[], use_cpu=not cuda, bf16=cuda, logging_steps=10 ** 6, save_strategy="no",
        dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref_model, args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=hf_tok,
                             callbacks=[Timer()])
    trainer.train()
  memory = {"peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30} if cuda else {}
  _dpo_result("trl", cfg, times, 2 * pairs * (prompt + response), memory=memory, trl=trl.__version__)


def _dpo_result(name, cfg, times, tokens_per_step, **extra):
  timed = times[_WARMUP.value:] or times[-1:]
  step_s = statistics.median(timed)
  flops = 8 * _matmul_params(cfg) * tokens_per_step
  _result(name=name, kind="dpo", step_s=step_s, first_step_s=times[0], tokens_per_s=tokens_per_step / step_s,
          model_tflop_per_step=flops / 1e12, achieved_tflops=flops / step_s / 1e12, device=_device_name(), **extra)


# ------------------------------------------------------------------ decoding

def decode_alignjax():
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from alignjax import decoding  # pylint: disable=import-outside-toplevel
  from alignjax.models import Transformer  # pylint: disable=import-outside-toplevel
  cfg = _config("bfloat16", "bfloat16")
  B, P, N = _BATCH.value, _DEC_PROMPT.value, _NEW.value
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (B, P)).astype(np.int32)
  mask = np.ones((B, P), bool)
  times = []
  for _ in range(1 + _STEPS.value):
    t = time.perf_counter()
    out = decoding.generate(model, prompts, mask, max_new_tokens=N)
    jax.block_until_ready(out.tokens)
    times.append(time.perf_counter() - t)
  _decode_result("alignjax", cfg, times)


def decode_hf():
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  cfg = _config("bfloat16", "bfloat16")
  B, P, N = _BATCH.value, _DEC_PROMPT.value, _NEW.value
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(_hf_config(cfg)).to(dev, torch.bfloat16).eval()
  ids = torch.from_numpy(np.random.default_rng(0).integers(3, cfg.vocab_size, (B, P))).long().to(dev)
  am = torch.ones_like(ids)
  times = []
  for _ in range(1 + _STEPS.value):
    t = time.perf_counter()
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=am, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    out.cpu()
    times.append(time.perf_counter() - t)
  _decode_result("transformers", cfg, times)


def _decode_result(name, cfg, times):
  B, P, N = _BATCH.value, _DEC_PROMPT.value, _NEW.value
  t = statistics.median(times[1:] or times)
  weights = 2 * _matmul_params(cfg)  # bf16, read once per step (the embedding rows read are negligible)
  kv = 2 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * B * (P + N / 2)  # K and V, mean length
  _result(name=name, kind="decode", s_per_call=t, tokens_per_s=B * N / t, ms_per_step=1e3 * t / N,
          bytes_per_step=weights + kv, weight_bytes=weights, device=_device_name())


def bandwidth():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n = (2 ** 28 if jax.default_backend() != "cpu" else 2 ** 25)  # float32 elements: 1 GiB (GPU), 128 MiB (CPU)
  x = jnp.ones((n,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)  # one read, one write per element
  jax.block_until_ready(copy(x))
  best = float("inf")
  for _ in range(10):
    t = time.perf_counter()
    jax.block_until_ready(copy(x))
    best = min(best, time.perf_counter() - t)
  _result(name="bandwidth", kind="bandwidth", bytes_per_s=2 * 4 * n / best, device=_device_name())


# ------------------------------------------------------------------ summary

def summary():
  rows = []
  with open(_RESULTS.value) as f:
    for line in f:
      if line.startswith("RESULT "):
        rows.append(json.loads(line[len("RESULT "):]))
  by = {r["name"] + ":" + r.get("kind", ""): r for r in rows}
  device = next((r["device"] for r in rows if "device" in r), "?")
  peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in device), None)
  print(f"device: {device}; published dense bf16 peak: {peak / 1e12 if peak else '?'} TFLOP/s")
  dpo = [r for r in rows if r.get("kind") == "dpo"]
  base = by.get("torch:dpo")
  for r in dpo:
    mfu = r["achieved_tflops"] * 1e12 / peak if peak else float("nan")
    ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    print(f"DPO {r['name']:10s} step {r['step_s']:.3f} s (first {r['first_step_s']:.1f} s)  "
          f"{r['tokens_per_s']:,.0f} tok/s  {r['achieved_tflops']:.0f} TFLOP/s  MFU {mfu:.1%}  "
          f"vs torch {ratio:.2f}x  peak mem {r.get('memory', {}).get('peak_gib', float('nan')):.1f} GiB")
  for r in rows:
    if "skipped" in r:
      print(f"{r['name']}: skipped ({r['skipped']})")
  bw = by.get("bandwidth:bandwidth")
  hf = by.get("transformers:decode")
  for r in [r for r in rows if r.get("kind") == "decode"]:
    floor = r["bytes_per_step"] / bw["bytes_per_s"] if bw else float("nan")
    ratio = r["tokens_per_s"] / hf["tokens_per_s"] if hf else float("nan")
    print(f"decode {r['name']:12s} {r['tokens_per_s']:,.0f} tok/s  {r['ms_per_step']:.2f} ms/step  "
          f"{r['bytes_per_step'] / 1e9:.2f} GB read/step -> floor {1e3 * floor:.2f} ms at "
          f"{(bw or {}).get('bytes_per_s', float('nan')) / 1e9:.0f} GB/s: {floor / (r['ms_per_step'] / 1e3):.0%} "
          f"of roofline  vs transformers {ratio:.2f}x")


def main(argv):
  del argv
  {"dpo_alignjax": dpo_alignjax, "dpo_torch": dpo_torch, "dpo_trl": dpo_trl, "decode_alignjax": decode_alignjax,
   "decode_hf": decode_hf, "bandwidth": bandwidth, "summary": summary}[_WHICH.value]()


if __name__ == "__main__":
  app.run(main)
