"""What an algorithm module declares, the registry, and the forwards every objective shares.

An :class:`Algorithm` is one table entry: its name, a frozen hyper-parameter
dataclass that validates itself, its batch schema (``data/batch.py``), the
frozen models or reference inputs it needs, its objective, and optional hooks
for what only some methods have (frozen models loaded from other runs, data
from a rollout of the policy, run-level checks). The config, ``--config_help``,
the planner, the reference-mode checks, the loop and the study read the
registry; none of them lists method names.

An objective is ``objective(hparams, ctx, batch) -> ObjectiveOutput(losses [B],
weights [B], metrics)`` with per-example metrics ``[B]``; the step reduces
``sum(w * l) / sum(w)`` over the whole (possibly accumulated) batch, so
gradient accumulation over micro-batches equals one large batch exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax.data import batch as batch_lib

# What an algorithm needs besides the policy:
#   reference_logps:  reference sequence log-probs (online model, precomputed, or free)
#   reference_logits: the reference model's full next-token distributions (online only)
#   teachers:         frozen models of its own (``Algorithm.frozen``), online only
#   none:             nothing (SFT)
NEEDS = ("reference_logps", "reference_logits", "teachers", "none")
SCHEMAS = ("paired", "unpaired", "any")


def field(default, help: str, *, static: bool = False, **kwargs):  # pylint: disable=redefined-builtin
  """A hyper-parameter field: its default and the help ``--config_help`` shows.

  A ``float`` field is an input of the compiled train and eval steps (traced: one
  program serves every value, e.g. a beta sweep) unless ``static=True``, which
  bakes its value into the program; mark a float field static when the objective
  reads it in Python (``if hp.alpha > 0:``). Fields of other types are static.
  """
  return dataclasses.field(default=default, metadata={"help": help, "static": static, **kwargs})


def check(ok: bool, message: str) -> None:
  """Raises a one-line ``ValueError(message)`` unless ``ok`` (hyper-parameter validation)."""
  if not ok:
    raise ValueError(message)


class ObjectiveOutput(NamedTuple):
  """``losses [B]``, ``weights [B]`` (loss = sum(w l)/sum(w)), per-example ``metrics``."""
  losses: jax.Array
  weights: jax.Array
  metrics: dict


class Context(NamedTuple):
  """What the step hands an objective besides the batch.

  Attributes:
    policy: the policy model (trainable; gradients flow).
    frozen: name -> frozen model (outputs must be stop-gradient'ed), e.g.
      ``{"reference": m}`` or an algorithm's own frozen models; empty if none.
    reference: the :class:`alignjax.training.reference.Reference` mode.
    chunk_size: positions per chunk for label log-probs.
    statistics: the algorithm's ``batch_statistics`` of the WHOLE (global,
      accumulated) batch, ``{name: [B_total]}`` with no gradient, when the
      algorithm declares that hook; None otherwise (or when an objective is
      called outside a step: it then computes them on the batch it is given).
  """
  policy: Any
  frozen: Mapping[str, Any]
  reference: Any
  chunk_size: int
  statistics: Optional[Mapping[str, Any]] = None


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A registry entry.

  Attributes:
    name: the registry key (``config.loss.name``).
    hparams: a frozen dataclass of hyper-parameters whose ``__post_init__``
      validates them (one-line ``ValueError`` naming the field); fields made
      with :func:`field` carry the help ``--config_help`` shows.
    objective: ``objective(hparams, ctx, batch) -> ObjectiveOutput``.
    schema: ``"paired"``, ``"unpaired"`` (``data/batch.py``) or ``"any"``.
    needs: one of :data:`NEEDS`.
    frozen: the names of the frozen models the step receives (default:
      ``("reference",)`` when the reference is needed, else none).
    reference_free_ok: may run with a zero reference (SimPO-style).
    preference: usable as ``config.loss.name`` (False: the SFT warm-up objective).
    description: one line for ``--config_help``.
    load_frozen: ``fn(run_cfg, vocab_size) -> {name: model}`` for frozen models
      that are not the SFT policy (AlignDistil's teachers); None: the reference is
      the policy at the start of the preference phase.
    configure: ``fn(run_cfg) -> {field: value}``: hyper-parameters taken from
      run-level fields instead of ``config.loss``.
    validate_run: ``fn(run_cfg)`` raising ``ValueError`` for run-level checks.
    rollout: ``fn(run_cfg, policy, seq_len) -> rollout(params, host_batch, step)``:
      the preference phase trains on the policy's own samples.
    kl_rows: unpaired batches carry KTO's mismatched ``kl_*`` rows
      (:func:`alignjax.data.batch.mismatched_rows`), built per batch when the data has none.
    batch_statistics: ``fn(hparams, ctx, batch) -> {name: [B] array}``: per-row
      quantities (no gradient) an objective reduces over the WHOLE batch, e.g.
      KTO's KL reference point. The step evaluates it on every micro-batch with
      the step's parameters before any gradient, reassembles the rows of the
      global batch and hands them to every micro-batch's objective as
      ``ctx.statistics``, so the result is the same with ``grad_accum > 1`` and on
      any mesh.
    token_keys: ``[B, T]`` float32 batch keys the objective reads besides the
      schema's (data-set columns such as critical-token weights); the planner's
      abstract batch includes them.
    make_model: ``fn(policy, rngs, hparams) -> nnx.Module``: the model this algorithm
      trains, built from the loaded or initialised policy (a Transformer) right after
      it is made, e.g. a reward model on its decoder, or the policy with SparsePO's
      mask network beside it; None: the policy itself. The loop (both phases), the
      planner and the saved final model use what it returns (see ``export``).
    export: ``fn(model) -> nnx.Module``: the model the run saves as its final policy
      (``<workdir>/final_policy``, what sampling and ``init.checkpoint`` read), taken
      from the trained ``make_model`` model, e.g. the policy Transformer without the
      algorithm's own parameters; None: the trained model itself.
    param_decay: ``fn(hparams, path) -> float or None``: the AdamW weight decay of the
      trained parameter at ``path`` (a tuple of names), for parameters the algorithm
      owns (e.g. SparsePO's mask network); None: the policy's ``config.weight_decay``.
      The SFT warm-up does not decay the parameters the algorithm owns.
    study: how the frontier study runs this method (see :mod:`alignjax.study.frontier`):
      ``{"methods": {study method: fixed hparams}}``, ``{"sweep": (hparam, study
      field)}``, ``{"teachers": True}`` (distilled from the study's DPO and
      reverse-DPO runs), ``{"data": "module:function"}`` (the study builds the
      method's data set with that function first), ``{"plotted": False}`` (trained
      but not a point of the plot); empty: one run per beta.
  """
  name: str
  hparams: type
  objective: Callable[[Any, Context, Mapping[str, jax.Array]], ObjectiveOutput]
  schema: str = "paired"
  needs: str = "reference_logps"
  frozen: Optional[tuple[str, ...]] = None
  reference_free_ok: bool = False
  preference: bool = True
  description: str = ""
  load_frozen: Optional[Callable] = None
  configure: Optional[Callable] = None
  validate_run: Optional[Callable] = None
  rollout: Optional[Callable] = None
  kl_rows: bool = False
  batch_statistics: Optional[Callable] = None
  token_keys: tuple[str, ...] = ()
  make_model: Optional[Callable] = None
  export: Optional[Callable] = None
  param_decay: Optional[Callable] = None
  study: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    where = f"Algorithm {self.name!r}"
    check(isinstance(self.name, str) and self.name.isidentifier(), f"{where}: `name` must be an identifier.")
    check(dataclasses.is_dataclass(self.hparams) and isinstance(self.hparams, type)
          and self.hparams.__dataclass_params__.frozen,
          f"{where}: `hparams` must be a frozen dataclass class, got {self.hparams!r}.")
    check(callable(self.objective), f"{where}: `objective` must be callable.")
    check(self.schema in SCHEMAS, f"{where}: `schema` must be one of {list(SCHEMAS)}, got {self.schema!r}.")
    check(self.needs in NEEDS, f"{where}: `needs` must be one of {list(NEEDS)}, got {self.needs!r}.")
    if self.frozen is None:
      object.__setattr__(self, "frozen", ("reference",) if self.needs.startswith("reference") else ())
    check(self.needs != "teachers" or bool(self.frozen), f"{where}: needs 'teachers' but names no `frozen` models.")
    check(self.needs != "teachers" or self.load_frozen is not None,
          f"{where}: needs 'teachers' but has no `load_frozen`.")
    try:
      self.hparams()
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: its hyper-parameters must all have valid defaults ({e}).") from None

  @property
  def batch_schema(self) -> Optional[batch_lib.Schema]:
    """The :class:`alignjax.data.batch.Schema` (None for ``"any"``)."""
    return None if self.schema == "any" else batch_lib.schema(self.schema)

  def hparam_fields(self) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(self.hparams)

  def traced_hparams(self) -> tuple[str, ...]:
    """The hyper-parameters the compiled steps take as inputs: ``float`` fields not marked ``static``."""
    return tuple(f.name for f in self.hparam_fields() if f.type in (float, "float") and not f.metadata.get("static"))

  def rows_per_example(self) -> int:
    """Sequences the policy scores per example: 2 for pairs, 1 (+1 KL row if used) unpaired."""
    if self.schema == "paired":
      return 2
    return 1 + int(self.kl_rows)

  def tokens_per_example(self, seq_len: int) -> int:
    """Tokens the policy processes per example of ``seq_len`` positions."""
    return self.rows_per_example() * seq_len

  def flops_per_token(self, n_params: int, *, frozen_weights: bool = False, reference_mode: str = "online") -> float:
    """Training FLOPs per policy token (Kaplan et al. 2020, arXiv:2001.08361, Sec. 2.1: 2N per forward).

    The policy's forward and backward, ``6N`` (``4N`` with ``frozen_weights``, e.g.
    LoRA: the weight-gradient matmuls of the frozen base are not computed; the
    adapters' FLOPs are neglected), plus a forward ``2N`` per frozen model run in
    the step: each of ``frozen`` when ``reference_mode`` is online, one (the
    adapter-off policy) for adapter_off, none for a precomputed or absent reference.
    """
    forwards = {"online": len(self.frozen), "adapter_off": 1}.get(reference_mode, 0)
    return ((4.0 if frozen_weights else 6.0) + 2.0 * forwards) * n_params


