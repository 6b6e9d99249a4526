"""Independent float64 NumPy implementations of the papers' equations.

Written from the equations with explicit loops over the batch and time axes
(no shared code with :mod:`alignjax.losses`), so agreement is evidence, not
tautology.
"""

from __future__ import annotations

import math

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
  z = np.asarray(z, np.float64)
  m = z.max(axis=-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def log_sigmoid(x: float) -> float:
  # log(1 / (1 + exp(-x))) computed stably.
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def seq_logprob(logits, labels, mask, average=False):
  """[B] sum (or mean) over masked t of log softmax(logits[b, t])[labels[b, t]]."""
  B, T, _ = logits.shape
  out = np.zeros(B)
  for b in range(B):
    total, count = 0.0, 0
    for t in range(T):
      if mask[b, t]:
        total += log_softmax(logits[b, t])[labels[b, t]]
        count += 1
    out[b] = total / max(count, 1) if average else total
  return out


def kl(p_logits, q_logits):
  lp, lq = log_softmax(p_logits), log_softmax(q_logits)
  return float(np.sum(np.exp(lp) * (lp - lq)))


def seq_kl(p_logits, q_logits, mask, average=False):
  B, T, _ = p_logits.shape
  out = np.zeros(B)
  for b in range(B):
    vals = [kl(p_logits[b, t], q_logits[b, t]) for t in range(T) if mask[b, t]]
    out[b] = (sum(vals) / max(len(vals), 1)) if average else sum(vals)
  return out


def dpo(pc, pr, rc, rr, beta, label_smoothing, robust=False):
  """cDPO: -(1-e) log s(beta h) - e log s(-beta h), h = (pc - rc) - (pr - rr).

  Robust DPO (Chowdhury et al. 2024, Eq. for the unbiased loss):
  [-(1-e) log s(beta h) + e log s(-beta h)] / (1 - 2e).
  """
  out = []
  e = label_smoothing
  for i in range(len(pc)):
    h = (pc[i] - rc[i]) - (pr[i] - rr[i])
    if robust:
      out.append((-(1 - e) * log_sigmoid(beta * h) + e * log_sigmoid(-beta * h)) / (1 - 2 * e))
    else:
      out.append(-(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h))
  return np.array(out)


GPO = {
    "logistic": lambda r: math.log(1.0 + math.exp(-r)),
    "hinge": lambda r: max(0.0, 1.0 - r),
    "squared": lambda r: (r - 1.0) ** 2,
    "exponential": lambda r: math.exp(-r),
    "truncated_quadratic": lambda r: max(0.0, 1.0 - r) ** 2,
    "savage": lambda r: 1.0 / (1.0 + math.exp(r)) ** 2,
}


def gpo(pc, pr, rc, rr, beta, name):
  f = GPO[name]
  return np.array([f(beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))) for i in range(len(pc))])


def tdpo(pol_c, pol_r, ref_c, ref_r, lab_c, lab_r, m_c, m_r, beta, alpha, variant, average):
  """TDPO as in the paper / official code (forward values; sg is value-neutral)."""
  def stats(pol, ref, lab, m):
    B, T, _ = pol.shape
    margin, skl = np.zeros(B), np.zeros(B)
    for b in range(B):
      ms, ks, n = 0.0, 0.0, 0
      for t in range(T):
        if not m[b, t]:
          continue
        lp, lr = log_softmax(pol[b, t]), log_softmax(ref[b, t])
        ms += lp[lab[b, t]] - lr[lab[b, t]]
        ks += float(np.sum(np.exp(lr) * (lr - lp)))  # KL(pi_ref || pi)
        n += 1
      d = max(n, 1) if average else 1
      margin[b], skl[b] = ms / d, ks / d
    return margin, skl

  mc, kc = stats(pol_c, ref_c, lab_c, m_c)
  mr, kr = stats(pol_r, ref_r, lab_r, m_r)
  if variant == "tdpo1":
    z = (mc - mr) - (kr - kc)
  else:
    z = (mc - mr) - alpha * (kr - kc)
  losses = np.array([-log_sigmoid(beta * zi) for zi in z])
  return losses, beta * (mc + kc), beta * (mr + kr), kc, kr


