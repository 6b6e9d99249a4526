"""DPO training-step throughput and peak memory: alignjax vs a hand-written PyTorch loop vs TRL.

  python bench/dpo_step.py            # ModelConfig.llama_100m, 8 pairs x (64 + 64) tokens, fp32, CPU
  python bench/dpo_step.py --quick    # tiny smoke run (seconds)
  python bench/dpo_step.py --dtype=bfloat16   # bf16 compute, fp32 master weights (AMX / GPU)

Each contender runs in its own subprocess (so peak RSS is its own) on the same machine
in the same invocation, with the same model config (random init, no downloads), the
same batch shape, AdamW, global-norm clipping 1.0 and an online frozen reference:

* ``alignjax``: ``training.steps.make_train_step`` (one policy forward over
  chosen+rejected, chunked fused label log-probs over the response positions only
  (the unembedding and softmax skip the prompt, as TRL's ``use_logits_to_keep``),
  donated state).
* ``torch``: a hand-written loop over ``transformers.LlamaForCausalLM`` (one forward
  over chosen+rejected, ``log_softmax(logits).gather``, reference under ``no_grad``).
* ``trl``: ``trl.DPOTrainer`` on an in-memory ``datasets.Dataset`` with a local
  word-level tokenizer; step time from a ``TrainerCallback``.

``--dtype=bfloat16``: float32 master weights and optimizer everywhere, bf16 compute:
alignjax's ``compute_dtype`` (parameters cast inside the step, as
``precision.compute_dtype`` does), ``torch.autocast("cpu", torch.bfloat16)`` around the
forwards of the torch loop, and TRL's ``bf16=True`` (the same autocast); the peak is
then the bf16 matmul throughput (AMX on recent Xeons).

Printed: tokens/s (policy tokens, chosen+rejected, per second), ratios to the torch
loop, process CPU seconds per step (all threads; on a machine shared with other work it
moves less than the wall time, which includes waiting for a core), peak RSS (absolute
and above the post-import baseline), and
MFU = 8 * N * tokens / time / peak, N = non-embedding parameters (6N for the policy's
forward+backward + 2N for the reference forward), peak = the measured fp32 matmul
throughput of this machine (max over JAX and torch, square matmuls), measured before
and again after the contenders (the larger is used: a single measurement taken while
the machine is busy understates it). ``own MFU`` divides by the contender's own library's
matmul peak instead (XLA's for alignjax, torch's for the torch loop and TRL): it separates
what the step does around its matmuls from how fast the library's matmul kernel is (on
an AVX-512 host torch's sgemm runs ~1.3x XLA's). Each contender's row is printed as soon as
it finishes, so an interrupted run keeps the rows it has.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the comparison is on CPU

_QUICK = flags.DEFINE_bool("quick", False, "Tiny model and batch: a smoke test.")
_WHICH = flags.DEFINE_enum("which", "all", ["all", "alignjax", "torch", "trl", "peak"],
                           "Contender to run in this process (all: each in a subprocess).")
_PAIRS = flags.DEFINE_integer("pairs", 8, "Preference pairs per step.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_RESPONSE = flags.DEFINE_integer("response_len", 64, "Response tokens (incl. EOS).")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation, allocator warm-up).")
_CHUNK = flags.DEFINE_integer("chunk", 64, "alignjax: positions per log-prob chunk.")
_REMAT = flags.DEFINE_string("remat", "none", "alignjax: ModelConfig.remat policy.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch threads (0: all cores).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of every contender (master weights and optimizer stay float32).")

LR, BETA, CLIP = 1e-6, 0.1, 1.0


def _config():
  from alignjax.models.config import ModelConfig
  if _QUICK.value:
    return ModelConfig.llama_tiny(vocab_size=512, remat=_REMAT.value)
  return ModelConfig.llama_100m(remat=_REMAT.value)


def _shape():
  if _QUICK.value:
    return 2, 8, 8
  return _PAIRS.value, _PROMPT.value, _RESPONSE.value


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _report(name, times, tokens_per_step, baseline_mb, cpu_times=(), **extra):
  med = statistics.median(times)
  cpu = statistics.median(cpu_times) if cpu_times else float("nan")
  out = dict(name=name, step_s=med, tokens_per_s=tokens_per_step / med, cpu_s=cpu,
             peak_rss_mb=_rss_mb(), peak_rss_above_baseline_mb=_rss_mb() - baseline_mb, **extra)
  print("RESULT " + json.dumps(out), flush=True)


def _tokens(rng, pairs, prompt, response, vocab):
  import numpy as np
  p = rng.integers(3, vocab, (pairs, prompt))
  c = rng.integers(3, vocab, (pairs, response))
  r = rng.integers(3, vocab, (pairs, response))
  c[:, -1] = r[:, -1] = 2  # EOS
  return p.astype(np.int32), c.astype(np.int32), r.astype(np.int32)


def dpo_batch(pairs: int, prompt: int, response: int, vocab_size: int) -> dict:
  """The benchmarks' paired batch (device arrays): :func:`_tokens` with full attention, response masks."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  p, c, r = _tokens(np.random.default_rng(0), pairs, prompt, response, vocab_size)
  T = prompt + response
  resp = np.zeros((pairs, T), bool)
  resp[:, prompt:] = True
  return {"chosen_tokens": jnp.asarray(np.concatenate([p, c], 1)),
          "rejected_tokens": jnp.asarray(np.concatenate([p, r], 1)),
          "chosen_attention": jnp.ones((pairs, T), bool), "rejected_attention": jnp.ones((pairs, T), bool),
          "chosen_response": jnp.asarray(resp), "rejected_response": jnp.asarray(resp)}

