"""Tests of alignjax.aot (ahead-of-time planning) and launch/plan.py.

With libtpu installed the tiny steps are compiled by the TPU compiler for abstract
topologies; without it, by the CPU fallback on the 8 fake CPU devices of conftest.
References: ModelConfig.num_params (closed-form parameter count), the bytes of float32
Adam moments (2 per parameter), the published HBM of the chips, and the training step
lowered directly from a concrete model by ``alignjax.training.steps``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from alignjax import aot  # noqa: E402
from alignjax.models import ModelConfig, Transformer, presets  # noqa: E402
from tests import launcher_zygote  # noqa: E402
from tests.conftest import xla_flags  # noqa: E402

pytestmark = pytest.mark.no_compilation_cache  # tests/conftest.py
ROOT = Path(__file__).resolve().parents[1]
# ALIGNJAX_AOT_TEST_BACKEND=cpu exercises the CPU fallback even where libtpu is installed.
BACKEND = os.environ.get("ALIGNJAX_AOT_TEST_BACKEND") or ("tpu" if aot.libtpu_available() else "cpu")
TINY = ModelConfig.llama_tiny()


def _exp(**kw):
  base = dict(algorithm="dpo", model="llama_tiny", batch_size=8, prompt_len=16, response_len=16,
              dtype="float32", frozen_dtype="float32")
  base.update(kw)
  return aot.Experiment(**base)


@pytest.fixture(scope="module")
def v5e():
  return aot.get_topology("v5e:2x2", backend=BACKEND)


@pytest.fixture(scope="module")
def searched(v5e, tmp_path_factory):
  """Search over fsdp=4 and data=4 (one remat): two compiles, shared by several tests."""
  cache = str(tmp_path_factory.mktemp("aot_cache"))
  results = aot.search(_exp(), v5e, remats=("none",), meshes=[(1, 4, 1), (4, 1, 1)],
                       cache_dir=cache, exhaustive=True, include_unfit=True)
  return cache, results


def test_chip_table_matches_published_figures():
  # Google Cloud TPU docs (v4, v5e, v5p, v6e pages): HBM GiB, bf16 TFLOP/s, HBM GB/s.
  published = {"v4": (32, 275, 1200), "v5e": (16, 197, 819), "v5p": (95, 459, 2765), "v6e": (32, 918, 1640)}
  for name, (hbm, tflops, bw) in published.items():
    c = aot.CHIPS[name]
    assert (c.hbm_gib, c.bf16_tflops, c.hbm_gbps) == (hbm, tflops, bw)
    assert c.source.startswith("https://cloud.google.com/tpu/docs/")


def test_presets_match_published_parameter_counts():
  # Published sizes (model cards): 8.03B, 70.6B, 9.24B, 27.2B, 7.62B, 72.7B.
  expected = {"llama3_8b": 8.03e9, "llama3_70b": 70.55e9, "gemma2_9b": 9.24e9,
              "gemma2_27b": 27.23e9, "qwen2_5_7b": 7.62e9, "qwen2_5_72b": 72.71e9}
  for name, n in expected.items():
    assert presets.get(name).num_params == pytest.approx(n, rel=2e-3), name
  g = presets.get("gemma2_27b")
  assert g.attention_scale == pytest.approx(144 ** -0.5) and g.sliding_window == 4096
  assert presets.get("llama_tiny") == TINY


def test_tiny_dpo_compiles_on_v5e_and_v4(searched):
  _, results = searched
  r5 = next(r for r in results if r.mesh == (1, 4, 1))
  t4 = aot.get_topology("v4:2x2x1", backend=BACKEND)
  mesh4 = (2, 2, t4.num_devices // 4)
  r4 = aot.plan(_exp(), t4, mesh4)
  for r, kind in ((r5, "v5"), (r4, "v4")):
    assert r.backend == BACKEND and r.compiled
    if BACKEND == "tpu":
      assert kind in r.device_kind.lower().replace(" ", "")
    for field in ("argument_bytes", "output_bytes", "peak_bytes", "params_bytes", "opt_bytes",
                  "frozen_bytes", "flops", "bytes_accessed", "step_time_s", "tokens_per_s"):
      assert getattr(r, field) > 0, (kind, field)
    assert r.fits and r.margin_bytes > 0
    # Compiled FLOPs (all devices) are at least the (6+2)·N·T matmul count and within the
    # attention/remat/softmax overhead of a tiny model.
    ratio = r.flops * r.num_devices / r.formula_flops
    assert 0.9 < ratio < 3.0, (kind, ratio)
  assert r5.hbm_bytes == 16 * aot.GiB if BACKEND == "tpu" else True


def test_parameter_bytes_fall_by_fsdp_factor(searched):
  _, results = searched
  f1 = next(r for r in results if r.mesh == (4, 1, 1))
  f4 = next(r for r in results if r.mesh == (1, 4, 1))
  n = TINY.num_params
  # Replicated (fsdp=1): every device holds all float32 parameters, 2 Adam moments each.
  assert f1.params_bytes == 4 * n
  # mu, nu + int32 counts of Adam, the schedule and inject_hyperparams + its float32 learning rate,
  # warm-up, step budget and weight decay (training's optimizer: loop.optimizer).
  assert f1.opt_bytes == 2 * 4 * n + 3 * 4 + 4 * 4
  # fsdp=4: the embed axis is split; only the [D] norms (replicated) are left whole.
  norms = (2 * TINY.num_layers + 1) * TINY.hidden_size * 4
  assert f4.params_bytes == (4 * n - norms) // 4 + norms
  assert 3.5 < f1.params_bytes / f4.params_bytes <= 4.0
  # The compiler's own argument bytes (params + optimizer + frozen + batch) fall too.
  assert f4.argument_bytes < 0.5 * f1.argument_bytes


def test_70b_does_not_fit_v5e_2x2_but_fits_large_slice_with_fsdp():
  exp = _exp(model="llama3_70b", batch_size=32, prompt_len=512, response_len=512,
             dtype="bfloat16", frozen_dtype="bfloat16", remat="full")
  small = aot.get_topology("v5e:2x2", backend=BACKEND)
  r = aot.plan(exp, small, (1, 4, 1), compile=False)
  n = presets.get("llama3_70b").num_params
  # float32 params + 2 Adam moments + a bf16 reference, split 4 ways: ~246 GiB per device.
  assert r.peak_bytes >= (12 + 2) * n / 4 * 0.99
  assert not r.fits and r.margin_bytes < -200 * aot.GiB
  assert "short by" in aot.describe(r)
  if BACKEND == "cpu":
    pytest.skip("the large slice needs libtpu (more devices than the CPU fallback has)")
  big = aot.get_topology("v5p:4x4x8", backend=BACKEND)
  r = aot.plan(exp, big, (1, 32, 4), compile=False)
  # Compiling 80 unrolled layers takes minutes on 2 cores, so the test checks the lower
  # bound (params + optimizer + reference + batch): 14 bytes/param over 128 chips ~ 7.2 GiB.
  assert r.fits and not r.compiled
  assert r.peak_bytes == pytest.approx((12 * n + 2 * n) / 128, rel=0.02)


def test_search_returns_fitting_configs_ranked_and_top_matches_direct_compile(searched, v5e):
  cache, results = searched
  assert len(results) == 2 and all(r.compiled for r in results)
  # Shrink HBM below one configuration's peak: the search (now from the cache, no compile)
  # keeps only what fits, fastest first.
  lo, hi = sorted(r.peak_bytes for r in results)
  if lo == hi:
    pytest.skip("both meshes have the same peak")
  chip = dataclasses.replace(v5e.chip, hbm_gib=(lo + hi) / 2 / aot.GiB)
  small = dataclasses.replace(v5e, chip=chip)
  ranked = aot.search(_exp(), small, remats=("none",), meshes=[(1, 4, 1), (4, 1, 1)], cache_dir=cache)
  assert len(ranked) == 1 and ranked[0].peak_bytes == lo and ranked[0].fits
  full = aot.search(_exp(), v5e, remats=("none",), meshes=[(1, 4, 1), (4, 1, 1)], cache_dir=cache)
  times = [r.step_time_s for r in full]
  assert times == sorted(times) and all(r.fits for r in full)
  # The cached answers are the fixture's compiles: search compiled each configuration with aot.plan
  # (an empty cache directory), so those results are direct compiles of the same arguments.
  for cached in full:
    direct = next(r for r in results if r.mesh == cached.mesh and r.remat == cached.remat)
    for field in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "flops", "params_bytes"):
      assert getattr(direct, field) == getattr(cached, field), field


def test_compiled_step_is_the_training_step():
  """The planner's step lowers to the same HLO as the step training builds from a real model."""
  from alignjax import sharding as sharding_lib
  from alignjax.data import batch as batch_lib
  from alignjax.training import algorithms, config as config_lib, loop, reference as reference_lib, steps

  cpu = aot.get_topology("v5e:2x2", backend="cpu")
  exp = _exp(batch_size=4)
  built = aot.build_step(exp, cpu, (1, 4, 1))
  assert built.step.__wrapped__.__module__ == "alignjax.training.steps"
  assert built.step.__wrapped__.__qualname__ == "make_train_step.<locals>.train_step"
  planned = built.step.lower(*built.args).as_text()

  # Training's own path: concrete models, init_state, the reference module, real arrays.
  mesh = sharding_lib.make_mesh(1, 4, 1, devices=jax.devices("cpu")[:4])
  cfg = exp.model_config()
  policy = Transformer(cfg, rngs=nnx.Rngs(0))
  ref_model = Transformer(dataclasses.replace(cfg, param_dtype="float32"), rngs=nnx.Rngs(1))
  tx = loop.optimizer(config_lib.PhaseConfig(steps=7, learning_rate=3e-4, warmup_steps=2), weight_decay=0.1)
  ref, frozen = reference_lib.online(ref_model, mesh=mesh)
  step = steps.make_train_step(policy, tx, algorithms.loss("dpo"), ref, mesh=mesh,
                               max_grad_norm=exp.max_grad_norm, compute_dtype=jnp.float32,
                               chunk_size=exp.chunk_size)
  state = steps.init_state(policy, tx, mesh=mesh)
  T = exp.seq_len
  batch = {}
  for side in batch_lib.SIDES:
    batch[batch_lib.key(side, "tokens")] = jnp.zeros((4, T), jnp.int32)
    batch[batch_lib.key(side, "attention")] = jnp.ones((4, T), jnp.int32)
    batch[batch_lib.key(side, "response")] = jnp.ones((4, T), jnp.int32)
  batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
  trained = step.lower(state, batch, frozen).as_text()
  assert planned == trained


