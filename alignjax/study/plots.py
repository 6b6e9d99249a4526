"""The reward--KL frontier plot and the Markdown results table of a study.

As in the controlled experiments of DPO (Rafailov et al. 2023, arXiv:2305.18290,
Fig. 2 left) and GPO (Tang et al. 2024, arXiv:2402.05749): x is the sequence
``KL(pi || pi_SFT)``, y the mean gold reward, one curve per method through its
hyper-parameter sweep, with standard-error bars.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from alignjax.study import stages

__all__ = ["markdown_table", "plot_frontier"]

# Decoding-time methods of the study (dashed curves) and their legend labels.
DECODING = {"best_of_n": "best-of-N (N sweep)", "args": "ARGS (w sweep)", "genarm": "GenARM decoding (α sweep)"}


def _curves(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
  curves: dict[str, list[Mapping]] = {}
  for r in rows:
    curves.setdefault(r["method"], []).append(r)
  for pts in curves.values():
    pts.sort(key=lambda r: r["kl"])
  return curves


def plot_frontier(rows: Sequence[Mapping], path: str, *, title: str = "Reward vs KL(π ‖ π_SFT)") -> str:
  """Writes a PNG of reward against KL, one curve per ``method``; returns ``path``.

  Args:
    rows: result rows with ``method``, ``kl``, ``kl_se``, ``reward``, ``reward_se``
      (and ``label``); the ``sft`` row is drawn as a single marker.
    path: the PNG file to write.
    title: the plot title.
  """
  if not rows:
    raise ValueError("plot_frontier: `rows` is empty; nothing to plot.")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
  colors = [c for j, c in enumerate(plt.get_cmap("tab10").colors) if j != 7] + ["#000080", "#808000"]  # no grey
  markers = "osD^vPX<>h"
  curves = _curves(rows)
  order = [m for m in sorted(curves) if m not in ("sft", "dera")] + [m for m in ("dera", "sft") if m in curves]
  for i, method in enumerate(order):
    pts = curves[method]
    x = [p["kl"] for p in pts]
    y = [p["reward"] for p in pts]
    xe = [_num(p.get("kl_se")) for p in pts]
    ye = [_num(p.get("reward_se")) for p in pts]
    if method == "sft":
      ax.errorbar(x, y, yerr=ye, fmt="*", ms=15, color="black", label="SFT (reference)", zorder=5)
      continue
    if method == "dera":
      style = dict(fmt="--x", color="0.35", label="DeRa (λ sweep)")
    elif method in DECODING:   # decoding-time alignment of the SFT model: dashed
      style = dict(fmt="--" + markers[i % len(markers)], color=colors[i % len(colors)], label=DECODING[method])
    else:
      style = dict(fmt="-" + markers[i % len(markers)], color=colors[i % len(colors)], label=method)
    ax.errorbar(x, y, xerr=xe, yerr=ye, ms=5, lw=1.3, capsize=2, elinewidth=0.8, **style)
  ax.set_xlabel("sequence KL(π ‖ π_SFT) (nats, from samples)")
  ax.set_ylabel("mean gold reward of samples")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: covers no curve
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)
  return path


def _num(v) -> float:
  return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def markdown_table(rows: Iterable[Mapping]) -> str:
  """A Markdown table: method, hyper-parameters, reward ± s.e., KL ± s.e., mean length."""
  return stages.markdown_table(rows, labels=("method", "setting"))
