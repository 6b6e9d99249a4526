"""Jitted, functional train/eval steps over a pytree train state (MaxText/Tunix style).

The NNX model is split once into a static graphdef (closed over by the step) and
its parameters; the step is a pure ``jax.jit`` function of pytrees, so
``step.lower(abstract_state, abstract_batch, abstract_frozen)`` works for AOT
compilation on any topology.

API (exact signatures)::

  TrainState(step: int32[], params: nnx.State, opt_state: optax.OptState, skipped: int32[])

  init_state(model, tx, *, mesh=None) -> TrainState
      Copies of ``model``'s ``nnx.Param`` arrays + ``tx.init``; placed on ``mesh``
      with :func:`state_shardings` when given.
  abstract_state(model, tx) -> TrainState of jax.ShapeDtypeStruct (no allocation)
  state_shardings(model, tx, mesh) -> TrainState of NamedSharding
      params from ``alignjax.sharding.model_shardings``; optimizer leaves that mirror a
      parameter (same path suffix and shape) get its sharding, the rest replicated.
  update_model(model, state) -> model     writes ``state.params`` back into ``model``

  make_train_step(model, tx, loss, reference, *, mesh=None, grad_accum=1,
                  max_grad_norm=None, compute_dtype=None, skip_nonfinite=False,
                  chunk_size=128, donate=True)
      -> Step ``train_step(state, batch, frozen) -> (state, metrics)``
  make_eval_step(model, loss, reference, *, mesh=None, compute_dtype=None,
                 chunk_size=128)
      -> Step ``eval_step(params, batch, frozen) -> metrics``
  Step: a ``jax.jit`` function whose loss hyper-parameters are inputs.
      ``step(*args)``, ``step.lower(*args).compile()(*args)`` (AOT) as a jitted
      function's; ``step.hparams`` (the dataclass); ``step.with_hparams(beta=0.5)``
      -> a Step running the same compiled program at other values.
  make_reference_logps_fn(model, *, chunk_size=128, mesh=None)
      -> jitted ``fn(params, batch) -> {reference_{side}_{logps,mean_logps}: [B]}`` (every side of the batch)

Arguments:
  model: the policy ``nnx.Module`` (only its graph and non-parameter state are used
    by ``make_*``; remat follows the model's own config, e.g. ``ModelConfig.remat``).
  tx: an ``optax.GradientTransformation`` (schedules inside it count applied updates).
  loss: an :class:`alignjax.training.algorithms.Loss` (``algorithms.loss(name, **hparams)``):
    the algorithm's objective, batch schema and needs, with its hyper-parameters.
    Its float hyper-parameters (``Algorithm.traced_hparams``: beta, label smoothing,
    TDPO's alpha, ...) are inputs of the compiled program, not constants in it: runs
    that differ only in them (a beta sweep) compile one program, which JAX's
    persistent compilation cache then serves to every run of the sweep.
  reference: a :class:`alignjax.training.reference.Reference` (the first element of
    ``reference.online(ref_model)``, ``teachers(dpo=, contrast=)``, ``precomputed()``,
    ``free()`` or ``none()``); the second element, ``frozen`` (dict name -> nnx.State of
    frozen parameters; ``{}`` when there are none), is the step's third argument. It is
    not donated and has no optimizer state.
  batch: a batch of the algorithm's schema (``alignjax.data.batch``: paired or
    unpaired [B, T] arrays; plus ``reference_*`` keys in precomputed mode). ``B``
    must divide by ``grad_accum``.
  mesh: ``jax.sharding.Mesh`` (axes data/fsdp/tensor) or None for one device; with a
    mesh the state is sharded with the rule table and the batch over ``batch_sharding``.
  grad_accum: micro-batches per step (``lax.scan``; equals one big batch exactly:
    losses are ``sum(w l) / sum(w)`` over the whole batch; an algorithm's
    ``batch_statistics`` -- e.g. KTO's KL point, TRL's batch token-mean NLL of
    ORPO/CPO -- are evaluated on every micro-batch before the gradient and
    handed, for the whole batch, to every micro-batch's objective).
  max_grad_norm: global-norm clipping of the accumulated gradient (None: off).
  compute_dtype: e.g. ``jnp.bfloat16``: parameters are cast for the forward/backward
    and the models (policy and frozen ones) compute in it (their ``ModelConfig.dtype``:
    activations and matmul inputs; logits, norms and softmaxes stay float32) while
    ``state.params`` (the master weights) keep their dtype (float32).
  skip_nonfinite: when the loss, gradient norm or updated parameters are not finite, keep params and
    optimizer state unchanged and count it in ``state.skipped``.
  chunk_size: positions per chunk for label log-probs (no float32 [B, T, V]).

Metrics (scalars): ``loss``, ``grad_norm`` (before clipping), ``finite`` (bool),
``skipped`` (cumulative count), ``tokens`` (non-pad tokens in the batch), ``step``,
and the objective's per-example metrics averaged (``rewards/*``, ``logps/*``, ...).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignjax.data import batch as batch_lib
from alignjax.training import algorithms
from alignjax.training import reference as reference_lib
from alignjax.training.algorithms import base as algo_base


class TrainState(NamedTuple):
  """The train state pytree; the model's graphdef stays static inside the step."""
  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array


