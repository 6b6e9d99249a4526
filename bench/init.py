r"""A run's random initialisation: one jitted program (``loop.make_policy``) vs eager per-parameter sampling.

  python bench/init.py                # the default run's model (configs/dpo_tiny.py), 3 rounds
  python bench/init.py --preset=llama_100m --rounds=2

``loop.make_policy`` draws a random init's weights in one jitted program per model
config (kept by the persistent compilation cache). The peer is what it did before and
what ``Transformer(cfg, rngs=nnx.Rngs(seed))`` does: eager sampling, one compiled
sampler per parameter shape, each too quick to compile for the persistent cache's 1 s
threshold. Each row is a fresh process (the launchers' start): ``cold`` without a cache,
``warm`` with a cache directory the previous round filled. It prints seconds to the
initialised weights (device-ready), the ratio to the peer of the same round, and whether
both draw the same weights to float32 rounding. Figures depend on the machine and its
load; compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
t0 = time.perf_counter()
import jax, numpy as np
from flax import nnx
from alignjax.models import Transformer
from alignjax.training import config as config_lib, loop
overrides = json.loads(sys.argv[3])
cfg = config_lib.build(None, **overrides)
vocab = cfg.model.model_config(64).vocab_size
imported = time.perf_counter()
if sys.argv[2] == "eager":
  model = Transformer(cfg.model.model_config(vocab), rngs=nnx.Rngs(cfg.seed))
else:
  model = loop.make_policy(cfg, vocab)
leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
print(json.dumps({"s": time.perf_counter() - imported, "sum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves)),
                  "params": int(sum(x.size for x in leaves))}))
"""


def _child(mode: str, overrides: dict, cache: str | None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), mode, json.dumps(overrides)], env=env,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="", help="config.model.preset (default: the default run's model)")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  overrides = {"model.preset": args.preset} if args.preset else {}
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_init_") as tmp:
    caches = {"eager": os.path.join(tmp, "eager"), "jitted": os.path.join(tmp, "jitted")}
    for r in range(args.rounds):
      for state in ("cold", "warm"):
        res = {m: _child(m, overrides, caches[m] if state == "warm" else None) for m in ("eager", "jitted")}
        rows.append((r + 1, state, res))
        print(f"  round {r + 1} {state}: eager {res['eager']['s']:.2f} s, jitted {res['jitted']['s']:.2f} s",
              file=sys.stderr, flush=True)
  params = rows[0][2]["eager"]["params"]
  print(f"random init of {args.preset or 'the default run model'} ({params:,} parameters), fresh process each, "
        f"{os.cpu_count()} CPUs")
  print("| round | cache | eager s (peer) | jitted s | vs peer | same weights (sum of |w|, rel. diff) |")
  print("|---|---|---|---|---|---|")
  for r, state, res in rows:
    e, j = res["eager"], res["jitted"]
    print(f"| {r} | {state} | {e['s']:.2f} | {j['s']:.2f} | {j['s'] / e['s']:.2f}x | "
          f"{abs(j['sum'] - e['sum']) / e['sum']:.1e} |")


if __name__ == "__main__":
  main()