# ---------------------------------------------------------------- contenders

def run_alignjax():
  import jax
  import optax
  from flax import nnx

  from alignjax.models import Transformer
  from alignjax.training import algorithms, reference, steps
  baseline = _rss_mb()
  cfg = _config()
  pairs, prompt, response = _shape()
  policy = Transformer(cfg, rngs=nnx.Rngs(0))
  ref_model = Transformer(cfg, rngs=nnx.Rngs(1))
  tx = optax.adamw(LR)
  ref, frozen = reference.online(ref_model)
  del ref_model
  step = steps.make_train_step(policy, tx, algorithms.loss("dpo", beta=BETA), ref,
                               max_grad_norm=CLIP, chunk_size=_CHUNK.value,
                               compute_dtype=None if _DTYPE.value == "float32" else _DTYPE.value)
  state = steps.init_state(policy, tx)
  del policy
  batch = dpo_batch(pairs, prompt, response, cfg.vocab_size)
  times, cpu = [], []
  for i in range(_WARMUP.value + _STEPS.value):
    t, c = time.perf_counter(), time.process_time()
    state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics["loss"])
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
  _report("alignjax", times, 2 * pairs * (prompt + response), baseline, cpu, loss=float(metrics["loss"]),
          backend=jax.default_backend(), devices=len(jax.devices()))


def _hf_config(cfg):
  import transformers
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=cfg.max_position_embeddings, pad_token_id=0, eos_token_id=2, bos_token_id=None)


def _torch_threads():
  import torch
  torch.set_num_threads(_THREADS.value or os.cpu_count())


def run_torch():
  import numpy as np
  import torch
  import torch.nn.functional as F
  import transformers
  _torch_threads()
  baseline = _rss_mb()
  cfg = _config()
  pairs, prompt, response = _shape()
  torch.manual_seed(0)
  policy = transformers.LlamaForCausalLM(_hf_config(cfg)).train()
  torch.manual_seed(1)
  ref_model = transformers.LlamaForCausalLM(_hf_config(cfg)).eval().requires_grad_(False)
  opt = torch.optim.AdamW(policy.parameters(), lr=LR)
  p, c, r = _tokens(np.random.default_rng(0), pairs, prompt, response, cfg.vocab_size)
  tokens = torch.from_numpy(np.concatenate([np.concatenate([p, c], 1), np.concatenate([p, r], 1)])).long()
  mask = torch.zeros_like(tokens, dtype=torch.float32)
  mask[:, prompt:] = 1.0
  labels, lmask = tokens[:, 1:], mask[:, 1:]

  def seq_logps(logits):
    lp = torch.gather(F.log_softmax(logits[:, :-1].float(), dim=-1), 2, labels[..., None])[..., 0]
    return (lp * lmask).sum(-1)

  times, cpu = [], []
  bf16 = _DTYPE.value == "bfloat16"
  for i in range(_WARMUP.value + _STEPS.value):
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      ref_lp = seq_logps(ref_model(input_ids=tokens).logits)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      lp = seq_logps(policy(input_ids=tokens).logits)
    u = (lp - ref_lp)
    loss = -F.logsigmoid(BETA * (u[:pairs] - u[pairs:])).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
  _report("torch", times, tokens.numel(), baseline, cpu, loss=loss.item(), threads=torch.get_num_threads())