BASE = "base"   # the frozen-dict key of a LoRA model's base weights (see frozen_base)


class _Graph(NamedTuple):
  """How a step rebuilds the policy from the trained parameters.

  A LoRA model (``alignjax.models.lora``) trains its adapters only: its base
  weights travel in the step's ``frozen`` dict under :data:`BASE` (not donated,
  no optimizer state, stop-gradient), and ``off`` is the graph with the adapters
  switched off (``reference.mode=adapter_off``: the reference is the same weights).
  """
  graphdef: Any
  rest: Any
  off: Any = None
  lora: bool = False

  def merge(self, params, base=None, *, adapters: bool = True):
    if not self.lora:
      return nnx.merge(self.graphdef, params, self.rest)
    if base is None:
      raise ValueError(f"train_step: a LoRA model's step needs its base weights in `frozen[{BASE!r}]` "
                       "(steps.frozen_base(model)).")
    return nnx.merge(self.graphdef if adapters else self.off, params, base, self.rest)


def _is_lora(model) -> bool:
  from alignjax.models import lora  # noqa: PLC0415
  return lora.has_lora(model)


def _split(model):
  """``(graph, trainable params)``: a LoRA model's adapters, else every ``nnx.Param``."""
  if _is_lora(model):
    from alignjax.models import lora  # noqa: PLC0415
    graphdef, params, _, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    with lora.adapters_off(model):
      off = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)[0]
    return _Graph(graphdef, rest, off, True), params
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return _Graph(graphdef, rest), params


def frozen_base(model: nnx.Module, *, mesh=None) -> dict[str, Any]:
  """``{"base": base weights}`` a LoRA model's step takes in ``frozen`` (``{}`` for other models).

  Sharded over ``mesh`` like the model's parameters (the rule table).
  """
  if not _is_lora(model):
    return {}
  base = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)[2]
  if mesh is not None:
    from alignjax import sharding as sharding_lib  # noqa: PLC0415 (optional until a mesh is used)
    base = sharding_lib.put_tree(base, _param_shardings(model, mesh, which="base"))
  return {BASE: base}


def init_state(model: nnx.Module, tx: optax.GradientTransformation, *, mesh=None) -> TrainState:
  """Fresh :class:`TrainState` from ``model``'s trainable parameters (sharded over ``mesh`` if given)."""
  _, params = _split(model)
  # Copies, so donating the state never deletes the model's own buffers.
  params = jax.tree.map(jnp.copy, params)
  if mesh is None:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros((), jnp.int32))
  shardings = state_shardings(model, tx, mesh)
  from alignjax import sharding as sharding_lib  # noqa: PLC0415
  params = sharding_lib.put_tree(params, shardings.params)
  init = jax.jit(tx.init, out_shardings=shardings.opt_state)
  zero = lambda: sharding_lib.put(np.zeros((), np.int32), shardings.step)  # distinct buffers (donation)
  return TrainState(zero(), params, init(params), zero())


def abstract_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
  """:class:`TrainState` of ``jax.ShapeDtypeStruct`` (for AOT lowering); allocates nothing new."""
  _, params = _split(model)
  abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  return TrainState(scalar, abstract(params), jax.eval_shape(tx.init, abstract(params)), scalar)


def _param_shardings(model, mesh, which: str = "trainable"):
  """Shardings of the ``trainable`` params (:func:`_split`), ``all`` nnx.Params, or a LoRA model's ``base``."""
  from alignjax import sharding as sharding_lib  # noqa: PLC0415 (optional until a mesh is used)
  if which == "trainable":
    _, params = _split(model)
  elif which == "all":
    params = nnx.state(model, nnx.Param)
  else:
    params = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)[2]
  return sharding_lib.param_shardings(model, mesh, params)


