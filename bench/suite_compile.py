r"""XLA compile seconds and run time of test-sized programs: the suite's XLA flags vs XLA's defaults.

  python bench/suite_compile.py            # each setting in a fresh process, twice

The test suite (``tests/conftest.py``) compiles ~5,000 programs on a cold cache, nearly
all of them test-sized, so XLA's CPU compile time is most of a cold run. For each XLA
setting -- XLA's defaults (the peer), the suite's ``FAST_COMPILE_XLA_FLAGS``, and -O0 with
the same flags -- a fresh process (the persistent cache off) builds two tiny Llamas
(``tests.test_steps.tiny_model``), compiles and runs the IPO, DPO and TDPO2 train and eval
steps (online reference) and a greedy and a sampled ``decoding.generate``, and reports
XLA's backend compile seconds (``jax.monitoring``), by program, and one DPO train step's
milliseconds. Figures depend on the machine and its load; compare rows of one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import collections, json, os, sys, time
sys.path.insert(0, sys.argv[1])
import jax, numpy as np, optax
from jax import monitoring
from alignjax import decoding
from alignjax.training import algorithms, reference, steps
from tests.test_steps import make_batch, tiny_model
seconds = collections.Counter()
def listen(event, duration, **kw):
  if event == "/jax/core/compile/backend_compile_duration":
    name = kw.get("fun_name", "")
    seconds[name if name in ("jit(train_step)", "jit(eval_step)", "jit(_program)") else "other"] += duration
monitoring.register_event_duration_secs_listener(listen)
policy, ref_model = tiny_model(0), tiny_model(1)
batch = make_batch(np.random.default_rng(1))
ref, frozen = reference.online(ref_model)
tx = optax.adamw(1e-3)
state = steps.init_state(policy, tx)
for name in ("ipo", "dpo", "tdpo2"):
  step = steps.make_train_step(policy, tx, algorithms.loss(name), ref, chunk_size=4, donate=False)
  jax.block_until_ready(step(state, batch, frozen))
  jax.block_until_ready(steps.make_eval_step(policy, algorithms.loss(name), ref, chunk_size=4)(state.params, batch, frozen))
  if name == "dpo":
    dpo = step
tokens = np.random.default_rng(0).integers(1, 40, (2, 6)).astype(np.int32)
decoding.generate(policy, tokens, np.ones_like(tokens), max_new_tokens=5)
decoding.generate(policy, tokens, np.ones_like(tokens), max_new_tokens=5, temperature=0.7, top_k=3, rng=jax.random.key(0))
t = time.perf_counter()
for _ in range(50):
  out = dpo(state, batch, frozen)
jax.block_until_ready(out)
print(json.dumps(dict(seconds, step_ms=(time.perf_counter() - t) / 50 * 1e3)))
"""


def _settings() -> dict[str, str]:
  sys.path.insert(0, str(ROOT))
  os.environ["ALIGNJAX_TEST_COMPILATION_CACHE"] = "0"
  from tests import conftest  # noqa: PLC0415 (the suite's flags, as the tests set them)
  fast = " ".join(conftest.FAST_COMPILE_XLA_FLAGS)
  return {"XLA defaults (peer)": "", "suite flags": fast,
          "suite flags at -O0": fast.replace("optimization_level=1", "optimization_level=0")}


def main():
  settings = _settings()
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  print(f"{'setting':<22} {'train_s':>8} {'eval_s':>7} {'sampler_s':>9} {'other_s':>8} {'total_s':>8} "
        f"{'vs peer':>8} {'step_ms':>8} {'vs peer':>8}")
  peer = None
  for _ in range(2):
    for label, flags in settings.items():
      out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT)], env=dict(env, XLA_FLAGS=flags),
                           capture_output=True, text=True, check=True).stdout
      r = json.loads(out.strip().splitlines()[-1])
      total = sum(v for k, v in r.items() if k != "step_ms")
      if label.endswith("(peer)"):
        peer = (total, r["step_ms"])
      print(f"{label:<22} {r.get('jit(train_step)', 0):8.2f} {r.get('jit(eval_step)', 0):7.2f} "
            f"{r.get('jit(_program)', 0):9.2f} {r.get('other', 0):8.2f} {total:8.2f} {total / peer[0]:7.2f}x "
            f"{r['step_ms']:8.2f} {r['step_ms'] / peer[1]:7.2f}x")


if __name__ == "__main__":
  main()
