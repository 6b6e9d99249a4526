r"""Decoding speed: alignjax's sampler vs transformers ``generate`` (and Tunix's sampler).

  python bench/decoding.py                 # tiny + ~100M Llama, B=1 and B=8, 32 + 128 tokens
  python bench/decoding.py --quick         # smoke test: tiny model, few tokens
  python bench/decoding.py --dtype=bfloat16  # bf16 weights, cache and compute for every peer

For each model size the same random weights are used by every peer: an alignjax
``ModelConfig`` preset is initialised randomly, exported with ``models.to_hf`` and loaded
by transformers (eval mode) and again by ``models.from_hf``, both in ``--dtype``: float32,
or bfloat16 weights, KV cache and matmuls (``from_hf(dtype=bfloat16)``; transformers'
``dtype=torch.bfloat16``). In bf16 the two greedy decodes may part ways after a near tie
(rounding differs), so ``agree`` can fall below 100% without either being wrong. Greedy decoding,
no EOS, so every row generates exactly ``--new_tokens`` tokens. Prints tokens/s (median
of ``--repeats`` timed calls after one warm-up call), the ratio to transformers, whether
the greedy tokens agree with transformers, and the number of XLA compilations during
the warm-up and the timed calls (0 expected for the latter).

Decode step: ``ms/step`` is the time one more decode step adds, (t(N) - t(N0)) / (N - N0)
for N = ``--new_tokens`` and N0 = N / 4 new tokens (medians of ``--repeats`` calls each), so
the prefill and per-call set-up cancel out; ``step ratio`` compares the two libraries' steps
(``tok/s`` and ``ratio vs transformers`` include the prefill). Keep ``--new_tokens`` >= 64:
below 16 new tokens (``sampler.OUT_MAJOR_MIN_TOKENS``) the sampler decodes without the
transposed weights described below, so a shorter N0 would mix the two paths.
Roofline: a decode step reads every weight once (the matmul parameters, LM head included;
the embedding rows looked up are negligible) plus the KV cache (K and V of every layer,
mean length ``prompt + (N + N0) / 2``), at ``--dtype``'s size. ``bytes/step`` is that sum; the floor is
``bytes/step / bandwidth``, the bandwidth measured here as the read rate of a jitted sum
over a 256 MiB array (a decode step reads; an elementwise copy into a fresh output also
pays for first-touching its pages and understates the rate ~3x on CPU); ``roofline`` =
floor / ``ms/step``. The bandwidth is
measured at the start and again right before each row; a row uses the largest so far (a
measurement taken while other work loads the machine understates it). ``cpu ms/token``
is the process CPU time (all threads) per new token, prefill included, which moves less
than the wall time when the machine is shared. ``XLA matmul GB/s`` / ``XLA transposed matmul GB/s`` /
``torch matmul GB/s``: the rate at which each library's matmul alone reads the layers'
projection weights for B rows (:func:`matmul_stream_rates`), the kernels' own ceiling
under the roofline; "transposed" is the product of weights held ``[out, in]``, which
the sampler's decode loop uses on CPU for the linear layers' weights and the
unembedding (``transformer.out_major``); in bf16 the XLA ones are the products alignjax's CPU projections compute
(bf16 x bf16 -> float32, rounded to bf16).

Tunix (``google-tunix``) is benchmarked when it can be imported (its sampler module only;
tunix/__init__.py, which pulls in its trainers, is bypassed); its sampler takes text, so a
word-level tokenizer with one word per token id is built for it. Tunix's pinned
dependencies would downgrade transformers, so keep it out of the project venv:

  .venv/bin/pip install --no-deps --target /tmp/tunix_site google-tunix jaxtyping wadler_lindig sentencepiece
  PYTHONPATH=/tmp/tunix_site .venv/bin/python bench/decoding.py

Without it the reason is printed and Tunix is skipped.
Figures depend on the machine; this script is the only place they are claimed.
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

_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: tiny model, B in (1, 2), 8 + 8 tokens, one repeat.")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "100m"], "Model presets: tiny, 100m.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
_TUNIX = flags.DEFINE_bool("tunix", True, "Also time Tunix's sampler when importable (float32 only).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Weights, KV cache and compute dtype of every peer.")


class CompileCounter:
  """Counts XLA backend compilations through ``jax.monitoring`` duration events."""

  def __init__(self):
    import jax  # pylint: disable=import-outside-toplevel
    self.count = 0

    def listener(event, duration, **kwargs):
      del duration, kwargs
      if event == "/jax/core/compile/backend_compile_duration":
        self.count += 1
    jax.monitoring.register_event_duration_secs_listener(listener)


def _median_time(fn, repeats, cpu_out=None):
  """Median wall seconds of ``repeats`` calls; the median process CPU seconds go to ``cpu_out``."""
  times, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  if cpu_out is not None:
    cpu_out.append(statistics.median(cpu))
  return statistics.median(times)


def _best_time(fn, repeats: int) -> float:
  """Fewest wall seconds of ``repeats`` calls of ``fn``, after one untimed call (compilation, first touch)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def read_bandwidth() -> float:
  """Bytes read per second by a jitted sum over a 256 MiB float32 array (best of 10)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n = 2 ** 26
  x = jnp.ones((n,), jnp.float32)
  total = jax.jit(jnp.sum)
  return 4 * n / _best_time(lambda: jax.block_until_ready(total(x)), 10)


def matmul_stream_rates(hf, batch: int, repeats: int = 5, dtype: str = "float32") -> tuple[float, float, float]:
  """Bytes/s at which XLA's and torch's matmuls read this model's projection weights for ``batch`` rows.

  The decoder layers' ``nn.Linear`` weights of the transformers model (the LM head left
  out), each multiplied once by a ``[batch, in]`` activation as a decode step does: XLA
  with the weight in alignjax's ``[in, out]`` layout (alignjax's own projection product,
  ``transformer._weight_product``: in bfloat16 on CPU it accumulates into float32 and
  rounds to bf16; one jitted program for all of them), XLA with the weight transposed,
  ``[out, in]`` (``transformer._out_major_product``, what the sampler's decode loop
  computes for these weights on CPU; ``transformer.out_major``), and torch with its own
  ``[out, in]`` (``F.linear``). Best of ``repeats``. Returns (XLA, XLA transposed, torch).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from alignjax.models.transformer import OutMajor, _out_major_product, _weight_product  # pylint: disable=import-outside-toplevel
  tdt = getattr(torch, dtype)
  weights = [m.weight.detach().to(tdt) for name, m in hf.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]
  nbytes = weights[0].element_size() * sum(w.numel() for w in weights)
  ours = [jnp.asarray(w.float().numpy().T, dtype) for w in weights]
  xs = {k: np.random.default_rng(0).standard_normal((batch, k), np.float32) for k in {w.shape[1] for w in weights}}
  products = jax.jit(lambda xs, ws: [_weight_product(xs[w.shape[0]], w, 1) for w in ws])
  jx = {k: jnp.asarray(v, dtype) for k, v in xs.items()}
  tx = {k: torch.from_numpy(v).to(tdt) for k, v in xs.items()}
  t_xla = _best_time(lambda: jax.block_until_ready(products(jx, ours)), repeats)
  transposed = [jnp.asarray(w.float().numpy(), dtype) for w in weights]
  products_t = jax.jit(lambda xs, ws: [_out_major_product(xs[w.shape[1]], OutMajor(w, out_shape=(w.shape[0],)), 1,
                                                          xs[w.shape[1]].dtype) for w in ws])
  t_xla_t = _best_time(lambda: jax.block_until_ready(products_t(jx, transposed)), repeats)
  with torch.no_grad():
    t_torch = _best_time(lambda: [torch.nn.functional.linear(tx[w.shape[1]], w) for w in weights], repeats)
  return nbytes / t_xla, nbytes / t_xla_t, nbytes / t_torch


