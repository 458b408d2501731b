"""PNG plots of a run: reward/accuracy curves and the sampling cost of the tree vs independent sampling."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_run(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    evals: Sequence[tuple[int, float]] = (),
    title: str = "TreePO training",
) -> Path:
    """Left: train accuracy per step (all sampled trees, and those kept), held-out points. Right: tokens."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    unfiltered = [r.get("accuracy_unfiltered", r.get("accuracy", 0.0)) for r in records]
    left.plot(steps, unfiltered, label="train accuracy (all sampled trees)")
    kept = [r.get("accuracy", 0.0) for r in records]
    left.plot(steps, kept, label="train accuracy (kept by dynamic sampling)", alpha=0.4)
    if evals:
        xs, ys = [s for s, _ in evals], [a for _, a in evals]
        left.plot(xs, ys, "o-", color="black", label="held-out accuracy")
    left.set(xlabel="step", ylabel="share", ylim=(0, 1.02), title="accuracy")
    left.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    decoded = list(itertools.accumulate(r.get("decoded_tokens", 0) for r in records))
    independent = list(itertools.accumulate(r.get("independent_tokens", 0) for r in records))
    right.plot(steps, independent, label="independent sampling would decode", linestyle="--")
    right.plot(steps, decoded, label="tree sampler decoded")
    if independent and independent[-1]:
        saved = 1 - decoded[-1] / independent[-1]
        right.set_title(f"sampling cost (tokens saved by the tree: {saved:.0%})")
    else:
        right.set_title("sampling cost")
    right.set(xlabel="step", ylabel="cumulative decoded tokens")
    right.grid(alpha=0.3)
    right.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    budgets: tuple[float, float] | None = None,
    title: str = "treepo bench train: held-out accuracy",
) -> Path:
    """Held-out accuracy against training wall seconds (left) and cumulative decoded tokens (right), one
    line per variant (`treepo bench train`); `budgets` (seconds, tokens) marks where all variants compare."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("train_s", "training wall time (s, evaluations excluded)"),
        ("decoded_tokens", "decoded tokens"),
    )
    for i, (ax, (key, label)) in enumerate(zip(axes, panels, strict=True)):
        for name, points in curves.items():
            ax.plot([p[key] for p in points], [p["accuracy"] for p in points], "o-", label=name)
        if budgets is not None:
            ax.axvline(budgets[i], color="gray", linestyle="--", linewidth=1, label="equal budget")
        ax.set(xlabel=label, ylabel="held-out accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_title("at equal wall time")
    axes[1].set_title("at equal decoded tokens")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
