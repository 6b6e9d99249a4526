r"""alignjax decoder vs transformers+torch: training throughput, MFU and load cost.

  python bench/models.py                 # ModelConfig.llama_100m, ~500 MB load test
  python bench/models.py --quick         # tiny sizes, a smoke test in seconds

Part 1, forward+backward: one batch of random tokens, loss = mean next-token
negative log-likelihood. alignjax: ``ModelConfig.llama_100m`` under ``jax.jit``,
label log-probs from ``losses.chunked_token_logprobs`` (as training computes
them; ``--logprobs=full`` uses full logits instead). Peer: transformers
``LlamaForCausalLM`` loaded from the same weights (exported with
``models.to_hf``), ``loss.backward()`` in eager torch. Reported: median
seconds per step, tokens/s, and MFU = 6 * N * tokens / seconds / peak, where N
counts the non-embedding parameters (every matmul weight, the output
projection included; the token-embedding lookup excluded; attention's
T^2 term is ignored) and peak is this machine's float32 matmul rate measured
in the same run with a large ``jnp`` matmul (torch's is printed too).

Part 2, loading: a random ~500 MB float32 Llama checkpoint is written with
``models.to_hf``, then loaded in a fresh child process with
``models.from_hf`` and, as the peer, with transformers ``from_pretrained``.
Reported: load seconds and peak host RSS (``ru_maxrss``) above the RSS of the
process right before loading, also as a multiple of the checkpoint size.

Figures depend on the machine and its load; this script is the only place they
are claimed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke test, not a measurement.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up step).")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "chunked_token_logprobs chunk size.")
_LOGPROBS = flags.DEFINE_enum("logprobs", "chunked", ["chunked", "full"], "alignjax label log-probs.")
_MATMUL = flags.DEFINE_integer("matmul_size", 4096, "Side of the square matmul measuring the peak.")
_LOAD_MB = flags.DEFINE_integer("load_mb", 500, "Size of the checkpoint for the load test (MB).")
_SKIP_LOAD = flags.DEFINE_bool("skip_load", False, "Skip part 2.")
_CHILD = flags.DEFINE_enum("child", None, ["alignjax", "torch"], "Internal: load --child_dir and report.")
_CHILD_DIR = flags.DEFINE_string("child_dir", None, "Internal: checkpoint directory for --child.")


def _median_time(fn, steps: int) -> float:
  fn()  # warm-up (compilation for JAX)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _matmul_peaks(n: int) -> tuple[float, float]:
  """float32 FLOP/s of an n x n matmul: (jnp, torch)."""
  import jax
  import jax.numpy as jnp
  import torch

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  jax_s = _median_time(lambda: mm(a, b).block_until_ready(), 3)
  ta, tb = torch.randn(n, n), torch.randn(n, n)
  torch_s = _median_time(lambda: torch.matmul(ta, tb), 3)
  return 2 * n**3 / jax_s, 2 * n**3 / torch_s


def _non_embedding_params(torch_model) -> int:
  """Matmul weights and norms; the input token embedding excluded, the output head counted."""
  emb = torch_model.get_input_embeddings().weight
  total = sum(p.numel() for p in torch_model.parameters())
  n = total - emb.numel()
  if torch_model.config.tie_word_embeddings:
    n += emb.numel()  # the tied head is still a [D, V] matmul per token
  return n


def _throughput(config) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  from alignjax import losses, models

  B, T, steps = _BATCH.value, _SEQ.value, _STEPS.value
  tokens_np = np.random.default_rng(0).integers(0, config.vocab_size, size=(B, T)).astype(np.int32)
  tokens = jnp.asarray(tokens_np)
  model = models.Transformer(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss_fn(state, tokens):
    m = nnx.merge(graphdef, state)
    labels = tokens[:, 1:]
    if _LOGPROBS.value == "chunked":
      hidden = m(tokens, return_hidden=True)[:, :-1]
      lp = losses.chunked_token_logprobs(hidden, labels, m.unembed, chunk_size=_CHUNK.value)
    else:
      lp = losses.token_logprobs(m(tokens)[:, :-1], labels)
    return -jnp.mean(lp)

  step = jax.jit(jax.value_and_grad(loss_fn))
  jax_s = _median_time(lambda: jax.block_until_ready(step(state, tokens)), steps)
  jax_loss = float(step(state, tokens)[0])

  with tempfile.TemporaryDirectory() as tmp:
    models.to_hf(model, tmp)
    del model, state
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
  torch_model.train()
  torch_tokens = torch.from_numpy(tokens_np.astype(np.int64))

  def torch_step():
    for p in torch_model.parameters():
      p.grad = None
    out = torch_model(input_ids=torch_tokens, labels=torch_tokens)
    out.loss.backward()
    return out.loss.item()

  torch_s = _median_time(torch_step, steps)
  torch_loss = torch_step()

  n_params = _non_embedding_params(torch_model)
  jax_peak, torch_peak = _matmul_peaks(_MATMUL.value)
  flops = 6 * n_params * B * T
  print(f"\n== forward+backward: {config.family} N(non-embedding)={n_params / 1e6:.1f}M "
        f"B={B} T={T} backend={jax.default_backend()} torch_threads={torch.get_num_threads()}")
  print(f"fp32 matmul peak ({_MATMUL.value}^3): jnp {jax_peak / 1e9:.1f} GFLOP/s, "
        f"torch {torch_peak / 1e9:.1f} GFLOP/s; MFU below uses the jnp peak")
  print(f"{'':12s} {'s/step':>9s} {'tokens/s':>10s} {'MFU':>7s} {'loss':>9s}")
  for name, s, loss in (("alignjax", jax_s, jax_loss), ("torch", torch_s, torch_loss)):
    print(f"{name:12s} {s:9.4f} {B * T / s:10.1f} {100 * flops / s / jax_peak:6.2f}% {loss:9.4f}")
  print(f"ratio alignjax/torch tokens/s: {torch_s / jax_s:.2f}x  "
        f"(alignjax log-probs: {_LOGPROBS.value}; torch: full logits + cross-entropy)")


def _status_bytes(field: str) -> int | None:
  """``field`` (e.g. ``VmRSS``) of /proc/self/status in bytes; None off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> int:
  """Resets the peak-RSS mark (Linux: ``clear_refs`` 5 resets VmHWM) and returns the current RSS.

  ``ru_maxrss`` cannot be reset, so a transient peak while importing jax/torch
  would hide the load's own peak; VmHWM after a reset is the load's.
  """
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return _status_bytes("VmRSS") or 0