def bytes_per_step(cfg, batch: int, cache_len: float, itemsize: int = 4) -> float:
  """Weights read once (matmul parameters, LM head included) + the K/V cache at ``cache_len`` positions."""
  matmul_params = cfg.num_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
  kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * batch * cache_len
  return itemsize * (matmul_params + kv)


def _tunix_sampler_cls():
  """Tunix's ``Sampler`` class, or the reason it cannot be used."""
  try:
    import importlib  # pylint: disable=import-outside-toplevel
    import importlib.util  # pylint: disable=import-outside-toplevel
    import types  # pylint: disable=import-outside-toplevel
    spec = importlib.util.find_spec("tunix")
    if spec is None:
      return None, "google-tunix is not importable (see this script's docstring for a side install)"
    if "tunix" not in sys.modules:
      # Import the sampler without tunix/__init__.py, which pulls in its trainers' dependencies.
      pkg = types.ModuleType("tunix")
      pkg.__path__ = list(spec.submodule_search_locations)
      sys.modules["tunix"] = pkg
    sampler = importlib.import_module("tunix.generate.sampler")
    llama3 = importlib.import_module("tunix.models.llama3.model")
    return (sampler, llama3), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"Tunix's sampler could not be imported: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _word_tokenizer(vocab_size):
  """A transformers tokenizer with one word ``t<i>`` per token id (for Tunix's text API)."""
  from tokenizers import Tokenizer, models as tk_models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  vocab = {f"t{i}": i for i in range(vocab_size)}
  tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="t0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                                 eos_token="t2")