@dataclasses.dataclass(frozen=True)
class Loss:
  """An algorithm with its hyper-parameters: what the steps take."""
  algorithm: Algorithm
  hparams: Any

  @property
  def name(self) -> str:
    return self.algorithm.name


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
  """Adds ``algorithm`` to the registry (a second one of the same name fails unless ``replace``)."""
  if not isinstance(algorithm, Algorithm):
    raise TypeError(f"algorithms.register: `algorithm` must be an Algorithm, got {type(algorithm).__name__}.")
  if algorithm.name in _REGISTRY and not replace:
    raise ValueError(f"algorithms.register: {algorithm.name!r} is already registered.")
  _REGISTRY[algorithm.name] = algorithm
  return algorithm


def unregister(name: str) -> None:
  """Removes ``name`` (tests that register throwaway algorithms)."""
  _REGISTRY.pop(name, None)


def names(*, preference: Optional[bool] = None) -> tuple[str, ...]:
  """Every registered name, sorted (``preference=True``: those usable as ``config.loss.name``)."""
  return tuple(sorted(n for n, a in _REGISTRY.items() if preference is None or a.preference == preference))


def get(name: str) -> Algorithm:
  """The algorithm called ``name``; an unknown name raises a ValueError listing the valid names."""
  if name not in _REGISTRY:
    raise ValueError(f"algorithms.get: unknown algorithm `name` {name!r}; expected one of {list(names())}.")
  return _REGISTRY[name]