def test_sampler_program_compiles_with_kv_cache(v5e):
  exp = _exp(prompt_len=16, response_len=16)
  r = aot.plan_sampler(exp, v5e, (1, 4, 1))
  assert r.compiled and r.fits and r.peak_bytes > 0 and r.argument_bytes > 0
  # Prefill + one decode step: 2 FLOPs per parameter per token (matmuls), plus attention.
  ratio = r.flops * r.num_devices / (2 * TINY.num_params * 8 * (16 + 1))
  assert 0.8 < ratio < 2.0, ratio
  # The argument bytes hold the (fsdp-sharded) weights: about N·4/4 bytes per device.
  assert r.params_bytes == pytest.approx(TINY.num_params, rel=0.05)


def test_bad_inputs_one_line_errors(v5e):
  with pytest.raises(ValueError, match=r"unknown topology .*v5p:4x4x4") as e:
    aot.get_topology("v9z:2x2")
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"needs 3 positive dimensions"):
    aot.get_topology("v5p:2x2")
  with pytest.raises(ValueError, match=r"mesh.*valid meshes include.*1,4,1") as e:
    aot.check_mesh((3, 1, 1), v5e, _exp())
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"batch_size` 6 must be divisible by the data axes data\*fsdp = 4") as e:
    aot.check_mesh((2, 2, 1), v5e, _exp(batch_size=6))
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"unknown `algorithm`.*'dpo'"):
    _exp(algorithm="nope")
  with pytest.raises(ValueError, match=r"unknown model preset .*llama3_70b"):
    _exp(model="llama9_1t").model_config()


