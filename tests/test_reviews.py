"""The generated reviews task: gold reward and reference statistics vs direct counting."""

import numpy as np
import pytest

from alignjax.data import reviews
from alignjax.data.synthetic import BOS, EOS, PAD, SEP

TASK = reviews.ReviewsTask()


def _reward_by_words(task, row):
  """Independent reference: decode to words and count list membership."""
  words = []
  for t in row:
    w = task.words[int(t)]
    if w == "<eos>":
      break
    words.append(w)
  pos = sum(w in reviews.POSITIVE for w in words)
  neg = sum(w in reviews.NEGATIVE for w in words)
  return (pos - neg) / max(len(words), 1)


def test_gold_reward_matches_word_counting(rng):
  rows = rng.integers(0, TASK.vocab_size, size=(200, 12))
  rows[::3, 5] = EOS
  got = TASK.gold_reward(rows)
  want = [_reward_by_words(TASK, r) for r in rows]
  np.testing.assert_allclose(got, want)
  assert got.min() >= -1 and got.max() <= 1


def test_gold_reward_respects_mask():
  pos, neg = TASK.positive_ids, TASK.negative_ids
  rows = np.array([[pos[0], pos[1], neg[0], PAD]])
  np.testing.assert_allclose(TASK.gold_reward(rows, np.array([[1, 1, 0, 0]])), [1.0])
  np.testing.assert_allclose(TASK.gold_reward(rows, np.array([[1, 1, 1, 0]])), [1 / 3])


def test_sft_data_layout_and_statistics():
  data = TASK.sft_data(4000, seed=0)
  tokens, resp = data["chosen_tokens"], data["chosen_response"]
  assert tokens.shape == (4000, TASK.seq_len)
  assert (tokens[:, 0] == BOS).all() and (tokens[:, 2] == SEP).all()
  np.testing.assert_array_equal(tokens[:, 1] - TASK.topic_offset, data["topic"])
  # Every response ends with EOS and is between min_len and max_len words.
  n_words = resp.sum(1) - 1
  assert n_words.min() >= TASK.min_len and n_words.max() <= TASK.max_len
  assert (tokens[np.arange(len(tokens)), 2 + resp.sum(1)] == EOS).all()
  sentiment = np.isin(tokens, np.concatenate([TASK.positive_ids, TASK.negative_ids])) & resp
  assert abs(sentiment.sum() / n_words.sum() - TASK.sentiment_rate) < 0.02
  # The topic prior shows in the reward: higher topics are more positive.
  r = TASK.gold_reward(np.where(resp, tokens, PAD)[:, 3:])
  lo, hi = r[data["topic"] == 0].mean(), r[data["topic"] == TASK.num_topics - 1].mean()
  expected = TASK.sentiment_rate * (2 * TASK.topic_priors[[0, -1]] - 1)
  np.testing.assert_allclose([lo, hi], expected, atol=0.03)


def test_bradley_terry_frequencies_match_sigmoid():
  n = 20000
  rewards = np.stack([np.zeros(n), np.full(n, 0.1)], axis=1)
  chosen, rejected = reviews.bradley_terry_pairs(rewards, seed=0, temperature=0.1)
  assert (chosen != rejected).all()
  p_second = (chosen == 1).mean()
  assert abs(p_second - 1 / (1 + np.exp(-1.0))) < 0.015


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_topics=1), "num_topics"),
    (dict(min_len=5, max_len=3), "min_len"),
    (dict(sentiment_rate=1.0), "sentiment_rate"),
])
def test_bad_task_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    reviews.ReviewsTask(**kwargs)


def test_bad_inputs():
  with pytest.raises(ValueError, match="response_tokens"):
    TASK.gold_reward(np.zeros(3))
  with pytest.raises(ValueError, match="rewards"):
    reviews.bradley_terry_pairs(np.zeros((3, 1)), seed=0)


def test_sampled_preferences_layout_and_labels():
  task = reviews.ReviewsTask()
  rng = np.random.default_rng(0)
  n, k = 300, 4
  prompts = np.repeat(task.prompts(task.sample_topics(n, 0))[0], k, axis=0)
  resp = rng.integers(task.topic_offset + task.num_topics, task.vocab_size, size=(n * k, 6)).astype(np.int32)
  resp[:, 4] = EOS
  mask = np.ones(resp.shape, bool)
  mask[:, 5] = False
  out = reviews.sampled_preferences(task, prompts, resp, mask, num_samples=k, seed=0, temperature=0.05)
  assert out["chosen_tokens"].shape == (n * 2, 9)
  assert (out["chosen_tokens"][:, 8] == PAD).all() and not out["chosen_attention"][:, 8].any()
  assert (out["chosen_response"][:, :3] == 0).all() and out["chosen_response"][:, 3:8].all()
  # Each pair is two distinct samples of the same prompt, rewards are the gold rewards of the rows.
  for side in ("chosen", "rejected"):
    r = task.gold_reward(out[f"{side}_tokens"][:, 3:], out[f"{side}_response"][:, 3:])
    np.testing.assert_allclose(out[f"{side}_reward"], r, rtol=1e-6)
  np.testing.assert_array_equal(out["chosen_tokens"][:, :3], out["rejected_tokens"][:, :3])
  # Bradley-Terry at a low temperature: the higher-reward response is chosen far more often than not.
  diff = out["chosen_reward"] - out["rejected_reward"]
  assert (diff[diff != 0] > 0).mean() > 0.9