def trl_inputs(cfg, pairs, prompt, response, n_steps):
  """``(hf_tokenizer, rows)``: a word-level tokenizer over the model's ids (``w<i>`` is id i) and the
  DPO rows TRL reads, the same token ids as :func:`_tokens` gives the other contenders."""
  import numpy as np
  import tokenizers
  import transformers
  specials = ["<pad>", "<unk>", "</s>"]
  vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(3, cfg.vocab_size)])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
  rng = np.random.default_rng(0)
  rows = []
  words = lambda ids: "".join(f"w{i} " for i in ids)
  for _ in range(n_steps):
    p, c, r = _tokens(rng, pairs, prompt, response, cfg.vocab_size)
    for b in range(pairs):  # TRL appends EOS itself: give response_len - 1 words.
      rows.append(dict(prompt=words(p[b]), chosen=words(c[b, :-1]), rejected=words(r[b, :-1])))
  return hf_tok, rows


def trl_train(policy, ref_model, rows, hf_tok, *, pairs, n_steps, warmup, peft_config=None):
  """``(step times after warm-up, trainer)`` of TRL's ``DPOTrainer`` over ``rows`` (constant lr, no logging)."""
  import time
  import datasets
  import transformers
  import trl
  times, starts = [], {}
  cpu_times = getattr(trl_train, "cpu_times", None)

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      starts["t"], starts["c"] = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kw):
      if state.global_step > warmup:
        times.append(time.perf_counter() - starts["t"])
        if cpu_times is not None:
          cpu_times.append(time.process_time() - starts["c"])

  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(
        output_dir=out, beta=BETA, learning_rate=LR, max_grad_norm=CLIP, per_device_train_batch_size=pairs,
        max_steps=n_steps, report_to=[], use_cpu=True, bf16=_DTYPE.value == "bfloat16", logging_steps=10**6, save_strategy="no",
        dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref_model, args=args, peft_config=peft_config,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=hf_tok,
                             callbacks=[Timer()])
    trainer.train()
  return times, trainer


def run_trl():
  import torch
  import transformers
  _torch_threads()
  baseline = _rss_mb()
  cfg = _config()
  pairs, prompt, response = _shape()
  n_steps = _WARMUP.value + _STEPS.value
  hf_tok, rows = trl_inputs(cfg, pairs, prompt, response, n_steps)
  torch.manual_seed(0)
  policy = transformers.LlamaForCausalLM(_hf_config(cfg))
  torch.manual_seed(1)
  ref_model = transformers.LlamaForCausalLM(_hf_config(cfg))
  trl_train.cpu_times = cpu = []
  times, trainer = trl_train(policy, ref_model, rows, hf_tok, pairs=pairs, n_steps=n_steps, warmup=_WARMUP.value)
  sample = trainer.train_dataset[0]
  seq_len = len(sample["prompt_ids"] if "prompt_ids" in sample else sample["prompt_input_ids"])
  _report("trl", times, 2 * pairs * (prompt + response), baseline, cpu, prompt_tokens_seen=seq_len,
          gradient_checkpointing=bool(trainer.args.gradient_checkpointing))


def _best_rate(fn, flops: float) -> float:
  """``flops`` over the best of 5 timed calls of ``fn`` (after one warm-up call)."""
  fn()
  ts = []
  for _ in range(5):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return flops / min(ts)


def run_peak():
  import jax
  import jax.numpy as jnp
  import torch
  _torch_threads()
  n = 512 if _QUICK.value else 2048
  flops = 2 * n ** 3
  a = jax.random.normal(jax.random.key(0), (n, n), _DTYPE.value)
  mm = jax.jit(lambda x, y: x @ y)
  jax_peak = _best_rate(lambda: jax.block_until_ready(mm(a, a)), flops)
  extra = {}
  if _DTYPE.value == "bfloat16":   # XLA's CPU kernels: bf16 x bf16 -> float32 (a faster path) as well
    mm32 = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    extra["jax_f32_out_flops"] = _best_rate(lambda: jax.block_until_ready(mm32(a, a)), flops)
  x = torch.randn(n, n, dtype=getattr(torch, _DTYPE.value))
  torch_peak = _best_rate(lambda: torch.mm(x, x), flops)
  print("RESULT " + json.dumps(dict(name="peak", jax_flops=jax_peak, torch_flops=torch_peak,
                                    peak_flops=max(jax_peak, torch_peak), **extra)), flush=True)


# ---------------------------------------------------------------- driver

