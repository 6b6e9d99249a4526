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


def aligndistil(pol, ref, dpo_l, rdpo, mask, beta, beta_max, adaptive, divergence, average):
  B, T, _ = pol.shape
  losses, coefs = np.zeros(B), np.zeros((B, T))
  for b in range(B):
    total, n = 0.0, 0
    for t in range(T):
      lr = log_softmax(ref[b, t])
      ld = log_softmax(dpo_l[b, t])
      lc = lr if rdpo is None else log_softmax(rdpo[b, t])
      tv = 0.5 * float(np.abs(np.exp(ld) - np.exp(lc)).sum())
      w = min(beta / max(tv, 1e-8), beta_max) if adaptive else beta
      coefs[b, t] = w
      teacher = log_softmax(lr + w * (ld - lc))
      student = log_softmax(pol[b, t])
      if divergence == "reverse_kl":
        d = float(np.sum(np.exp(student) * (student - teacher)))
      else:
        d = float(np.sum(np.exp(teacher) * (teacher - student)))
      if mask[b, t]:
        total += d
        n += 1
    losses[b] = total / max(n, 1) if average else total
  return losses, coefs