def aligndistil(student, dpo_l, contrast, mask, beta, beta2, mode, temperature,
                length_normalize, divergence="reverse_kl"):
  """AlignDistil (Zhang et al. 2025, arXiv:2503.02832) as in the authors' trainers.

  Per position, p_d = softmax(z_d), p_c = softmax(z_c):
    aligndistil:        w = beta2 * sum|p_d - p_c| + 1e-3; z* = z_d + w (z_d - z_c); s = beta / w
    theorem1:           w = beta / beta2; z* = w z_d + (1 - w) z_c;            s = beta2
    theorem1_contrast:  w = beta / beta2; z* = z_d + w (z_d - z_c);            s = beta2
    theorem1_adaptive:  w as aligndistil; z* = w z_d + (1 - w) z_c;            s = beta / w
  l_t = s * KL(softmax(student) || softmax(z* / temperature)) (forward_kl: KL(teacher || student)).
  Returns (losses [B], weights [B, T], diagnostics dict of [B] arrays).
  """
  student, dpo_l, contrast = (np.asarray(x, np.float64) for x in (student, dpo_l, contrast))
  B, T, _ = student.shape
  losses, weights = np.zeros(B), np.zeros((B, T))
  names = ("mean_weight", "expected_reward", "dpo_expected_reward", "seq_kl_dpo",
           "token_kl_dpo", "seq_kl_contrast", "token_kl_contrast", "num_tokens")
  diag = {k: np.zeros(B) for k in names}
  for b in range(B):
    total, n = 0.0, 0
    acc = {k: 0.0 for k in names}
    for t in range(T):
      zd, zc = dpo_l[b, t], contrast[b, t]
      pd = np.exp(zd - zd.max()); pd /= pd.sum()
      pc = np.exp(zc - zc.max()); pc /= pc.sum()
      if mode in ("aligndistil", "theorem1_adaptive"):
        w = beta2 * float(np.sum(np.abs(pd - pc))) + 1e-3
        s = beta / w
      else:
        w = beta / beta2
        s = beta2
      if mode in ("aligndistil", "theorem1_contrast"):
        zstar = zd + w * (zd - zc)
      else:
        zstar = w * zd + (1.0 - w) * zc
      weights[b, t] = w
      lq = log_softmax(zstar / temperature)
      ls = log_softmax(student[b, t])
      ps = np.exp(ls)
      if divergence == "reverse_kl":
        d = float(np.sum(ps * (ls - lq)))
      else:
        d = float(np.sum(np.exp(lq) * (lq - ls)))
      if not mask[b, t]:
        continue
      total += s * d
      n += 1
      ld, lc = np.log(pd), np.log(pc)
      r = beta * (ld - lc)
      acc["mean_weight"] += w
      acc["expected_reward"] += float(np.sum(ps * r))
      acc["dpo_expected_reward"] += float(np.sum(pd * r))
      acc["seq_kl_dpo"] += float(np.sum(ps * (ls - ld)))
      acc["seq_kl_contrast"] += float(np.sum(ps * (ls - lc)))
    losses[b] = total / n if (length_normalize and n) else total
    for k in ("expected_reward", "dpo_expected_reward", "seq_kl_dpo", "seq_kl_contrast"):
      diag[k][b] = acc[k]
    diag["mean_weight"][b] = acc["mean_weight"] / n if n else 0.0
    diag["token_kl_dpo"][b] = acc["seq_kl_dpo"] / n if n else 0.0
    diag["token_kl_contrast"][b] = acc["seq_kl_contrast"] / n if n else 0.0
    diag["num_tokens"][b] = n
  return losses, weights, diag
