"""The loop's pod fields: precision, remat, layer scan, accumulation, chunking and reference modes.

Independent references: the plain float32 / one-batch / online-reference run of
the same config (equivalences the definitions give), float64 NumPy of the IPO
loss with a zero reference for reference-free mode, and the dtypes on disk.
Bad input is refused in one line before any data or model work.
"""

import json

import numpy as np
import pytest

from alignjax.training import config as config_lib
from alignjax.training import loop
from tests import launcher_zygote
from tests.test_run import PY, ROOT, TINY, env, tiny

FAST = {**TINY, "model.num_layers": 2, "sft.steps": 2, "dpo.steps": 3, "checkpoint_every": 100, "log_every": 100}


def _run(tmp_path, name, **fields):
  return loop.run(config_lib.build(None, **{**FAST, **fields}), workdir=str(tmp_path / name), handle_signals=False)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("base"), "run")


@pytest.mark.parametrize("fields", [
    {"grad_accum": 2},                                    # accumulation == one batch of the same size
    {"model.remat": "full"},                              # recomputation changes no number
    {"reference.mode": "precomputed"},                    # one reference pass == the online reference
    {"model.scan_layers": True},                          # stacked blocks under nnx.scan
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_equivalent_runs_match_the_plain_run(baseline, tmp_path, fields):
  got = _run(tmp_path, "run", **fields)
  for when in ("eval_before", "eval_after"):
    np.testing.assert_allclose(got[when]["loss"], baseline[when]["loss"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(got[when]["rewards/margins"], baseline[when]["rewards/margins"], rtol=2e-3, atol=1e-6)


def test_bf16_compute_tracks_float32_and_keeps_float32_master_weights(baseline, tmp_path):
  got = _run(tmp_path, "bf16", **{"precision.compute_dtype": "bfloat16"})
  np.testing.assert_allclose(got["eval_after"]["loss"], baseline["eval_after"]["loss"], rtol=2e-2)
  policy = loop.load_policy(str(tmp_path / "bf16"))
  assert policy.config.param_dtype == "float32" and policy.config.dtype == "bfloat16"
  assert {str(x.dtype) for x in __import__("jax").tree.leaves(
      __import__("flax").nnx.state(policy, __import__("flax").nnx.Param))} == {"float32"}


def test_reference_free_ipo_has_the_definitions_loss(tmp_path):
  """Reference-free IPO before training: mean of (beta (log pi(y_w) - log pi(y_l)) - 1)^2, float64 NumPy."""
  from alignjax.data import to_arrays
  from tests.test_steps import numpy_seq_logps
  fields = {**FAST, "sft.steps": 0, "reference.mode": "free", "loss.name": "ipo", "loss.beta": 0.5}
  cfg = config_lib.build(None, **fields)
  got = loop.run(cfg, workdir=str(tmp_path / "free"), handle_signals=False)
  _, eval_source, vocab, _ = loop.open_data(cfg, str(tmp_path / "free"))
  data = to_arrays(eval_source)
  policy = loop.make_policy(cfg, vocab)          # the same seeded initialisation the run started from
  h = 0.5 * (numpy_seq_logps(policy, data, "chosen") - numpy_seq_logps(policy, data, "rejected"))
  np.testing.assert_allclose(got["eval_before"]["loss"], np.mean((h - 1.0) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got["eval_before"]["rewards/margins"], np.mean(h), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("precision.compute_dtype", "float16x", "config.precision.compute_dtype must be one of float32, bfloat16"),
    ("precision.param_dtype", "int8", "config.precision.param_dtype must be one of"),
    ("reference.mode", "adapter_off", "config.reference.mode='adapter_off' needs LoRA"),
    ("reference.mode", "offline", "config.reference.mode must be one of"),
    ("grad_accum", 3, "config.grad_accum (3) must divide config.batch_size (8)"),
    ("model.remat", "everything", "config.model.remat must be one of"),
    ("chunk_size", 0, "config.chunk_size must be >= 1"),
])
def test_bad_pod_fields_are_one_line(field, value, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.build(None, **{**FAST, field: value})
  assert message in str(e.value) and "\n" not in str(e.value)


def test_reference_mode_needs_a_compatible_algorithm():
  with pytest.raises(config_lib.ConfigError, match="'tdpo2' needs 'reference_logits'"):
    config_lib.build(None, **{**FAST, "loss.name": "tdpo2", "reference.mode": "precomputed"})


def test_bad_pod_field_exits_2_before_any_work(tmp_path):
  proc = launcher_zygote.run([PY, "-m", "launch.train", f"--workdir={tmp_path / 'run'}",
                              "--config.precision.compute_dtype=fp8", "--config.grad_accum=1"],
                             cwd=ROOT, env=env(), timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("WARNING", "I0", "W0"))]
  assert len(lines) == 1 and "config.precision.compute_dtype" in lines[0], proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_pod_fields_are_in_the_identity_and_help(tmp_path):
  cfg = config_lib.build(None, **{**FAST, "grad_accum": 2, "precision.compute_dtype": "bfloat16"})
  ident = config_lib.identity(cfg)
  assert ident["grad_accum"] == 2 and ident["precision.compute_dtype"] == "bfloat16"
  assert ident["reference.mode"] == "online" and ident["lora.rank"] == 0
  text = config_lib.field_help()
  for f in ("precision.compute_dtype", "model.remat", "model.scan_layers", "grad_accum", "reference.mode",
            "lora.rank", "lora.targets", "chunk_size"):
    assert f"--config.{f}" in text
  # A run stored before these fields existed resumes: absent fields equal to their defaults match.
  stored = {k: v for k, v in config_lib.identity(config_lib.build(None, **FAST)).items()
            if not k.startswith(("precision.", "reference.", "lora.")) and k not in ("grad_accum", "chunk_size",
                                                                                    "model.remat", "model.scan_layers")}
  assert config_lib.identity_diff(stored, config_lib.build(None, **FAST)) == []
  assert config_lib.identity_diff(stored, cfg) != []


def test_memory_report_planner_agrees_with_the_compiled_step(tmp_path):
  """report_memory: the planner's per-device figure and the compiled step's memory analysis, in the run log."""
  import io
  import re
  from alignjax.training import runtime as run_lib
  cfg = config_lib.build(None, **{**FAST, "report_memory": True, "sft.steps": 0, "dpo.steps": 1})
  stream = io.StringIO()
  loop.run(cfg, workdir=str(tmp_path / "mem"), handle_signals=False,
           progress=run_lib.Progress(1, 0, stream=stream, interactive=False))
  text = stream.getvalue()
  units = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
  m = re.search(r"planned ([\d.]+) (\w+) .*compiled ([\d.]+) (\w+)", text)
  assert m, text[-2000:]
  planned, compiled = float(m.group(1)) * units[m.group(2)], float(m.group(3)) * units[m.group(4)]
  assert 0.8 < planned / compiled < 1.25, (planned, compiled)
  assert "peak memory (host_rss)" in text
  rows = [json.loads(l) for l in open(tmp_path / "mem" / "metrics.jsonl")]
  assert any(k.startswith("memory/peak_gib") for r in rows for k in r)


# One training batch, seen at every step, and every step's loss logged: the training loss falls on it.
# (The held-out loss after three steps of a randomly initialised model moves by ~1e-3 either way,
# depending on the data order.)
_ONE_BATCH = {"data.train_examples": FAST["batch_size"], "log_every": 1}


def _assert_trains_from_log2(workdir):
  """The first step's loss is log 2 (policy == reference); the last, after the updates, is lower."""
  losses = [row["loss"] for row in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in row]
  assert len(losses) == 3 and losses[0] == pytest.approx(np.log(2.0), rel=1e-6), losses
  assert losses[-1] < losses[0] - 1e-4, losses


def test_lora_with_adapter_off_reference_trains_adapters_only(tmp_path):
  """LoRA DPO through the loop on a 2x4 mesh: adapters only are trained and checkpointed; the reference is the
  same weights with the adapters off, so before training the loss is exactly log 2 (policy == reference)."""
  import io
  import jax
  from flax import nnx
  from alignjax.models import lora
  from alignjax.training import runtime as run_lib
  fields = {**FAST, **_ONE_BATCH, "sft.steps": 0, "dpo.steps": 3, "lora.rank": 4, "lora.alpha": 8.0,
            "lora.targets": r"layers/\d+/attn/(q|v)", "reference.mode": "adapter_off",
            "mesh.data": 2, "mesh.fsdp": 4, "dpo.learning_rate": 1e-2}
  cfg = config_lib.build(None, **fields)
  stream = io.StringIO()
  result = loop.run(cfg, workdir=str(tmp_path / "lora"), handle_signals=False,
                    progress=run_lib.Progress(3, 0, stream=stream, interactive=False))
  assert result["eval_before"]["loss"] == pytest.approx(np.log(2.0), rel=1e-6)
  _assert_trains_from_log2(tmp_path / "lora")
  # Expected adapter count: q and v of each layer, A [D, r] and B [r, heads*head_dim] (q) / [r, kv*head_dim] (v).
  d, h, kv, hd, layers, r = 16, 2, 1, 8, 2, 4
  expected = layers * (r * (d + h * hd) + r * (d + kv * hd))
  assert f"trainable={expected:,}" in stream.getvalue(), stream.getvalue()[:600]
  # The saved final policy is the merged model; the untouched weights equal the initial policy's.
  final = loop.load_policy(str(tmp_path / "lora"))
  init = loop.make_policy(cfg, final.config.vocab_size)
  f_state, i_state = nnx.state(final, nnx.Param), nnx.state(init, nnx.Param)
  np.testing.assert_array_equal(np.asarray(f_state["layers"][0]["attn"]["k"].value),
                                np.asarray(i_state["layers"][0]["attn"]["k"].value))
  assert not np.allclose(np.asarray(f_state["layers"][0]["attn"]["q"].value),
                         np.asarray(i_state["layers"][0]["attn"]["q"].value))
  assert not lora.has_lora(final)


def test_lora_adapter_off_reference_gives_full_distributions_to_tdpo2(tmp_path):
  """TDPO2 needs the reference's full next-token distributions: adapter_off provides them (policy == reference
  before training: every sequence KL is 0 and the loss is exactly log 2)."""
  fields = {**FAST, **_ONE_BATCH, "sft.steps": 0, "dpo.steps": 3, "lora.rank": 4, "lora.alpha": 8.0,
            "loss.name": "tdpo2", "lora.targets": r"layers/\d+/attn/(q|v)", "reference.mode": "adapter_off",
            "dpo.learning_rate": 1e-2}
  result = loop.run(config_lib.build(None, **fields), workdir=str(tmp_path / "tdpo2"), handle_signals=False)
  assert result["eval_before"]["loss"] == pytest.approx(np.log(2.0), rel=1e-6)
  _assert_trains_from_log2(tmp_path / "tdpo2")
  with pytest.raises(config_lib.ConfigError, match="adapter_off") as e:
    config_lib.build(None, **{**fields, "loss.name": "simpo"})
  assert "\n" not in str(e.value)


def test_lora_targets_matching_nothing_is_one_line():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.build(None, **{**FAST, "lora.rank": 4, "lora.targets": "layers/.*/attn/nope"})
  assert "config.lora.targets" in str(e.value) and "matches no parameter path" in str(e.value)
  assert "\n" not in str(e.value)


def test_ches_filter_and_entanglement_diagnostics_through_the_loop(tmp_path):
  """data.ches_keep drops the highest-CHES pairs before training; diagnostics_every logs gradient entanglement."""
  import io
  from alignjax.training import runtime as run_lib
  cfg = config_lib.build(None, **{**FAST, "sft.steps": 0, "dpo.steps": 2, "log_every": 1,
                                  "data.ches_keep": 0.5, "diagnostics_every": 1})
  stream = io.StringIO()
  loop.run(cfg, workdir=str(tmp_path / "diag"), handle_signals=False,
           progress=run_lib.Progress(2, 0, stream=stream, interactive=False))
  assert "CHES filter: kept the 32 of 64 training pairs" in stream.getvalue()
  rows = [json.loads(l) for l in open(tmp_path / "diag" / "metrics.jsonl")]
  cos = [r["entanglement/cosine"] for r in rows if "entanglement/cosine" in r]
  assert len(cos) == 2 and all(-1.0 <= c <= 1.0 for c in cos)