def registry() -> Mapping[str, Algorithm]:
  """A read-only view of the registry."""
  return dict(_REGISTRY)


def loss(name: str, **hparams) -> Loss:
  """``Loss(get(name), get(name).hparams(**hparams))``; an unknown field lists the valid ones."""
  algo = get(name)
  known = {f.name for f in algo.hparam_fields()}
  unknown = sorted(set(hparams) - known)
  if unknown:
    raise ValueError(f"algorithms.loss: {name!r} has no hyper-parameter(s) {unknown}; its fields are "
                     f"{sorted(known)}.")
  return Loss(algo, algo.hparams(**hparams))


# ---------------------------------------------------------------- shared forwards

def features(model, tokens, attention):
  """``(h [N,T,D], unembed)`` if the model supports ``return_hidden``, else ``(logits, identity)``.

  The one switch between memory-lean hidden states + chunked unembedding and
  full logits (for models without ``return_hidden``/``unembed``).
  """
  if hasattr(model, "unembed"):
    return model(tokens, attention, return_hidden=True), model.unembed
  return model(tokens, attention), lambda x: x


def label_logprobs(model, tokens, attention, *, chunk_size: int, needed=None) -> jax.Array:
  """Next-token log-probs ``[N, T-1]`` float32 of ``tokens[:, 1:]`` (chunked, no f32 [N,T,V]).

  ``needed`` (``[N, T-1]``, e.g. the response labels): only those positions are used; the
  chunks before the first of them and those without any are skipped and read as 0
  (:func:`alignjax.losses.chunked_map`).
  """
  h, unembed = features(model, tokens, attention)
  if needed is not None:
    needed = jnp.asarray(needed) > 0
  return L.chunked_token_logprobs(h[:, :-1], tokens[:, 1:], unembed, chunk_size=chunk_size, needed=needed)