def state_shardings(model: nnx.Module, tx: optax.GradientTransformation, mesh) -> TrainState:
  """:class:`TrainState` of ``NamedSharding`` for ``mesh`` (see the module docstring)."""
  from alignjax.sharding import path_key as sharding_path_key  # noqa: PLC0415
  param_sh = _param_shardings(model, mesh)
  abstract = abstract_state(model, tx)
  by_path = {sharding_path_key(p): (tuple(x.shape), s) for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(abstract.params)[0], jax.tree.leaves(param_sh))}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def pick(path, x):
    key = sharding_path_key(path)
    for i in range(len(key)):  # the longest suffix of the leaf's path that names a parameter
      shape, s = by_path.get(key[i:], (None, None))
      if shape is not None and shape == tuple(x.shape):
        return s
    return replicated
  opt_sh = jax.tree_util.tree_map_with_path(pick, abstract.opt_state)
  return TrainState(replicated, param_sh, opt_sh, replicated)


def update_model(model: nnx.Module, state: TrainState) -> nnx.Module:
  """Writes ``state.params`` into ``model`` (in place) and returns it."""
  nnx.update(model, state.params)
  return model


def _caster(compute_dtype) -> Optional[Callable]:
  if compute_dtype is None:
    return None
  dtype = jnp.dtype(compute_dtype)

  def cast(tree):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  cast.dtype = dtype.name   # the models' compute dtype too (_computing_in)
  return cast


def _batch_sharding(mesh):
  if mesh is None:
    return None
  from alignjax import sharding as sharding_lib  # noqa: PLC0415
  return sharding_lib.batch_sharding(mesh, ndim=1)  # a prefix spec: fits [B] and [B, T] leaves


