r"""Memory-saving DPO configurations side by side: peak memory and step time of one DPO step.

  python bench/pod.py             # ModelConfig.llama_100m, 4 pairs x (32 + 32) tokens, CPU (~10 min on 2 idle cores)
  python bench/pod.py --quick     # tiny model and batch: a smoke test

One run; every configuration in its own fresh subprocess, so its peak memory
(``alignjax.memory.peak_memory()``: device allocator peak where the backend keeps one,
else the host's ``VmHWM``) is its own. Same model config (random init, no downloads),
same batch shape, AdamW, global-norm clipping 1.0, DPO (beta 0.1):

* alignjax ``training.steps.make_train_step``:
  ``full-fp32-online`` (the baseline: full fine-tuning, float32, online reference),
  ``bf16`` (bfloat16 compute, float32 master weights and optimizer state),
  ``remat-full`` (``ModelConfig.remat="full"``),
  ``precomputed`` (``reference.precomputed()``: reference log-probs in the batch, no
  reference weights in memory), ``lora`` (rank 16, alpha 32 on attention q/k/v/o,
  ``reference.adapter_off()``: one copy of the weights, adapters trained only),
  ``lora-bf16-remat`` (the last three combined).
  ``compiled`` is ``alignjax.memory.compiled_memory`` of the step that runs (XLA's buffer
  plan: arguments + outputs + temporaries - donated aliases): deterministic, allocator-free.
* the peer, ``trl.DPOTrainer`` on ``transformers.LlamaForCausalLM`` of the same config:
  ``trl-lora`` (peft LoRA, same rank/alpha/targets, reference = adapters disabled) and
  ``trl-full`` (full fine-tuning, a separate reference model).

Aim (issue 19): LoRA DPO with an adapter-off reference at <= 0.6x the peak memory of
full DPO with an online reference. Figures depend on the machine and its load; this
script is the only place they are claimed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LR, BETA, CLIP, RANK, ALPHA = 1e-6, 0.1, 1.0, 16, 32
LORA_TARGETS = r"layers/\d+/attn/(q|k|v|o)"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (compute dtype, remat, reference mode, lora)
ALIGNJAX = {
    "full-fp32-online": ("float32", "none", "online", False),
    "bf16": ("bfloat16", "none", "online", False),
    "remat-full": ("float32", "full", "online", False),
    "precomputed": ("float32", "none", "precomputed", False),
    "lora": ("float32", "none", "adapter_off", True),
    "lora-bf16-remat": ("bfloat16", "full", "adapter_off", True),
}
TRL = ("trl-lora", "trl-full")
BASELINE, AIM = "full-fp32-online", ("lora", 0.6)


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny model and batch: a smoke test")
  p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
  p.add_argument("--pairs", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--response_len", type=int, default=32)
  p.add_argument("--chunk", type=int, default=64, help="alignjax: positions per log-prob chunk")
  p.add_argument("--only", default="", help="comma-separated configurations (default: all)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _config(args, **overrides):
  from alignjax.models.config import ModelConfig
  if args.quick:
    return ModelConfig.llama_tiny(vocab_size=512, **overrides)
  return ModelConfig.llama_100m(**overrides)


def _shape(args):
  return (2, 8, 8) if args.quick else (args.pairs, args.prompt_len, args.response_len)


def _peak_bytes():
  from alignjax import memory
  return memory.peak_memory().bytes


def _result(name, times, tokens, base_bytes, **extra):
  med = statistics.median(times)
  peak = _peak_bytes()
  print("RESULT " + json.dumps(dict(name=name, step_s=med, tokens_per_s=tokens / med, peak=peak,
                                    above_import=peak - base_bytes, **extra)), flush=True)


# ---------------------------------------------------------------- alignjax

def run_alignjax(args, name):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import dpo_step
  from alignjax import memory
  from alignjax.models import Transformer, lora
  from alignjax.training import algorithms, reference, steps
  dtype, remat, ref_mode, use_lora = ALIGNJAX[name]
  base_bytes = _peak_bytes()
  cfg = _config(args, dtype=dtype, remat=remat)
  pairs, prompt, response = _shape(args)
  policy = Transformer(cfg, rngs=nnx.Rngs(0))
  tx = optax.adamw(LR)
  if use_lora:
    lora.apply_lora(policy, rank=RANK, alpha=ALPHA, targets=LORA_TARGETS)
    ref, frozen = reference.adapter_off()
    frozen = {**frozen, **steps.frozen_base(policy)}
  elif ref_mode == "online":
    ref, frozen = reference.online(Transformer(cfg, rngs=nnx.Rngs(1)))
  else:
    ref, frozen = reference.precomputed()
  step = steps.make_train_step(policy, tx, algorithms.loss("dpo", beta=BETA), ref, max_grad_norm=CLIP,
                               chunk_size=args.chunk,
                               compute_dtype=jnp.bfloat16 if dtype == "bfloat16" else None)
  state = steps.init_state(policy, tx)
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  del policy  # the state holds copies; a LoRA model's base weights live on in `frozen`
  batch = dpo_step.dpo_batch(pairs, prompt, response, cfg.vocab_size)
  if ref_mode == "precomputed":  # as reference.attach would add them: one float per row and key
    rng = np.random.default_rng(1)
    for k in reference.REFERENCE_KEYS:  # reference_{chosen,rejected}_{logps,mean_logps}
      scale = 1 if k.endswith("mean_logps") else response
      batch[k] = jnp.asarray(-rng.uniform(1, 2, pairs) * scale, jnp.float32)
  compiled = step.lower(state, batch, frozen).compile()
  plan = memory.compiled_memory(compiled)
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready(metrics["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  _result(name, times, 2 * pairs * (prompt + response), base_bytes, loss=float(metrics["loss"]), trainable=int(trainable),
          compiled=plan._asdict(), source=memory.peak_memory().source)


# ---------------------------------------------------------------- TRL

def run_trl(args, name):
  import peft
  import torch
  import transformers

  import dpo_step
  torch.set_num_threads(os.cpu_count())
  base_bytes = _peak_bytes()
  cfg = _config(args)
  pairs, prompt, response = _shape(args)
  n_steps = args.warmup + args.steps
  hf_tok, rows = dpo_step.trl_inputs(cfg, pairs, prompt, response, n_steps)
  torch.manual_seed(0)
  policy = transformers.LlamaForCausalLM(dpo_step._hf_config(cfg))
  if name == "trl-lora":
    ref_model = None
    peft_config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=HF_TARGETS, lora_dropout=0.0,
                                  bias="none", task_type="CAUSAL_LM")
  else:
    torch.manual_seed(1)
    ref_model, peft_config = transformers.LlamaForCausalLM(dpo_step._hf_config(cfg)), None
  times, trainer = dpo_step.trl_train(policy, ref_model, rows, hf_tok, pairs=pairs, n_steps=n_steps,
                                      warmup=args.warmup, peft_config=peft_config)
  trainable = sum(x.numel() for x in trainer.model.parameters() if x.requires_grad)
  _result(name, times, 2 * pairs * (prompt + response), base_bytes, trainable=int(trainable),
          source="host_rss")


# ---------------------------------------------------------------- driver

def _child(args, name):
  argv = [sys.executable, os.path.abspath(__file__), f"--child={name}", f"--steps={args.steps}",
          f"--warmup={args.warmup}", f"--pairs={args.pairs}", f"--prompt_len={args.prompt_len}",
          f"--response_len={args.response_len}", f"--chunk={args.chunk}"] + (["--quick"] if args.quick else [])
  t = time.perf_counter()
  proc = subprocess.run(argv, capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return dict(json.loads(line[len("RESULT "):]), wall_s=time.perf_counter() - t)
  print(f"[{name}] failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
  return None


def main(argv=None):
  args = _args(argv)
  if args.child:
    (run_trl if args.child in TRL else run_alignjax)(args, args.child)
    return
  names = [n for n in (*ALIGNJAX, *TRL) if not args.only or n in args.only.split(",")]
  cfg = _config(args)
  pairs, prompt, response = _shape(args)
  load = os.getloadavg()[0]
  results = {}
  for n in names:
    results[n] = _child(args, n)
    print(f"  {n}: " + ("failed" if results[n] is None else f"{results[n]['wall_s']:.0f}s"), flush=True)
  gib = lambda b: b / 2**30
  print(f"\nDPO step, {cfg.family} {cfg.num_params / 1e6:.0f}M params, {pairs} pairs x ({prompt}+{response}) "
        f"tokens, {args.steps} timed steps after {args.warmup} warm-up, cores={os.cpu_count()}, "
        f"load average at start {load:.1f}")
  base = results.get(BASELINE)
  print(f"{'config':18s} {'step s':>8s} {'tokens/s':>9s} {'peak GiB':>9s} {'x base':>7s} {'above-import GiB':>17s} "
        f"{'x base':>7s} {'trainable':>11s} {'compiled MiB (arg+out+temp-alias)':>34s}")
  for n in names:
    r = results[n]
    if r is None:
      print(f"{n:18s} failed")
      continue
    ratio = r["peak"] / base["peak"] if base else float("nan")
    ratio_above = r["above_import"] / base["above_import"] if base else float("nan")
    plan = ""
    if "compiled" in r:
      c = r["compiled"]
      mib = {k: v / 2**20 for k, v in c.items()}
      plan = f"{mib['total']:.0f} ({mib['argument']:.0f}+{mib['output']:.0f}+{mib['temp']:.0f}-{mib['alias']:.0f})"
    print(f"{n:18s} {r['step_s']:8.3f} {r['tokens_per_s']:9.1f} {gib(r['peak']):9.2f} {ratio:7.2f} "
          f"{gib(r['above_import']):17.2f} {ratio_above:7.2f} {r['trainable']:11,d} {plan:>34s}")
  peak_source = next((r["source"] for r in results.values() if r and "compiled" in r), "?")
  print(f"peak = alignjax.memory.peak_memory() ({peak_source}) at the end of the child; above-import = peak minus "
        f"the peak right after imports; compiled = alignjax.memory.compiled_memory of the step")
  name, limit = AIM
  if base and results.get(name):
    ratio = results[name]["peak"] / base["peak"]
    print(f"aim: {name} (LoRA, adapter-off reference) peak <= {limit}x {BASELINE} peak: "
          f"{ratio:.2f}x -> {'MET' if ratio <= limit else 'NOT MET'}")


if __name__ == "__main__":
  main()