def test_plan_launcher_bad_topology_exits_2():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = launcher_zygote.run([sys.executable, str(ROOT / "launch" / "plan.py"), "--topology=v7x:2",
                             "--model=llama_tiny"], env=env, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("plan:")]
  assert len(lines) == 1 and "unknown topology" in lines[0] and "v5e:2x2" in lines[0]


def test_emit_config_round_trip_runs_on_fake_devices(tmp_path):
  """launch/plan.py --emit_config writes the plan as a config that launch/train.py runs (shrunk on 4 CPU devices)."""
  import subprocess
  import sys
  from pathlib import Path
  from alignjax.training import config as config_lib
  root = Path(__file__).resolve().parents[1]
  py = str(root / ".venv" / "bin" / "python") if (root / ".venv" / "bin" / "python").exists() else sys.executable
  exp = aot.Experiment(algorithm="dpo", model="llama_100m", batch_size=8, prompt_len=16, response_len=16,
                       grad_accum=2, reference="precomputed", remat="full", dtype="bfloat16")
  path = str(tmp_path / "plan.py")
  lines = []
  aot.report(exp, aot.get_topology("v5e:2x2", backend="cpu"), "1,2,2", compile=False, emit=lines.append,
             emit_config=path)
  assert any(path in line for line in lines)
  import importlib.util
  spec = importlib.util.spec_from_file_location("plan_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.build(module.get_config())
  want = {"model.preset": "llama_100m", "model.remat": "full", "mesh.fsdp": 2, "mesh.tensor": 2, "grad_accum": 2,
          "batch_size": 8, "precision.compute_dtype": "bfloat16", "reference.mode": "precomputed"}
  flat = config_lib.flatten(cfg)
  assert {k: flat[k] for k in want} == want
  env = dict(__import__("os").environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root),
             XLA_FLAGS=xla_flags(4))
  proc = launcher_zygote.run([py, "-m", "launch.train", f"--config={path}", f"--workdir={tmp_path / 'run'}",
                              "--config.model.preset=llama_tiny", "--config.sft.steps=1", "--config.dpo.steps=2",
                              "--config.data.train_examples=64", "--config.data.eval_examples=8",
                              "--config.eval_batch_size=8", "--config.log_every=1"],
                             cwd=root, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "run" / "final_metrics.json").exists()