def _replicated(mesh):
  """The traced hyper-parameters' sharding: scalars on every device."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _frozen_shardings(reference, mesh, model=None):
  if mesh is None:
    return None
  shardings = dict(getattr(reference, "shardings", None) or {})
  if model is not None and _is_lora(model):
    shardings[BASE] = _param_shardings(model, mesh, which="base")
  return shardings or None


def _computing_in(module, dtype: Optional[str]):
  """``module`` (merged inside the step) with every ``ModelConfig.dtype`` set to ``dtype``.

  The compute dtype is the activations' dtype (``ModelConfig.dtype``: embeddings, hidden
  states, matmul inputs); casting the parameters alone would leave a float32-configured
  model computing in float32 from bf16-rounded weights.
  """
  if dtype is None:
    return module
  from alignjax.models.config import ModelConfig  # noqa: PLC0415
  for _, m in nnx.iter_modules(module):
    for name, value in list(vars(m).items()):
      if isinstance(value, ModelConfig) and value.dtype != dtype:
        setattr(m, name, dataclasses.replace(value, dtype=dtype))
  return module


def _context(graph, reference, cast, chunk_size, params, frozen, statistics=None):
  frozen = dict(frozen or {})
  base = frozen.pop(BASE, None)
  if base is not None:
    base = jax.lax.stop_gradient(base)
    base = cast(base) if cast is not None else base
  p = cast(params) if cast is not None else params
  dtype = getattr(cast, "dtype", None)
  policy = _computing_in(graph.merge(p, base), dtype)
  models = {name: _computing_in(m, dtype) for name, m in reference.merge(frozen, cast).items()}
  if reference.mode == "adapter_off":   # the reference: the policy's own weights with the adapters off
    models["reference"] = _computing_in(graph.merge(jax.lax.stop_gradient(p), base, adapters=False), dtype)
  return algorithms.Context(policy, models, reference, chunk_size, statistics)


def _hparams(loss, values):
  """``loss.hparams`` with the traced fields set to ``values`` (tracers inside a step; no re-validation)."""
  hp = copy.copy(loss.hparams)
  for name, value in values.items():
    object.__setattr__(hp, name, value)
  return hp


def _loss_terms(graph, loss, reference, cast, chunk_size):
  """``fn(params, batch, frozen, statistics, values) -> (sum(w l), (sum(w), per-example metrics))``."""

  def fn(params, batch, frozen, statistics, values):
    ctx = _context(graph, reference, cast, chunk_size, params, frozen, statistics)
    out = loss.algorithm.objective(_hparams(loss, values), ctx, batch)
    w = out.weights.astype(jnp.float32)
    return jnp.sum(out.losses * w), (jnp.sum(w), out.metrics)
  return fn


def _batch_statistics(graph, loss, reference, cast, chunk_size):
  """``fn(params, batch, frozen, values, k) -> {name: [B]}`` of the algorithm's ``batch_statistics`` (or None).

  Evaluated micro-batch by micro-batch (rows ``i, i+k, ...`` as the step
  accumulates them; no gradient), then put back in the batch's row order, so
  every micro-batch's objective sees the statistics of the whole batch.
  """
  hook = loss.algorithm.batch_statistics
  if hook is None:
    return None

  def one(params, batch, frozen, values):
    ctx = _context(graph, reference, cast, chunk_size, jax.lax.stop_gradient(params), frozen)
    return jax.tree.map(jax.lax.stop_gradient, dict(hook(_hparams(loss, values), ctx, batch)))

  def fn(params, batch, frozen, values, k=1, micro=None):
    if k == 1:
      return one(params, batch, frozen, values)
    stats = jax.lax.map(lambda mb: one(params, mb, frozen, values), micro)  # {name: [k, B/k, ...]}
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape((-1,) + x.shape[2:]), stats)
  return fn


def _schema(loss, batch) -> batch_lib.Schema:
  return loss.algorithm.batch_schema or batch_lib.detect(batch)


def _tokens(schema, batch):
  return sum(jnp.sum(jnp.asarray(batch[f"{s}_attention"]).astype(jnp.float32))
             for s in schema.present_sides(batch))


class Step:
  """A jitted step with the loss's traced hyper-parameters bound as its last input.

  Called, lowered and compiled like the ``jax.jit`` function it wraps, without that
  input: ``step(*args)``, ``step.lower(*args).compile()(*args)``.
  :meth:`with_hparams` gives the same jitted function at other values, so it runs
  the program already compiled.
  """

  def __init__(self, jitted, loss: algorithms.Loss):
    self._jitted, self._loss = jitted, loss
    self._values = {name: float(getattr(loss.hparams, name)) for name in loss.algorithm.traced_hparams()}
    self.__wrapped__ = jitted.__wrapped__

  @property
  def hparams(self):
    """The loss's hyper-parameters (the algorithm's frozen dataclass)."""
    return self._loss.hparams

  def with_hparams(self, **changes) -> "Step":
    """This step at other values of traced hyper-parameters (validated; static ones need a new step)."""
    algo = self._loss.algorithm
    static = sorted(set(changes) - set(algo.traced_hparams()))
    if static:
      fields = {f.name for f in algo.hparam_fields()}
      what = "are static (their values are compiled in); make a new step" if set(static) <= fields else \
          f"are not hyper-parameters of {algo.name!r}; its fields are {sorted(fields)}"
      raise ValueError(f"Step.with_hparams: {static} {what}.")
    return Step(self._jitted, algorithms.Loss(algo, dataclasses.replace(self._loss.hparams, **changes)))

  def __call__(self, *args):
    return self._jitted(*args, self._values)

  def lower(self, *args) -> "_Lowered":
    return _Lowered(self._jitted.lower(*args, self._values), self._values)


class _Lowered:
  """``jax.stages.Lowered`` whose ``compile()`` keeps the step's hyper-parameter input bound."""

  def __init__(self, lowered, values):
    self._lowered, self._values = lowered, values

  def compile(self, *args, **kwargs) -> "_Compiled":
    return _Compiled(self._lowered.compile(*args, **kwargs), self._values)

  def __getattr__(self, name):
    return getattr(self._lowered, name)


class _Compiled:
  """``jax.stages.Compiled`` called without the step's hyper-parameter input."""

  def __init__(self, compiled, values):
    self._compiled, self._values = compiled, values

  def __call__(self, *args):
    return self._compiled(*args, self._values)

  def __getattr__(self, name):
    return getattr(self._compiled, name)


def _check_loss(fn: str, loss, reference) -> None:
  if not isinstance(loss, algorithms.Loss):
    raise TypeError(f"{fn}: `loss` must be an algorithms.Loss (algorithms.loss(name, **hparams)), "
                    f"got {type(loss).__name__}.")
  if not isinstance(reference, reference_lib.Reference):
    raise TypeError(f"{fn}: `reference` must be a reference.Reference, got {type(reference).__name__}.")
  reference_lib.check_compatible(reference, loss.algorithm)


