"""PNG plots for evaluation reports: per-family VQA accuracy and training curves.

Built on matplotlib's `Figure` directly (no pyplot), so nothing touches global backend
state and plotting works headless and from any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def plot_family_accuracy(
    by_family: dict[str, float | None],
    path: str | Path,
    title: str = "VQA accuracy by question family",
    target: float | None = None,
) -> Path:
    """Bar chart of accuracy per family; unmeasured families (None) are labelled n/a."""
    names = list(by_family)
    values = [by_family[n] for n in names]
    fig = Figure(figsize=(1.2 * max(4, len(names)) + 1, 3.6), dpi=110)
    ax = fig.add_subplot()
    heights = [100 * v if v is not None else 0.0 for v in values]
    bars = ax.bar(names, heights, color="#4c72b0")
    for bar, v in zip(bars, values, strict=True):
        label = "n/a" if v is None else f"{100 * v:.1f}"
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    if target is not None:
        ax.axhline(100 * target, color="#c44e52", linestyle="--", linewidth=1, label="target")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average; the first points average what there is so far."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_training_curves(
    history: Sequence[dict], path: str | Path, title: str = "training", window: int = 0
) -> Path:
    """Training losses (smoothed) and evaluation metrics against the step.

    `history` is `TrainResult.history`: {"kind": "train", "step", "lr", "loss", ...parts}
    and {"kind": "eval", "step", ...metrics}. A part logged on only some steps (one task
    per step in multi-task training) is drawn over the steps where it was logged.
    """
    train = [h for h in history if h.get("kind") == "train"]
    evals = [h for h in history if h.get("kind") == "eval"]
    fig = Figure(figsize=(10, 3.8), dpi=110)
    ax_loss, ax_eval = fig.subplots(1, 2)
    window = window or max(1, len(train) // 50)
    for key in _keys(train, skip=("kind", "step", "lr")):
        pts = [(h["step"], h[key]) for h in train if key in h]
        steps, vals = zip(*pts, strict=True)
        ax_loss.plot(steps, _smooth(vals, window), label=key, linewidth=1.2)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"loss (moving mean of {window})")
    if all(h[k] > 0 for h in train for k in _keys([h], skip=("kind", "step", "lr"))):
        ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7)
    ax_loss.set_title(f"{title}: losses", fontsize=10)
    for key in _keys(evals, skip=("kind", "step")):
        pts = [(h["step"], h[key]) for h in evals if key in h]
        steps, vals = zip(*pts, strict=True)
        ax_eval.plot(steps, vals, marker="o", markersize=3, label=key, linewidth=1.2)
    ax_eval.set_xlabel("step")
    ax_eval.set_title(f"{title}: validation", fontsize=10)
    if evals:
        ax_eval.legend(fontsize=7)
    else:
        ax_eval.text(0.5, 0.5, "no evaluations", ha="center", va="center")
    return _save(fig, path)


def _keys(rows: Sequence[dict], skip: tuple[str, ...]) -> list[str]:
    """Numeric keys in first-seen order."""
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in skip and isinstance(v, int | float) and np.isfinite(v):
                keys[k] = None
    return list(keys)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