def _peak_rss() -> int:
  return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_load(kind: str, path: str) -> None:
  """Runs in a fresh process: loads ``path`` and prints one JSON line."""
  if kind == "alignjax":
    import jax
    import jax.numpy as jnp

    from alignjax import models

    def load():
      m = models.from_hf(path, dtype=jnp.float32)
      jax.block_until_ready(jax.tree_util.tree_leaves(__import__("flax").nnx.state(m)))
      return m
  else:
    import torch
    import transformers

    def load():
      return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

  base = _reset_peak_rss()
  t = time.perf_counter()
  model = load()
  seconds = time.perf_counter() - t
  peak = _peak_rss()
  del model
  print(json.dumps({"seconds": seconds, "base_rss": base, "peak_rss": peak}))


def _dir_bytes(path: str) -> int:
  return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _load_config(models, base, target_bytes: int):
  """``base`` with the number of layers that brings float32 params near ``target_bytes``."""
  import jax
  import numpy as np
  from flax import nnx

  def count(layers):
    cfg = dataclasses.replace(base, num_layers=layers)
    abstract = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param)))

  p1, p2 = count(1), count(2)
  layers = max(1, round((target_bytes / 4 - (p1 - (p2 - p1))) / (p2 - p1)))
  return dataclasses.replace(base, num_layers=layers)


def _load(base_config) -> None:
  from flax import nnx

  from alignjax import models

  config = _load_config(models, base_config, _LOAD_MB.value * 2**20)
  tmp = tempfile.mkdtemp(prefix="bench_load_")
  try:
    model = models.Transformer(config, rngs=nnx.Rngs(1))
    models.to_hf(model, tmp)
    del model
    size = _dir_bytes(tmp)
    print(f"\n== loading a {size / 2**20:.0f} MB float32 checkpoint ({config.num_layers} layers)")
    print(f"{'':12s} {'seconds':>9s} {'peak RSS - base (MB)':>21s} {'x ckpt':>7s}")
    rows = {}
    for kind in ("alignjax", "torch"):
      out = subprocess.run(
          [sys.executable, "-m", "bench.models", f"--child={kind}", f"--child_dir={tmp}"],
          cwd=ROOT, capture_output=True, text=True, check=True,
          env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
      rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
      r = rows[kind]
      grow = r["peak_rss"] - r["base_rss"]
      print(f"{kind:12s} {r['seconds']:9.3f} {grow / 2**20:21.0f} {grow / size:7.2f}")
    print(f"ratio alignjax/torch load time: {rows['alignjax']['seconds'] / rows['torch']['seconds']:.2f}x")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv):
  del argv
  if _CHILD.value:
    _child_load(_CHILD.value, _CHILD_DIR.value)
    return
  from alignjax import models

  if _QUICK.value:
    config = models.ModelConfig.llama_tiny()
    for flag, value in ((_BATCH, 2), (_SEQ, 32), (_STEPS, 2), (_MATMUL, 256), (_LOAD_MB, 4),
                        (_CHUNK, 8)):
      if not flag.present:
        flags.FLAGS[flag.name].value = value
  else:
    config = models.ModelConfig.llama_100m()
  config = dataclasses.replace(config, dtype="float32", param_dtype="float32")
  _throughput(config)
  if not _SKIP_LOAD.value:
    _load(config)


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  app.run(main)
