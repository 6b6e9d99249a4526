"""Gold reward and KL(pi || pi_SFT) of a policy, estimated from its own samples.

The axes of the reward--KL frontier (Rafailov et al. 2023, "Direct Preference
Optimization", arXiv:2305.18290, Sec. 6.1 and Fig. 2; Gao et al. 2023, "Scaling
Laws for Reward Model Overoptimization", arXiv:2210.10760):

* reward: ``E_{x, y ~ pi(.|x)} r(x, y)``, the mean gold reward of responses
  sampled at temperature 1;
* KL: the sequence-level ``KL(pi || pi_SFT) = E_{y ~ pi} [log pi(y|x) - log pi_SFT(y|x)]``,
  estimated by the mean over samples of
  ``sum_t log pi(y_t | x, y_<t) - log pi_SFT(y_t | x, y_<t)``. ``log pi`` is the
  log-probability under the distribution the sampler drew from (its
  ``out.logprobs``: for a DeRa mixture, the mixture), ``log pi_SFT`` comes
  from scoring the sampled tokens with the SFT model.

Standard errors treat prompts as the independent units: with ``K`` samples of
each of ``N`` prompts, the estimate is the mean of the ``N`` per-prompt means and
its standard error ``std(per-prompt means, ddof=1) / sqrt(N)`` (the cluster
standard error; equal cluster sizes).

Rows are laid out prompt-major: rows ``i*K .. i*K+K-1`` are the ``K`` samples of
prompt ``i`` (:func:`repeat_prompts`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from alignjax.data import batch as batch_lib
from alignjax.data.batch import response_batch, sequence_batch  # noqa: F401 (re-exported)

__all__ = [
    "Estimate", "SampleScores", "best_of_n_kl", "cluster_mean", "make_scorer", "repeat_prompts",
    "response_batch", "sample_and_score", "sequence_batch", "summarize",
]


class Estimate(NamedTuple):
  """A mean and its standard error."""
  mean: float
  se: float


class SampleScores(NamedTuple):
  """Per-sample quantities of one policy on the evaluation prompts (``[N*K]`` rows, prompt-major).

  Attributes:
    tokens, mask: the sampled responses ``[N*K, L]`` and their mask (True through EOS).
    rewards: gold reward of each response, float64 ``[N*K]``.
    logps: ``sum_t log pi(y_t)`` under the distribution sampled from, ``[N*K]``.
    reference_logps: ``sum_t log pi_SFT(y_t)``, ``[N*K]``.
    num_prompts: ``N``.
  """
  tokens: np.ndarray
  mask: np.ndarray
  rewards: np.ndarray
  logps: np.ndarray
  reference_logps: np.ndarray
  num_prompts: int

  @property
  def log_ratios(self) -> np.ndarray:
    """``log pi(y) - log pi_SFT(y)`` per sample (its mean estimates the KL), float64."""
    return np.asarray(self.logps, np.float64) - np.asarray(self.reference_logps, np.float64)


def repeat_prompts(prompt_tokens, prompt_mask, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
  """Each prompt row repeated ``num_samples`` times, prompt-major: ``[N*K, T]``."""
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"repeat_prompts: `num_samples` must be an int >= 1, got {num_samples!r}.")
  tokens, mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(f"repeat_prompts: `prompt_tokens` and `prompt_mask` must be [N, T] of one shape, "
                     f"got {tokens.shape} and {mask.shape}.")
  return np.repeat(tokens, num_samples, axis=0), np.repeat(mask, num_samples, axis=0)


def make_scorer(model, *, chunk_size: int = 128) -> Callable[..., np.ndarray]:
  """``score(model, prompt_tokens, prompt_mask, response_tokens, response_mask) -> [N]`` float64.

  ``sum_t log pi(y_t | x, y_<t)`` over the response tokens, with the jitted
  label-log-prob pass of the training code
  (:func:`alignjax.training.steps.make_reference_logps_fn`: chunked, never a
  float32 ``[N, T, V]``). ``model`` fixes the architecture; any model of that
  architecture (same graph) can be scored without recompiling.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alignjax.training import steps  # pylint: disable=import-outside-toplevel
  fn = steps.make_reference_logps_fn(model, chunk_size=chunk_size)

  def score(m, prompt_tokens, prompt_mask, response_tokens, response_mask) -> np.ndarray:
    batch = response_batch(prompt_tokens, prompt_mask, response_tokens, response_mask)
    out = fn(nnx.state(m, nnx.Param), batch)
    return np.asarray(out["reference_chosen_logps"], np.float64)

  return score


def cluster_mean(values, num_prompts: int) -> Estimate:
  """Mean of ``values [N*K]`` (prompt-major) and its cluster standard error over the ``N`` prompts."""
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or num_prompts < 1 or v.size % num_prompts or v.size == 0:
    raise ValueError(f"cluster_mean: `values` must be [N*K] with N = num_prompts = {num_prompts}, "
                     f"got shape {v.shape}.")
  per_prompt = v.reshape(num_prompts, -1).mean(axis=1)
  se = float(per_prompt.std(ddof=1) / np.sqrt(num_prompts)) if num_prompts > 1 else float("nan")
  return Estimate(float(per_prompt.mean()), se)


def summarize(scores: SampleScores) -> dict[str, float]:
  """``reward``, ``reward_se``, ``kl``, ``kl_se``, ``num_samples``, ``mean_length`` of ``scores``."""
  reward = cluster_mean(scores.rewards, scores.num_prompts)
  kl = cluster_mean(scores.log_ratios, scores.num_prompts)
  return {"reward": reward.mean, "reward_se": reward.se, "kl": kl.mean, "kl_se": kl.se,
          "num_samples": int(len(scores.rewards)),
          "mean_length": float(np.asarray(scores.mask).sum(axis=1).mean())}