def side_inputs(batch, sides: tuple[str, ...]):
  """``(tokens, attention, response_mask[:, 1:])`` of the ``sides`` stacked, ``[len(sides) * B, T]``."""
  tokens = batch_lib.concat_sides(batch, "tokens", sides)
  attention = batch_lib.concat_sides(batch, "attention", sides)
  mask = batch_lib.concat_sides(batch, "response", sides)[:, 1:].astype(jnp.float32)
  return tokens, attention, mask


def pair_inputs(batch):
  """``(tokens, attention, response_mask[:, 1:])`` of ``[chosen; rejected]``, ``[2B, T]``."""
  return side_inputs(batch, batch_lib.SIDES)


def reduce(lp, mask, average: bool):
  """Masked token sum (or mean) over the last axis."""
  return L.masked_mean(lp, mask) if average else L.masked_sum(lp, mask)


def sequence_logps(model, batch, sides: tuple[str, ...], *, average: bool, chunk_size: int,
                   response_only: bool = True):
  """``(per-token log-probs [nB, T-1], response masks, per-side sequence log-probs)`` of ``model``.

  ``response_only``: the per-token log-probs are exact on the response labels only (the
  unembedding skips the positions before the first response label of the batch, which read
  as 0; others may hold their log-probs); False: exact at every position (e.g. a prompt NLL).
  """
  tokens, attention, mask = side_inputs(batch, sides)
  lp = label_logprobs(model, tokens, attention, chunk_size=chunk_size, needed=mask if response_only else None)
  return lp, mask, batch_lib.split_sides(reduce(lp, mask, average), len(sides))