def _tunix_cache_size(prompt_len: int, new_tokens: int) -> int:
  """Tunix pads the tokenised prompt (BOS + prompt) to a power of two; the cache must hold that + new tokens."""
  return 2 ** prompt_len.bit_length() + new_tokens + 8


def _tunix_model(mods, cfg, hf_dir):
  """A Tunix Llama-3 with the benchmark's weights, or raises."""
  _, llama3 = mods
  tcfg = llama3.ModelConfig(
      num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
      hidden_dim=cfg.intermediate_size, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      num_kv_heads=cfg.num_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.norm_eps,
      weight_tying=cfg.tie_embeddings)
  from tunix.models.llama3 import params as llama_params  # pylint: disable=import-outside-toplevel
  return llama_params.create_model_from_safe_tensors(hf_dir, tcfg)


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel

  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from alignjax import decoding, models  # pylint: disable=import-outside-toplevel

  quick = _QUICK.value
  sizes = ["tiny"] if quick else _SIZES.value
  batches = [1, 2] if quick else [int(b) for b in _BATCHES.value]
  P, N = (8, 8) if quick else (_PROMPT.value, _NEW.value)
  N0 = N // 4  # the shorter decode that the per-step time is taken against
  repeats = 1 if quick else _REPEATS.value
  dtype = _DTYPE.value
  itemsize = jnp.dtype(dtype).itemsize
  counter = CompileCounter()
  tunix_mods, tunix_reason = ((None, "--notunix") if not _TUNIX.value else
                              (None, "float32 only in this script") if dtype != "float32" else _tunix_sampler_cls())
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); prompt {P}, new {N}, greedy, {dtype}")
  if tunix_mods is None:
    print(f"Tunix: skipped ({tunix_reason})")
  bandwidth = read_bandwidth()
  print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
  rows = []
  for size in sizes:
    preset = {"tiny": models.ModelConfig.llama_tiny, "100m": models.ModelConfig.llama_100m}[size]
    cfg = preset(max_position_embeddings=max(2048, P + N))
    with tempfile.TemporaryDirectory() as tmp:
      hf_dir = os.path.join(tmp, "hf")
      models.to_hf(models.Transformer(cfg, rngs=nnx.Rngs(0)), hf_dir)
      hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
      model = models.from_hf(hf_dir, dtype=dtype)
      tunix_model, tunix_err = None, None
      if tunix_mods is not None:
        try:
          tunix_model = _tunix_model(tunix_mods, cfg, hf_dir)
        except Exception as e:  # pylint: disable=broad-except
          tunix_err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      for B in batches:
        rng = np.random.default_rng(B)
        prompts = rng.integers(3, cfg.vocab_size, (B, P)).astype(np.int32)
        mask = np.ones((B, P), bool)

        def run_alignjax(n=N):
          out = decoding.generate(model, prompts, mask, max_new_tokens=n)
          return np.asarray(out.tokens)

        before = counter.count
        ours = run_alignjax()
        warm_compiles = counter.count - before
        bandwidth = max(bandwidth, read_bandwidth())
        before = counter.count
        cpu_ours, cpu_hf = [], []
        t_ours = _median_time(run_alignjax, repeats, cpu_ours)
        timed_compiles = counter.count - before

        ids = torch.tensor(prompts, dtype=torch.long)
        am = torch.ones_like(ids)

        def run_hf(n=N):
          with torch.no_grad():
            return hf.generate(ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)[:, P:].numpy()
        theirs = run_hf()
        t_hf = _median_time(run_hf, repeats, cpu_hf)
        # The decode step: the time that N - N0 more new tokens add (prefill and set-up cancel out).
        run_alignjax(N0)
        step_ours = (t_ours - _median_time(lambda: run_alignjax(N0), repeats)) / (N - N0)
        step_hf = (t_hf - _median_time(lambda: run_hf(N0), repeats)) / (N - N0)
        agree = float(np.mean(ours == theirs))
        tok = B * N
        xla_rate, xla_t_rate, torch_rate = matmul_stream_rates(hf, B, dtype=dtype)
        step_bytes = bytes_per_step(cfg, B, P + (N + N0) / 2, itemsize)
        floor = step_bytes / bandwidth
        line = {"size": size, "B": B, "alignjax tok/s": tok / t_ours, "transformers tok/s": tok / t_hf,
                "ratio vs transformers": t_hf / t_ours, "agree": agree, "MB/step": step_bytes / 1e6,
                "alignjax ms/step": 1e3 * step_ours, "transformers ms/step": 1e3 * step_hf,
                "step ratio": step_hf / step_ours,
                "alignjax cpu ms/token": 1e3 * cpu_ours[0] / N, "transformers cpu ms/token": 1e3 * cpu_hf[0] / N,
                "GB/s used": bandwidth / 1e9, "floor ms/step": 1e3 * floor,
                "alignjax roofline": floor / step_ours, "transformers roofline": floor / step_hf,
                "XLA matmul GB/s": xla_rate / 1e9, "XLA transposed matmul GB/s": xla_t_rate / 1e9,
                "torch matmul GB/s": torch_rate / 1e9,
                "compiles (warm-up/timed)": f"{warm_compiles}/{timed_compiles}"}
        if tunix_model is not None:
          try:
            sampler_mod, _ = tunix_mods
            tk = _word_tokenizer(cfg.vocab_size)
            sampler = sampler_mod.Sampler(
                tunix_model, tk, sampler_mod.CacheConfig(cache_size=_tunix_cache_size(P, N), num_layers=cfg.num_layers,
                                                         num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
            texts = [" ".join(f"t{i}" for i in row) for row in prompts]

            def run_tunix():
              out = sampler(texts, max_generation_steps=N, max_prompt_length=P, temperature=0.0,
                            eos_tokens=[cfg.vocab_size + 7])
              jax.block_until_ready(out.tokens)
              return out
            run_tunix()
            t_tunix = _median_time(run_tunix, repeats)
            line["tunix tok/s"] = tok / t_tunix
            line["ratio vs tunix"] = t_tunix / t_ours
          except Exception as e:  # pylint: disable=broad-except
            line["tunix"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        elif tunix_err:
          line["tunix"] = f"model failed: {tunix_err}"
        rows.append(line)
        print("  ".join(f"{k}={v:.0%}" if "roofline" in k else
                        f"{k}={v:.1f}" if isinstance(v, float) and "agree" not in k else
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()),
              flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