def sample_and_score(
    model, reference, prompt_tokens, prompt_mask, *,
    num_samples: int, max_new_tokens: int, rng, reward_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    scorer: Callable[..., np.ndarray], eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
    temperature: float = 1.0, sampler: Optional[Callable[..., tuple]] = None,
) -> SampleScores:
  """Samples ``num_samples`` responses per prompt from ``model`` and scores them.

  Args:
    model: an ``alignjax.models`` model or a :class:`alignjax.decoding.LogitMixture`
      (DeRa, GenARM); sampled with :func:`alignjax.decoding.generate` at ``temperature``.
      Ignored when ``sampler`` is given.
    reference: the SFT model (``pi_SFT`` of the KL).
    prompt_tokens, prompt_mask: ``[N, T]`` held-out prompts.
    num_samples: ``K`` samples per prompt.
    max_new_tokens: response length limit.
    rng: a ``jax.random`` key; the same key and prompts give the same samples
      from the same distribution.
    reward_fn: ``reward_fn(tokens [M, L], mask [M, L]) -> [M]`` gold rewards.
    scorer: from :func:`make_scorer` (built for the reference's architecture).
    eos_token_ids, pad_token_id: as :func:`alignjax.decoding.generate`.
    temperature: sampling temperature (1: the policy itself, which the KL assumes).
    sampler: a decoding procedure other than sampling one model (best-of-N, ARGS):
      ``sampler(tokens [N*K, T], mask, *, max_new_tokens, rng, eos_token_ids,
      pad_token_id) -> (responses [N*K, L], mask, logps [N*K])`` with ``logps`` the
      log-probability of each response under the procedure's own distribution (or an
      estimate of it).

  Returns:
    :class:`SampleScores` (``[N*K]`` rows, prompt-major).
  """
  from alignjax import decoding  # pylint: disable=import-outside-toplevel
  tokens, mask = repeat_prompts(prompt_tokens, prompt_mask, num_samples)
  if sampler is None:
    out = decoding.generate(model, tokens, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id, rng=rng)
    resp, resp_mask = np.asarray(out.tokens), np.asarray(out.mask, bool)
    logps = np.asarray(out.logprobs, np.float64).sum(axis=1)
  else:
    resp, resp_mask, logps = sampler(tokens, mask, max_new_tokens=max_new_tokens, rng=rng,
                                     eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id)
    resp, resp_mask, logps = np.asarray(resp), np.asarray(resp_mask, bool), np.asarray(logps, np.float64)
  ref = scorer(reference, tokens, mask, resp, resp_mask)
  rewards = np.asarray(reward_fn(resp, resp_mask), np.float64)
  return SampleScores(resp, resp_mask, rewards, logps, ref, int(np.asarray(prompt_tokens).shape[0]))


def best_of_n_kl(scores, num_prompts: int) -> np.ndarray:
  """``KL(pi_BoN || pi)`` of best-of-n over each prompt's sampled score distribution, float64 ``[N]``.

  Best-of-n (``n`` draws from ``pi``, keep the highest score, ties broken uniformly)
  changes the probability of a response only through its score, so its KL to ``pi``
  is the KL between score distributions: ``sum_v P_BoN(v) log(P_BoN(v) / P(v))`` over
  the distinct scores ``v``, with ``P_BoN(v) = F(v)^n - F^-(v)^n`` (``F(v) = P(S <= v)``,
  ``F^-(v) = P(S < v)``). ``F`` is not known for sequences; this is that KL for each
  prompt's empirical distribution of its ``K * n`` sampled scores (ties kept), so it is
  at most ``log n - (n-1)/n`` like every best-of-n KL (Beirami et al. 2024,
  "Theoretical guarantees on the best-of-n alignment policy", arXiv:2401.01879,
  Thm. 1) and consistent as the draws grow. For scores without ties (true KL exactly
  ``log n - (n-1)/n``) it is ``sum_r p_r log(m p_r)``, ``p_r = (r^n - (r-1)^n) / m^n``:
  0.1915 at n = 2 with K = 8 draws (true 0.1931), 1.2038 at n = 8 (true 1.2044). The
  per-pick plug-in ``log(P_BoN(s) / P(s))`` of each kept response, averaged, is biased
  upward there (0.223 and 1.260): a pick is in its own pool, at its top.

  Args:
    scores: ``[N*K, n]`` scores of the ``n`` samples of each of the ``N*K`` best-of-n
      draws, prompt-major (``K`` draws per prompt).
    num_prompts: ``N``.
  """
  s = np.asarray(scores, np.float64)
  if s.ndim != 2 or num_prompts < 1 or s.shape[0] % num_prompts or s.shape[0] == 0:
    raise ValueError(f"best_of_n_kl: `scores` must be [N*K, n] with N = num_prompts = {num_prompts}, "
                     f"got shape {s.shape}.")
  n = s.shape[1]
  pools = s.reshape(num_prompts, -1)
  m = pools.shape[1]
  out = np.empty(num_prompts)
  for i, pool in enumerate(pools):
    values, counts = np.unique(pool, return_counts=True)
    le = np.cumsum(counts) / m
    p = counts / m
    p_bon = le ** n - (le - p) ** n
    out[i] = float(np.sum(p_bon * np.log(p_bon / p)))
  return out


def as_jsonable(x: Any) -> Any:
  """NumPy scalars/arrays to plain Python (for results.jsonl)."""
  if isinstance(x, dict):
    return {k: as_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [as_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x