def reference_sequence_logps(ctx: Context, batch, sides: tuple[str, ...], *, average: bool):
  """Reference sequence log-probs of each side ``[B]`` under ``ctx.reference``'s mode (no gradient).

  ``online``: the frozen ``reference`` model, chunked; ``precomputed``: the batch's
  ``reference_{side}_{logps,mean_logps}`` keys; ``free``: zero (SimPO-style
  reference-free, Meng et al. 2024, arXiv:2405.14734).
  """
  mode = ctx.reference.mode
  if mode in ("online", "adapter_off"):
    _, _, seq = sequence_logps(ctx.frozen["reference"], batch, sides, average=average, chunk_size=ctx.chunk_size)
    return tuple(jax.lax.stop_gradient(x) for x in seq)
  if mode == "precomputed":
    kind = "mean_logps" if average else "logps"
    keys = [f"reference_{side}_{kind}" for side in sides]
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"reference: precomputed mode needs batch keys {missing}; see reference.attach.")
    return tuple(jax.lax.stop_gradient(jnp.asarray(batch[k], jnp.float32)) for k in keys)
  if mode == "free":
    b = jnp.shape(batch[f"{sides[0]}_tokens"])[0]
    return tuple(jnp.zeros((b,), jnp.float32) for _ in sides)
  raise ValueError(f"reference: mode {mode!r} has no reference log-probs.")


def preference_metrics(out, policy_seq_logps):
  """The metrics every paired objective logs (rewards, log-probs, policy preference accuracy)."""
  pc, pr = batch_lib.split_pair(jax.lax.stop_gradient(policy_seq_logps))
  return {
      "rewards/chosen": out.chosen_rewards,
      "rewards/rejected": out.rejected_rewards,
      "rewards/margins": out.margins,
      "rewards/accuracy": out.accuracies,
      "logps/chosen": pc,
      "logps/rejected": pr,
      "policy/preference_accuracy": (pc > pr).astype(jnp.float32),
  }


def token_counts(batch, side: str, *, prompt: bool = False):
  """``[B]`` float32 label tokens of ``side``'s rows: response tokens, or (``prompt``) every attended label.

  ``prompt=True`` counts the labels TRL's ORPO cross-entropy covers on
  right-padded rows (``input_ids`` where attended, shifted): positions ``t >= 1``
  whose token and predecessor are both attended.
  """
  return label_mask(batch, side, prompt=prompt).sum(axis=-1)


def label_mask(batch, side: str, *, prompt: bool = False):
  """``[B, T-1]`` float32 label mask of ``side``: its response labels, or (``prompt``) every attended label."""
  if not prompt:
    return jnp.asarray(batch[f"{side}_response"])[:, 1:].astype(jnp.float32)
  att = jnp.asarray(batch[f"{side}_attention"]).astype(bool)
  return (att[:, 1:] & att[:, :-1]).astype(jnp.float32)


def batch_token_mean(row_sums, all_counts):
  """Per-row terms whose mean over the WHOLE batch is ``sum(row_sums) / sum(all_counts)``.

  ``all_counts [B_total]`` are the token counts of every row of the global batch
  (``ctx.statistics``); a micro-batch's rows get ``row_sums * B_total / N_total``,
  so a loss that is one token mean over the batch (TRL's ``CrossEntropyLoss``
  NLL terms of CPO and ORPO) is exact with gradient accumulation and sharding.
  """
  total = jnp.maximum(jnp.sum(all_counts), 1.0)
  return row_sums * (all_counts.shape[0] / total)


def positive_rows(batch):
  """``(tokens, attention, response_mask[:, 1:], row_weight [B])`` of the rows SFT imitates.

  Paired batches: the chosen rows. Unpaired: the desirable completions (others weigh 0).
  """
  schema = batch_lib.detect(batch)
  side = schema.sides[0]
  tokens, attention, mask = side_inputs(batch, (side,))
  if batch_lib.DESIRABLE in schema.per_example:
    weight = jnp.asarray(batch[batch_lib.DESIRABLE]).astype(jnp.float32)
  else:
    weight = jnp.ones(tokens.shape[:1], jnp.float32)
  return tokens, attention, mask, weight
