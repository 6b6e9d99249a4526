"""A generated "reviews" language with a programmatic gold reward.

The controlled setting of the DPO paper (Rafailov et al. 2023, arXiv:2305.18290,
Sec. 6.1: IMDb sentiment with a ground-truth reward) and of GPO's controlled
study (Tang et al. 2024, arXiv:2402.05749, after Gao et al. 2023,
arXiv:2210.10760), made small enough to run on a laptop CPU:

* a prompt is ``[BOS] topic [SEP]``; each topic has its own sentiment prior;
* the reference ("SFT") distribution writes a review of ``min_len..max_len``
  words: each word is, with probability ``sentiment_rate``, a sentiment word
  (positive with the topic's prior, else negative), otherwise a neutral word;
  then ``[EOS]``;
* the gold reward of a response is its net sentiment per word,
  ``r(y) = (#positive(y) - #negative(y)) / max(#words(y), 1)`` in ``[-1, 1]``,
  counted up to the first EOS. A response made of special or topic tokens is
  not a review: those tokens count as words but never as sentiment.

The trade-off is real: the reward rises by writing more (and more positive)
sentiment words than the reference does, which costs KL to the reference.

Sequences are laid out like :mod:`alignjax.data.synthetic`,
``[BOS] topic [SEP] response [EOS] [PAD]...``, in the schema of
:mod:`alignjax.data.batch`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alignjax.data.synthetic import BOS, EOS, NUM_SPECIAL, PAD, SEP

POSITIVE = ("great", "superb", "lovely", "fun", "moving", "brilliant", "charming", "gripping")
NEGATIVE = ("awful", "dull", "boring", "weak", "messy", "bland", "tedious", "clumsy")
NEUTRAL = ("the", "plot", "actors", "story", "scenes", "music", "ending", "pace",
           "camera", "dialogue", "film", "and", "was", "is", "quite", "very")
SPECIAL = ("<pad>", "<bos>", "<sep>", "<eos>")


@dataclasses.dataclass(frozen=True)
class ReviewsTask:
  """The generated reviews language (see the module docstring).

  Attributes:
    num_topics: number of prompt topics; topic ``i`` has positive-sentiment
      prior ``0.15 + 0.7 * i / (num_topics - 1)``.
    min_len, max_len: number of words of a reference review.
    sentiment_rate: probability that a reference word is a sentiment word.
  """

  num_topics: int = 8
  min_len: int = 4
  max_len: int = 10
  sentiment_rate: float = 0.3

  def __post_init__(self):
    if self.num_topics < 2:
      raise ValueError(f"ReviewsTask: `num_topics` must be >= 2, got {self.num_topics}.")
    if not 1 <= self.min_len <= self.max_len:
      raise ValueError(
          f"ReviewsTask: need 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}.")
    if not 0.0 < self.sentiment_rate < 1.0:
      raise ValueError(f"ReviewsTask: `sentiment_rate` must be in (0, 1), got {self.sentiment_rate}.")

  # Vocabulary: specials, topics, positive, negative, neutral words.
  @property
  def topic_offset(self) -> int:
    return NUM_SPECIAL

  @property
  def positive_ids(self) -> np.ndarray:
    start = NUM_SPECIAL + self.num_topics
    return np.arange(start, start + len(POSITIVE), dtype=np.int32)

  @property
  def negative_ids(self) -> np.ndarray:
    start = NUM_SPECIAL + self.num_topics + len(POSITIVE)
    return np.arange(start, start + len(NEGATIVE), dtype=np.int32)

  @property
  def neutral_ids(self) -> np.ndarray:
    start = NUM_SPECIAL + self.num_topics + len(POSITIVE) + len(NEGATIVE)
    return np.arange(start, start + len(NEUTRAL), dtype=np.int32)

  @property
  def vocab_size(self) -> int:
    return NUM_SPECIAL + self.num_topics + len(POSITIVE) + len(NEGATIVE) + len(NEUTRAL)

  @property
  def prompt_len(self) -> int:
    return 3  # BOS topic SEP

  @property
  def seq_len(self) -> int:
    return self.prompt_len + self.max_len + 1  # + EOS

  @property
  def words(self) -> tuple[str, ...]:
    topics = tuple(f"<topic{i}>" for i in range(self.num_topics))
    return SPECIAL + topics + POSITIVE + NEGATIVE + NEUTRAL

  @property
  def topic_priors(self) -> np.ndarray:
    return 0.15 + 0.7 * np.arange(self.num_topics) / (self.num_topics - 1)

  def decode(self, tokens) -> str:
    """Readable text of a token sequence (stops at the first PAD after content)."""
    words = self.words
    return " ".join(words[int(t)] if 0 <= int(t) < len(words) else f"<{int(t)}>" for t in tokens
                    if int(t) != PAD)

  def sample_topics(self, num: int, seed: int) -> np.ndarray:
    if num <= 0:
      raise ValueError(f"ReviewsTask.sample_topics: `num` must be positive, got {num}.")
    return np.random.default_rng(seed).integers(0, self.num_topics, size=num)

  def prompts(self, topics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prompt tokens ``[N, 3]`` (``BOS topic SEP``) and an all-ones mask."""
    topics = np.asarray(topics)
    n = len(topics)
    tokens = np.stack([np.full(n, BOS), topics + self.topic_offset, np.full(n, SEP)], axis=1)
    return tokens.astype(np.int32), np.ones_like(tokens, dtype=bool)

  def sample_response(self, topic: int, rng: np.random.Generator) -> np.ndarray:
    """One reference review (word ids, without EOS)."""
    n = rng.integers(self.min_len, self.max_len + 1)
    out = np.empty(n, np.int32)
    q = self.topic_priors[topic]
    for i in range(n):
      if rng.random() < self.sentiment_rate:
        ids = self.positive_ids if rng.random() < q else self.negative_ids
      else:
        ids = self.neutral_ids
      out[i] = ids[rng.integers(len(ids))]
    return out

  def layout(self, topic: int, response: np.ndarray, *, seq_len: int | None = None):
    """``(tokens, attention, response_mask)`` rows of length ``seq_len``."""
    T = self.seq_len if seq_len is None else seq_len
    seq = np.concatenate([[BOS, topic + self.topic_offset, SEP], response, [EOS]]).astype(np.int32)
    if len(seq) > T:
      raise ValueError(f"ReviewsTask.layout: sequence of {len(seq)} tokens exceeds seq_len {T}.")
    tokens = np.full(T, PAD, np.int32)
    tokens[: len(seq)] = seq
    attention = np.zeros(T, bool)
    attention[: len(seq)] = True
    response_mask = np.zeros(T, bool)
    response_mask[self.prompt_len: len(seq)] = True
    return tokens, attention, response_mask

  def sft_data(self, num_examples: int, seed: int) -> dict[str, np.ndarray]:
    """Reference reviews in the preference schema (chosen == rejected == the review).

    SFT trains on the ``chosen_*`` fields; the ``rejected_*`` copies keep the
    schema of :mod:`alignjax.data.batch` so every pipeline reads it.
    """
    if num_examples <= 0:
      raise ValueError(f"ReviewsTask.sft_data: `num_examples` must be positive, got {num_examples}.")
    rng = np.random.default_rng(seed)
    topics = rng.integers(0, self.num_topics, size=num_examples)
    rows = [self.layout(t, self.sample_response(t, rng)) for t in topics]
    tokens, attention, response = (np.stack(c) for c in zip(*rows))
    return {"chosen_tokens": tokens, "chosen_attention": attention, "chosen_response": response,
            "rejected_tokens": tokens.copy(), "rejected_attention": attention.copy(),
            "rejected_response": response.copy(), "topic": topics.astype(np.int32)}

  def gold_reward(self, response_tokens, response_mask=None) -> np.ndarray:
    """Net sentiment per word of each response, ``[N]`` float64 in ``[-1, 1]``.

    Args:
      response_tokens: ``[N, L]`` generated tokens (prompt excluded).
      response_mask: ``[N, L]``, True on generated tokens (the sampler's
        ``out.mask``); defaults to all True. Counting stops at the first EOS.
    """
    tokens = np.asarray(response_tokens)
    if tokens.ndim != 2:
      raise ValueError(f"ReviewsTask.gold_reward: `response_tokens` must be [N, L], got {tokens.shape}.")
    mask = np.ones(tokens.shape, bool) if response_mask is None else np.asarray(response_mask, bool)
    if mask.shape != tokens.shape:
      raise ValueError(
          f"ReviewsTask.gold_reward: `response_mask` {mask.shape} must match `response_tokens` {tokens.shape}.")
    # Positions at or after the first EOS are not words.
    before_eos = np.cumsum(tokens == EOS, axis=1) == 0
    words = mask & before_eos
    pos = np.isin(tokens, self.positive_ids) & words
    neg = np.isin(tokens, self.negative_ids) & words
    return (pos.sum(1) - neg.sum(1)) / np.maximum(words.sum(1), 1)