def _f32_out(peak) -> str:
  """bf16 runs: XLA's bf16 matmul with a float32 result, next to its bf16 -> bf16 figure (the step's projections)."""
  if "jax_f32_out_flops" not in peak:
    return ""
  return f" [jax bf16 -> f32 output: {peak['jax_f32_out_flops'] / 1e9:.1f}]"


def _child(which):
  argv = [sys.executable, os.path.abspath(__file__), f"--which={which}"]
  argv += [f"--{f}={flags.FLAGS[f].value}" for f in
           ("quick", "pairs", "prompt_len", "response_len", "steps", "warmup", "chunk", "remat", "threads", "dtype")]
  env = dict(os.environ)
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(argv, capture_output=True, text=True, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  print(f"[{which}] failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
  return None


def main(argv):
  del argv
  runners = {"alignjax": run_alignjax, "torch": run_torch, "trl": run_trl, "peak": run_peak}
  if _WHICH.value != "all":
    runners[_WHICH.value]()
    return
  cfg = _config()
  pairs, prompt, response = _shape()
  n_nonembed = cfg.num_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
  peak = _child("peak")
  dtype = {"float32": "fp32", "bfloat16": "bf16 compute (fp32 master weights)"}[_DTYPE.value]
  short = {"float32": "fp32", "bfloat16": "bf16"}[_DTYPE.value]
  print(f"DPO step, {pairs} pairs x ({prompt}+{response}) tokens, {dtype}, online reference; "
        f"N(non-embedding)={n_nonembed / 1e6:.1f}M, vocab={cfg.vocab_size}, cores={os.cpu_count()}")
  if peak:
    print(f"measured {short} matmul peak before the contenders: {peak['peak_flops'] / 1e9:.1f} GFLOP/s "
          f"(jax {peak['jax_flops'] / 1e9:.1f}, torch {peak['torch_flops'] / 1e9:.1f}){_f32_out(peak)}", flush=True)
  header = (f"{'':10s} {'step s':>8s} {'cpu s':>7s} {'tokens/s':>10s} {'vs torch':>9s} {'MFU':>6s} "
            f"{'own MFU':>8s} {'peak RSS MB':>12s} {'above base':>11s} {'mem vs TRL':>10s}")

  def own_peak(name, peaks):
    """The contender's own library's matmul peak: XLA's for alignjax (in bf16 its bf16 -> float32
    matmul, which its projections use on CPU), torch's for the others."""
    keys = ("jax_flops", "jax_f32_out_flops") if name == "alignjax" else ("torch_flops",)
    values = [p[k] for p in peaks if p for k in keys if k in p]
    return max(values) if values else None

  def row(name, res, base, trl_res, peak_flops, own_flops):
    if res is None:
      return f"{name:10s} failed"
    work = 8 * n_nonembed * res["tokens_per_s"]
    mfu = work / peak_flops if peak_flops else float("nan")
    own = work / own_flops if own_flops else float("nan")
    ratio = res["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    mem = res["peak_rss_mb"] / trl_res["peak_rss_mb"] if trl_res else float("nan")
    return (f"{name:10s} {res['step_s']:8.3f} {res.get('cpu_s', float('nan')):7.2f} {res['tokens_per_s']:10.1f} "
            f"{ratio:9.2f} {mfu:6.1%} {own:8.1%} {res['peak_rss_mb']:12.0f} "
            f"{res['peak_rss_above_baseline_mb']:11.0f} {mem:10.2f}")

  results = {}
  print("as each contender finishes (MFU against the peak before):\n" + header, flush=True)
  for w in ("alignjax", "torch", "trl"):
    results[w] = _child(w)
    print(row(w, results[w], None, None, peak["peak_flops"] if peak else None, own_peak(w, [peak])), flush=True)
  after = _child("peak")
  flops = [p["peak_flops"] for p in (peak, after) if p]
  peak_flops = max(flops) if flops else None
  if after:
    print(f"measured {short} matmul peak after the contenders: {after['peak_flops'] / 1e9:.1f} GFLOP/s "
          f"(jax {after['jax_flops'] / 1e9:.1f}, torch {after['torch_flops'] / 1e9:.1f}){_f32_out(after)}; "
          f"peak used: {peak_flops / 1e9:.1f}")
  print(header)
  for name, res in results.items():
    print(row(name, res, results.get("torch"), results.get("trl"), peak_flops, own_peak(name, [peak, after])))

if __name__ == "__main__":
  app.run(main)
