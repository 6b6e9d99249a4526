"""The algorithm registry end to end: a method is one module, found by everything else.

Two throwaway algorithms are registered HERE, in the test, without touching any
other file: a paired one (trained through ``loop.run``, listed by the config's
``--config_help``, compiled by the planner's abstract step) and an unpaired one
(trained through the same jitted step with gradient accumulation, a precomputed
reference and on 8 fake devices). Independent references: float64 NumPy of the
toy objectives on plain full-logits forwards; equivalences against the plain
single-device, single-batch step.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax import sharding
from alignjax.data import batch as batch_lib
from alignjax.training import algorithms, config as config_lib, loop, reference, steps
from alignjax.training.algorithms import base
from tests import numpy_reference as ref_np
from tests.test_run import tiny
from tests.test_steps import make_batch, numpy_seq_logps, tiny_model


# ---------------------------------------------------------------- a throwaway paired method

@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyHParams:
  beta: float = base.field(0.1, "inverse temperature (> 0)")
  toy_margin: float = base.field(0.25, "margin of the toy loss (>= 0)")

  def __post_init__(self):
    base.check(math.isfinite(self.toy_margin) and self.toy_margin >= 0,
               f"loss: `toy_margin` must be a finite number >= 0, got {self.toy_margin}.")


def toy_objective(hp, ctx, batch):
  """softplus(margin - beta * rho): DPO with a margin (a made-up method)."""
  _, _, (pc, pr) = base.sequence_logps(ctx.policy, batch, batch_lib.SIDES, average=False, chunk_size=ctx.chunk_size)
  rc, rr = base.reference_sequence_logps(ctx, batch, batch_lib.SIDES, average=False)
  losses = jax.nn.softplus(hp.toy_margin - hp.beta * ((pc - rc) - (pr - rr)))
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), {"toy/logps_chosen": jax.lax.stop_gradient(pc)})


# ---------------------------------------------------------------- a throwaway unpaired method

@dataclasses.dataclass(frozen=True, kw_only=True)
class UnpairedHParams:
  beta: float = base.field(0.1, "inverse temperature (> 0)")


def unpaired_objective(hp, ctx, batch):
  """sigmoid(-s * beta * (log pi - log pi_ref)), s = +1 for desirable rows, -1 otherwise."""
  _, _, (lp,) = base.sequence_logps(ctx.policy, batch, ("completion",), average=False, chunk_size=ctx.chunk_size)
  (rp,) = base.reference_sequence_logps(ctx, batch, ("completion",), average=False)
  sign = jnp.where(jnp.asarray(batch["desirable"]), 1.0, -1.0)
  losses = jax.nn.sigmoid(-sign * hp.beta * (lp - rp))
  return base.ObjectiveOutput(losses, jnp.ones_like(losses), {})


@pytest.fixture(scope="module")
def registered():
  toy = algorithms.register(base.Algorithm("toy_margin", ToyHParams, toy_objective, reference_free_ok=True,
                                           description="a test-only method"))
  unpaired = algorithms.register(base.Algorithm("toy_unpaired", UnpairedHParams, unpaired_objective,
                                                schema="unpaired"))
  yield toy, unpaired
  algorithms.unregister("toy_margin")
  algorithms.unregister("toy_unpaired")


def test_registered_method_is_in_config_and_help(registered):
  assert "toy_margin" in config_lib.loss_names()
  cfg = config_lib.build(None, **{"loss.name": "toy_margin", "loss.toy_margin": 0.5})
  assert config_lib.hparams(cfg) == ToyHParams(beta=0.1, toy_margin=0.5)
  text = config_lib.field_help()
  assert "--config.loss.toy_margin" in text and "a test-only method" in text
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.build(None, **{"loss.name": "toy_margin", "loss.toy_margin": -1.0})
  assert str(e.value).startswith("config.loss.toy_margin must be") and "\n" not in str(e.value)
  with pytest.raises(config_lib.ConfigError, match="config.loss.toy_margin does not apply to 'dpo'"):
    config_lib.build(None, **{"loss.toy_margin": 0.5})


def test_registered_method_trains_through_the_loop(registered, tmp_path):
  cfg = tiny(**{"loss.name": "toy_margin", "loss.toy_margin": 0.3, "dpo.steps": 4})
  result = loop.run(cfg, workdir=str(tmp_path / "run"), handle_signals=False)
  assert result["loss"] == "toy_margin" and result["steps"] == 4
  # Before training the policy is the reference: rho = 0, the loss is softplus(margin).
  assert result["eval_before"]["loss"] == pytest.approx(math.log1p(math.exp(0.3)), rel=1e-5)
  assert result["eval_after"]["loss"] < result["eval_before"]["loss"]


def test_registered_method_compiles_in_the_planner(registered):
  from alignjax import aot
  exp = aot.Experiment(algorithm="toy_margin", batch_size=4, prompt_len=8, response_len=8, dtype="float32",
                       frozen_dtype="float32")
  built = aot.build_step(exp, aot.get_topology("v5e:2x2", backend="cpu"), (1, 4, 1))
  assert set(built.args[1]) == set(batch_lib.PREFERENCE_KEYS)
  assert built.step.lower(*built.args).compile() is not None


def test_registered_method_matches_numpy(registered):
  policy, ref_model = tiny_model(1), tiny_model(2)
  batch = make_batch(np.random.default_rng(0), B=4, T=10)
  ref, frozen = reference.online(ref_model)
  step = steps.make_eval_step(policy, algorithms.loss("toy_margin", beta=0.7, toy_margin=0.2), ref)
  got = float(step(steps.init_state(policy, optax.sgd(0.1)).params, batch, frozen)["loss"])
  rho = ((numpy_seq_logps(policy, batch, "chosen") - numpy_seq_logps(ref_model, batch, "chosen"))
         - (numpy_seq_logps(policy, batch, "rejected") - numpy_seq_logps(ref_model, batch, "rejected")))
  np.testing.assert_allclose(got, np.mean(np.logaddexp(0.0, 0.2 - 0.7 * rho)), rtol=1e-5)


# ---------------------------------------------------------------- the unpaired schema

@pytest.fixture(scope="module")
def unpaired_setup(registered):
  policy, ref_model = tiny_model(3), tiny_model(4)
  rows = batch_lib.unpair(make_batch(np.random.default_rng(1), B=4, T=10))   # 8 unpaired rows
  return policy, ref_model, rows


def _numpy_unpaired(policy, ref_model, rows, beta):
  lp = numpy_seq_logps(policy, rows, "completion")
  rp = numpy_seq_logps(ref_model, rows, "completion")
  sign = np.where(rows["desirable"], 1.0, -1.0)
  return np.mean(1.0 / (1.0 + np.exp(sign * beta * (lp - rp))))


def test_unpair_rows_follow_trl(unpaired_setup):
  rows = unpaired_setup[2]
  assert batch_lib.check_batch(rows, batch_lib.UNPAIRED) == (8, 10)
  assert rows["desirable"].tolist() == [True] * 4 + [False] * 4
  with pytest.raises(ValueError, match="paired"):
    steps.make_eval_step(unpaired_setup[0], algorithms.loss("dpo"), reference.online(unpaired_setup[1])[0])(
        steps.init_state(unpaired_setup[0], optax.sgd(0.1)).params, rows, reference.online(unpaired_setup[1])[1])


def test_unpaired_step_matches_numpy_with_accumulation_and_precomputed_reference(unpaired_setup, tmp_path):
  policy, ref_model, rows = unpaired_setup
  loss = algorithms.loss("toy_unpaired", beta=0.9)
  tx = optax.sgd(0.5)
  online_ref, frozen = reference.online(ref_model)
  state0 = steps.init_state(policy, tx)
  out = steps.make_eval_step(policy, loss, online_ref)(state0.params, rows, frozen)
  np.testing.assert_allclose(float(out["loss"]), _numpy_unpaired(policy, ref_model, rows, 0.9), rtol=1e-5)
  np.testing.assert_allclose(float(out["tokens"]), float(np.sum(rows["completion_attention"])))

  # Precomputed reference log-probs of the unpaired rows (one pass, by example index).
  store = reference.precompute(ref_model, [(np.arange(8), rows)], str(tmp_path / "ref"), num_examples=8)
  assert set(store) == set(batch_lib.reference_keys(batch_lib.UNPAIRED, ("completion",)))
  pre = reference.attach(rows, reference.load(str(tmp_path / "ref")), np.arange(8))

  plain, m_plain = steps.make_train_step(policy, tx, loss, online_ref, donate=False)(state0, rows, frozen)
  accum, m_accum = steps.make_train_step(policy, tx, loss, reference.precomputed()[0], grad_accum=2,
                                         donate=False)(steps.init_state(policy, tx), pre, {})
  np.testing.assert_allclose(float(m_accum["loss"]), float(m_plain["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(state0.params)))


def test_unpaired_step_sharded_on_8_devices_matches_one(unpaired_setup):
  policy, ref_model, rows = unpaired_setup
  loss = algorithms.loss("toy_unpaired", beta=0.9)
  tx = optax.sgd(0.5)
  ref, frozen = reference.online(ref_model)
  plain, _ = steps.make_train_step(policy, tx, loss, ref, grad_accum=2, donate=False)(
      steps.init_state(policy, tx), rows, frozen)
  mesh = sharding.make_mesh(2, 2, 2)
  sref, sfrozen = reference.online(ref_model, mesh=mesh)
  sstep = steps.make_train_step(policy, tx, loss, sref, mesh=mesh, grad_accum=2)
  rows_dev = loop.global_batch(mesh)(rows)
  sharded, _ = sstep(steps.init_state(policy, tx, mesh=mesh), rows_dev, sfrozen)
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_unpaired_method_trains_through_the_loop_on_paired_data(registered, tmp_path):
  """The loop converts the generated pairs into unpaired rows (TRL's unpair_preference_dataset)."""
  cfg = tiny(**{"loss.name": "toy_unpaired", "dpo.steps": 3})
  result = loop.run(cfg, workdir=str(tmp_path / "run"), handle_signals=False)
  assert result["loss"] == "toy_unpaired"
  assert result["eval_before"]["loss"] == pytest.approx(0.5, rel=1e-5)   # policy == reference: sigmoid(0)
  assert math.isfinite(result["eval_after"]["loss"])


def test_flops_per_token_counts_what_the_step_runs():
  """2N per forward: policy fwd+bwd 6N (4N with frozen weights: no weight gradients) + one 2N per frozen forward."""
  from alignjax.training import algorithms
  dpo, simpo, ad = algorithms.get("dpo"), algorithms.get("simpo"), algorithms.get("aligndistil")
  assert dpo.flops_per_token(10) == 80 and dpo.flops_per_token(10, frozen_weights=True) == 60
  assert dpo.flops_per_token(10, reference_mode="adapter_off") == 80
  assert dpo.flops_per_token(10, reference_mode="precomputed") == dpo.flops_per_token(10, reference_mode="free") == 60
  assert simpo.flops_per_token(10) == 60                       # reference-free: nothing frozen
  assert ad.flops_per_token(10) == (6 + 2 * len(ad.frozen)) * 10  # every teacher runs a forward
