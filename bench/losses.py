"""Times the jit-compiled losses (forward + backward w.r.t. policy logits).

  python bench/losses.py --batch=4 --seq=256 --vocab=32000

Prints milliseconds per call (median of --iters) and achieved logits bandwidth
for each loss on the default JAX backend. Figures depend on the machine; this
script is the only place they are claimed.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from alignjax import losses as L

_B = flags.DEFINE_integer("batch", 4, "Pairs per batch.")
_T = flags.DEFINE_integer("seq", 256, "Response length.")
_V = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Logits dtype.")


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(_ITERS.value):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv):
  del argv
  B, T, V, dtype = _B.value, _T.value, _V.value, jnp.dtype(_DTYPE.value)
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  logits = [jax.random.normal(k, (B, T, V), dtype) for k in ks[:4]]
  labels = [jax.random.randint(k, (B, T), 0, V) for k in ks[4:6]]
  mask = jnp.ones((B, T), bool)

  def seq(lg, lb):
    return L.sequence_logprobs(lg, lb, mask)

  def dpo(pc, pr, rc, rr):
    return L.dpo_loss(seq(pc, labels[0]), seq(pr, labels[1]), seq(rc, labels[0]), seq(rr, labels[1]))[0].mean()

  def tdpo(pc, pr, rc, rr):
    return L.tdpo_loss(pc, pr, rc, rr, labels[0], labels[1], mask, mask)[0].mean()

  def aligndistil(p, d, rd):
    return L.aligndistil_loss(p, d, rd, mask, beta=0.1, beta2=10.0)[0].mean()

  print(f"backend={jax.default_backend()} B={B} T={T} V={V} dtype={dtype.name}")
  for name, f, n_logits in (("dpo", dpo, 4), ("tdpo2", tdpo, 4), ("aligndistil", aligndistil, 3)):
    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    sec = _time(step, *logits[:n_logits])
    gbytes = n_logits * B * T * V * dtype.itemsize / 1e9
    print(f"{name:>12}: {sec * 1e3:8.2f} ms/call  ({gbytes / sec:6.2f} GB/s of logits read)")


if __name__ == "__main__":
  app.run(main)