def bradley_terry_pairs(rewards: np.ndarray, *, seed: int, temperature: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Noisy preference labels for K samples per prompt.

  For each prompt (row of ``rewards [N, K]``), samples a pair ``(i, j)`` of
  distinct responses and prefers ``i`` with Bradley–Terry probability
  ``σ((r_i - r_j) / temperature)`` (Bradley & Terry 1952). Returns
  ``(chosen_index [N], rejected_index [N])``.
  """
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 2 or rewards.shape[1] < 2:
    raise ValueError(f"bradley_terry_pairs: `rewards` must be [N, K] with K >= 2, got {rewards.shape}.")
  if temperature <= 0:
    raise ValueError(f"bradley_terry_pairs: `temperature` must be > 0, got {temperature}.")
  rng = np.random.default_rng(seed)
  n, k = rewards.shape
  i = rng.integers(0, k, size=n)
  j = (i + rng.integers(1, k, size=n)) % k
  diff = rewards[np.arange(n), i] - rewards[np.arange(n), j]
  p_i = 1.0 / (1.0 + np.exp(-diff / temperature))
  prefer_i = rng.random(n) < p_i
  return np.where(prefer_i, i, j), np.where(prefer_i, j, i)


def sampled_preferences(
    task: ReviewsTask, prompt_tokens, responses, response_mask, *, num_samples: int, seed: int,
    temperature: float = 0.1, pad_token_id: int = PAD,
) -> dict[str, np.ndarray]:
  """Preference pairs from ``K`` sampled responses per prompt, labelled by the gold reward.

  The preference-data step of the controlled experiments of DPO (Rafailov et al.
  2023, arXiv:2305.18290, Sec. 6.1) and GPO (Tang et al. 2024, arXiv:2402.05749):
  the ``K`` samples of each prompt are shuffled (seeded) into ``K // 2``
  disjoint pairs, and each pair is labelled with Bradley--Terry noise by
  :func:`bradley_terry_pairs` on the gold rewards.

  Args:
    task: the task whose :meth:`ReviewsTask.gold_reward` scores the responses.
    prompt_tokens: ``[N*K, P]`` prompts (all real tokens), prompt-major: rows
      ``i*K .. i*K+K-1`` hold the ``K`` samples of prompt ``i``.
    responses, response_mask: ``[N*K, L]`` sampled tokens and their mask (the
      sampler's ``out.tokens`` / ``out.mask``).
    num_samples: ``K >= 2``.
    seed: seed of the pairing and of the label noise.
    temperature: Bradley--Terry temperature of the label noise (> 0).
    pad_token_id: token written where a response is masked.

  Returns:
    A dict of ``[N * (K // 2), P + L]`` arrays in the schema of
    :mod:`alignjax.data.batch`, plus ``chosen_reward``/``rejected_reward``
    (float32 ``[..]``, the gold rewards) and ``prompt_index`` (int32).
  """
  fn = "sampled_preferences"
  prompts = np.asarray(prompt_tokens)
  resp, mask = np.asarray(responses), np.asarray(response_mask, bool)
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
    raise ValueError(f"{fn}: `num_samples` must be an int >= 2, got {num_samples!r}.")
  if prompts.ndim != 2 or resp.ndim != 2 or mask.shape != resp.shape or len(prompts) != len(resp):
    raise ValueError(f"{fn}: need `prompt_tokens` [M, P] and `responses`/`response_mask` [M, L] with one M, "
                     f"got {prompts.shape}, {resp.shape}, {mask.shape}.")
  if len(resp) % num_samples:
    raise ValueError(f"{fn}: the {len(resp)} rows must be a multiple of `num_samples` {num_samples}.")
  n, k = len(resp) // num_samples, int(num_samples)
  rewards = task.gold_reward(resp, mask).reshape(n, k)
  rng = np.random.default_rng(seed)
  perm = np.argsort(rng.random((n, k)), axis=1)[:, : 2 * (k // 2)].reshape(n, k // 2, 2)
  pair_rewards = np.take_along_axis(rewards[:, None, :], perm, axis=2).reshape(-1, 2)
  c, r = bradley_terry_pairs(pair_rewards, seed=seed + 1, temperature=temperature)
  flat = perm.reshape(-1, 2)
  rows = np.arange(len(flat))
  prompt_index = np.repeat(np.arange(n), k // 2)
  chosen = prompt_index * k + flat[rows, c]
  rejected = prompt_index * k + flat[rows, r]
  out = {}
  for side, idx in (("chosen", chosen), ("rejected", rejected)):
    m = mask[idx]
    out[f"{side}_tokens"] = np.concatenate(
        [prompts[idx], np.where(m, resp[idx], pad_token_id)], axis=1).astype(np.int32)
    out[f"{side}_attention"] = np.concatenate([np.ones(prompts[idx].shape, bool), m], axis=1)
    out[f"{side}_response"] = np.concatenate([np.zeros(prompts[idx].shape, bool), m], axis=1)
    out[f"{side}_reward"] = rewards.reshape(-1)[idx].astype(np.float32)
  out["prompt_index"] = prompt_index.astype(np.int32)
  return out
