"""Likelihood-displacement diagnostics a run can log: gradient entanglement of each pair, CHES scores.

* Gradient entanglement (Yuan et al. 2024, "A Common Pitfall of Margin-based
  Language Model Alignment: Gradient Entanglement", arXiv:2410.13828; Razin et
  al. 2024, arXiv:2410.08847, Sec. 4): for every pair, the inner product and
  cosine of ``g+ = grad log pi(y+|x)`` and ``g- = grad log pi(y-|x)`` over all
  trainable parameters (:func:`alignjax.losses.gradient_entanglement`).
  :func:`make_entanglement_fn` computes them pair by pair (``lax.map``), so at
  most one pair's two gradients of the whole model exist at a time, sharded
  like the parameters on a mesh; a loop calls it at a logging cadence.
* CHES (Razin et al. 2024, Definition 2): :func:`make_ches_fn` scores every pair
  from the policy's final (normed) hidden states, for the data filter of
  :func:`alignjax.study.displacement.ches_filter`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax import losses as L
from alignjax.data import batch as batch_lib
from alignjax.training.algorithms import base


def _sequence_logp(model, tokens, attention, response, chunk_size):
  lp = base.label_logprobs(model, tokens, attention, chunk_size=chunk_size)
  return L.masked_sum(lp, response[:, 1:].astype(jnp.float32))


def make_entanglement_fn(model: nnx.Module, *, chunk_size: int = 128, mesh=None):
  """Jitted ``fn(params, batch) -> {"entanglement/inner_product", "entanglement/cosine", ...}`` (pair means).

  ``params`` are ``model``'s ``nnx.Param`` state (e.g. ``TrainState.params``);
  ``batch`` a paired batch. Returns the batch means of the per-pair inner
  product, cosine and gradient norms of :class:`alignjax.losses.EntanglementOutput`
  (float32 scalars) and ``entanglement/negative_fraction``, the fraction of
  pairs whose chosen log-likelihood falls under a small gradient step on the DPO
  margin to first order (``<g+, g-> > ||g+||^2``).
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def logp(params, tokens, attention, response):
    m = nnx.merge(graphdef, params, rest)
    return _sequence_logp(m, tokens[None], attention[None], response[None], chunk_size)[0]

  grad = jax.grad(logp)

  def pair(params, row):
    g_c = grad(params, row["chosen_tokens"], row["chosen_attention"], row["chosen_response"])
    g_r = grad(params, row["rejected_tokens"], row["rejected_attention"], row["rejected_response"])
    add = lambda t: jax.tree.map(lambda x: x[None], t)
    out = L.gradient_entanglement(add(g_c), add(g_r))
    return jnp.stack([out.inner_product[0], out.cosine[0], out.chosen_norm[0], out.rejected_norm[0]])

  def fn(params, batch):
    batch_lib.check_batch(batch, batch_lib.PAIRED)
    rows = {k: jnp.asarray(batch[k]) for k in batch_lib.PAIRED.keys()}
    stats = jax.lax.map(lambda row: pair(params, row), rows)        # [B, 4]
    inner, cosine, norm_c, norm_r = (stats[:, i] for i in range(4))
    return {"entanglement/inner_product": jnp.mean(inner), "entanglement/cosine": jnp.mean(cosine),
            "entanglement/chosen_grad_norm": jnp.mean(norm_c), "entanglement/rejected_grad_norm": jnp.mean(norm_r),
            "entanglement/negative_fraction": jnp.mean((inner > norm_c ** 2).astype(jnp.float32))}

  kwargs = {}
  if mesh is not None:
    from alignjax import sharding as sharding_lib  # noqa: PLC0415
    kwargs["in_shardings"] = (None, sharding_lib.batch_sharding(mesh, ndim=1))
  return jax.jit(fn, **kwargs)


def make_ches_fn(model: nnx.Module, *, length_normalize: bool = False):
  """Jitted ``fn(params, batch) -> [B]`` CHES scores of a paired batch from the final hidden states.

  Razin et al. 2024, arXiv:2410.08847, Definition 2, at the authors' positions
  (the states that predict the response tokens; :func:`alignjax.losses.ches_scores`).
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def fn(params, batch):
    m = nnx.merge(graphdef, params, rest)
    h = {}
    for side in batch_lib.SIDES:
      hidden = m(jnp.asarray(batch[f"{side}_tokens"]), jnp.asarray(batch[f"{side}_attention"]), return_hidden=True)
      h[side] = (hidden[:, :-1], jnp.asarray(batch[f"{side}_response"])[:, 1:])
    return L.ches_scores(h["chosen"][0], h["rejected"][0], h["chosen"][1], h["rejected"][1],
                         length_normalize=length_normalize)
  return jax.jit(fn)


# ---------------------------------------------------------------- the CHES data filter
# Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct
# Preference Optimization", arXiv:2410.08847, Sec. 6: score every pair by
# (length-normalised) CHES from the policy's final hidden states and keep the pairs
# with the LOWEST scores (the authors filter out the highest-scoring ones).

def ches_scores(model, data: Mapping[str, Any], *, length_normalize: bool = True,
                batch_size: int = 64) -> np.ndarray:
  """``[N]`` CHES scores of every pair of a paired data dict (Razin et al. 2024, Definition 2)."""
  batch_lib.check_batch(data, batch_lib.PAIRED)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"ches_scores: `batch_size` must be a positive int, got {batch_size!r}.")
  fn = make_ches_fn(model, length_normalize=length_normalize)
  params = nnx.split(model, nnx.Param, ...)[1]
  n = batch_lib.num_examples(data)
  out = []
  for start in range(0, n, batch_size):
    rows = {k: np.asarray(data[k][start:start + batch_size]) for k in batch_lib.PAIRED.keys()}
    out.append(np.asarray(fn(params, rows)))
  return np.concatenate(out)


def ches_filter(model, data: Mapping[str, Any], *, keep_fraction: float, length_normalize: bool = True,
                batch_size: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """``(kept_data, scores)``: the ``keep_fraction`` of pairs with the lowest CHES, in their original order.

  ``kept_data`` holds every key of ``data`` (extra columns too) for the kept
  rows; ``scores`` are the ``[N]`` scores of all rows. At least one pair is kept.
  """
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"ches_filter: `keep_fraction` must be in (0, 1], got {keep_fraction}.")
  scores = ches_scores(model, data, length_normalize=length_normalize, batch_size=batch_size)
  keep = max(1, int(round(keep_fraction * len(scores))))
  rows = np.sort(np.argsort(scores, kind="stable")[:keep])
  return {k: np.asarray(v)[rows] for k, v in data.items()}, scores
