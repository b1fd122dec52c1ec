"""Figures of an evaluation: accuracy versus average cost, the exit distribution, and the
per-exit reliability diagrams (calibration of the exits' confidences).

Matplotlib with the Agg backend (no screen needed); every function writes a PNG
and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curve(path: str | Path, curves: dict[str, Sequence[tuple[float, float]]],
               points: dict[str, tuple[float, float]], title: str = "") -> Path:
    """Accuracy (%) against average cost fraction: lines for ``curves``, markers for ``points``.

    Both take ``(avg_cost, accuracy)`` pairs with accuracy in [0, 1]; the legend names each.
    Markers are drawn over the curves, each over the points listed after it (eenet-eval
    lists the chosen point first: with a guarantee, the certified point, then the
    uncorrected search's for the same level).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, pts in curves.items():
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, [100 * y for y in ys], marker=".", markersize=3, linewidth=1.2, label=label)
    markers = iter(["*", "o", "s", "D", "^", "v"])
    for k, (label, (x, y)) in enumerate(points.items()):
        # the first points on top: a certified point that coincides with the uncorrected
        # search's (or the chosen point with the final exit's) stays visible
        ax.plot([x], [100 * y], linestyle="none", marker=next(markers), markersize=9, label=label,
                zorder=3 + len(points) - k)
    ax.set_xlabel("average cost fraction (fvcore MACs / plain backbone)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, ax, path, title)


def plot_exit_distribution(path: str | Path, rates: dict[str, Sequence[float]],
                           exit_names: Sequence[str], title: str = "") -> Path:
    """Grouped bars: the share of samples leaving at each exit, per split or setting."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    n = len(rates)
    width = 0.8 / max(n, 1)
    for k, (label, r) in enumerate(rates.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(exit_names))]
        bars = ax.bar(xs, [100 * v for v in r], width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(exit_names)), exit_names)
    ax.set_ylabel("samples leaving (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    return _finish(fig, ax, path, title)


def _finish(fig, ax, path: str | Path, title: str) -> Path:
    """Title, layout, save at 120 dpi, close; the saved path."""
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(path: str | Path, diagrams: dict[str, Sequence[dict]],
                     exit_names: Sequence[str], title: str = "") -> Path:
    """Reliability diagrams (Guo et al., ICML 2017, Fig. 1): one panel per exit, accuracy per
    confidence bin as bars, the diagonal where accuracy equals confidence.

    ``diagrams`` maps a label (e.g. ``before``, ``after``) to one dict per exit as
    :func:`eenet.calibration.temperature.reliability_bins` returns it (``edges``,
    ``accuracy`` with ``None`` for empty bins, ``ece``).
    """
    n = len(exit_names)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows), squeeze=False,
                             sharex=True, sharey=True)
    k = len(diagrams)
    for i, name in enumerate(exit_names):
        ax = axes[i // cols][i % cols]
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        for j, (label, per_exit) in enumerate(diagrams.items()):
            d = per_exit[i]
            edges = d["edges"]
            width = (edges[1] - edges[0]) / k
            xs = [edges[m] + (j + 0.5) * width for m, a in enumerate(d["accuracy"]) if a is not None]
            ys = [a for a in d["accuracy"] if a is not None]
            ax.bar(xs, ys, width=width, alpha=0.75, label=f"{label} (ECE {100 * d['ece']:.2f}%)")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, loc="upper left")
        ax.grid(True, alpha=0.3)
    for i in range(n, rows * cols):  # panels left over in the last row
        axes[i // cols][i % cols].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("confidence (max softmax)", fontsize=8)
    for row in axes:
        row[0].set_ylabel("accuracy", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, axes[0][0], path, "")