def make_train_step(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    loss: algorithms.Loss,
    reference: reference_lib.Reference,
    *,
    mesh=None,
    grad_accum: int = 1,
    max_grad_norm: Optional[float] = None,
    compute_dtype=None,
    skip_nonfinite: bool = False,
    chunk_size: int = 128,
    donate: bool = True,
):
  """:class:`Step` ``train_step(state, batch, frozen) -> (state, metrics)``; see the module docstring."""
  _check_loss("make_train_step", loss, reference)
  if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
    raise ValueError(f"make_train_step: `grad_accum` must be an int >= 1, got {grad_accum!r}.")
  if max_grad_norm is not None and not max_grad_norm > 0:
    raise ValueError(f"make_train_step: `max_grad_norm` must be > 0 or None, got {max_grad_norm}.")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"make_train_step: `chunk_size` must be a positive int, got {chunk_size!r}.")
  graph, _ = _split(model)
  cast = _caster(compute_dtype)
  objective_loss = loss
  terms = _loss_terms(graph, loss, reference, cast, chunk_size)
  statistics_fn = _batch_statistics(graph, loss, reference, cast, chunk_size)
  grad_fn = jax.value_and_grad(terms, has_aux=True)
  k = grad_accum

  def train_step(state: TrainState, batch, frozen, values):
    schema = _schema(objective_loss, batch)
    b, _ = batch_lib.check_batch(batch, schema)
    if b % k:
      raise ValueError(f"train_step: batch size {b} must be divisible by `grad_accum` {k}.")
    batch = {name: jnp.asarray(v) for name, v in batch.items()}
    if k == 1:
      stats = statistics_fn(state.params, batch, frozen, values) if statistics_fn is not None else None
      (lw, (w, metrics)), grads = grad_fn(state.params, batch, frozen, stats, values)
      metrics = jax.tree.map(jnp.mean, metrics)
    else:
      # Micro-batch i takes rows i, i+k, ...: every micro-batch spans all data shards.
      micro = jax.tree.map(lambda x: x.reshape((b // k, k) + x.shape[1:]).swapaxes(0, 1), batch)
      stats = statistics_fn(state.params, batch, frozen, values, k, micro) if statistics_fn is not None else None

      def body(carry, mb):
        g_acc, lw_acc, w_acc = carry
        (lw, (w, m)), g = grad_fn(state.params, mb, frozen, stats, values)
        return (jax.tree.map(jnp.add, g_acc, g), lw_acc + lw, w_acc + w), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, lw, w), metrics = jax.lax.scan(body, (zeros, jnp.zeros(()), jnp.zeros(())), micro)
      metrics = jax.tree.map(jnp.mean, metrics)
    denom = jnp.maximum(w, 1e-12)
    loss = lw / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.global_norm(grads)
    if max_grad_norm is not None:
      scale = jnp.minimum(1.0, max_grad_norm / jnp.maximum(grad_norm, 1e-12))
      grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Finite loss, gradients and updated parameters (a finite gradient can still
    # overflow a parameter).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(params))
    skipped = state.skipped
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      skipped = skipped + (~finite).astype(jnp.int32)
    new_state = TrainState(state.step + 1, params, opt_state, skipped)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite, skipped=skipped,
                   tokens=_tokens(schema, batch), step=new_state.step)
    return new_state, metrics

  jit_kwargs = {"donate_argnums": (0,) if donate else ()}
  if mesh is not None:
    shardings = state_shardings(model, tx, mesh)
    data = _batch_sharding(mesh)
    jit_kwargs["in_shardings"] = (shardings, data, _frozen_shardings(reference, mesh, model), _replicated(mesh))
    jit_kwargs["out_shardings"] = (shardings, None)
  return Step(jax.jit(train_step, **jit_kwargs), loss)


def make_eval_step(
    model: nnx.Module,
    loss: algorithms.Loss,
    reference: reference_lib.Reference,
    *,
    mesh=None,
    compute_dtype=None,
    chunk_size: int = 128,
):
  """:class:`Step` ``eval_step(params, batch, frozen) -> metrics`` (``loss`` and the objective's metrics)."""
  _check_loss("make_eval_step", loss, reference)
  graph, _ = _split(model)
  terms = _loss_terms(graph, loss, reference, _caster(compute_dtype), chunk_size)
  statistics_fn = _batch_statistics(graph, loss, reference, _caster(compute_dtype), chunk_size)

  def eval_step(params, batch, frozen, values):
    schema = _schema(loss, batch)
    batch_lib.check_batch(batch, schema)
    stats = statistics_fn(params, dict(batch), frozen, values) if statistics_fn is not None else None
    lw, (w, metrics) = terms(params, dict(batch), frozen, stats, values)
    metrics = jax.tree.map(jnp.mean, metrics)
    return dict(metrics, loss=lw / jnp.maximum(w, 1e-12), tokens=_tokens(schema, batch))

  kwargs = {}
  if mesh is not None:
    kwargs["in_shardings"] = (None, _batch_sharding(mesh), _frozen_shardings(reference, mesh, model),
                              _replicated(mesh))
  return Step(jax.jit(eval_step, **kwargs), loss)


make_reference_logps_fn = reference_lib.make_reference_logps_fn
