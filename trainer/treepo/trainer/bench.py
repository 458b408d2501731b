"""`treepo bench train`: the paper's Table 1 at toy scale.

Three variants on the same task, seed, model and step budget, each with a fresh service:
GRPO advantages + sequential sampling, GRPO advantages + tree sampling, and TreePO (trees + tree
advantages). Reported: held-out accuracy before/after, decoded tokens, and wall time; with `eval_every`,
held-out curves against training seconds and decoded tokens (`comparison.png`), and each variant's
accuracy at the budget every variant reached (equal wall time, equal decoded tokens).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from treepo.trainer.demo import DemoOptions, run_demo
from treepo.trainer.plots import plot_comparison

VARIANTS: dict[str, dict[str, str]] = {
    "grpo-seq": {"advantage": "grpo", "sampling_mode": "sequential"},
    "grpo-tree": {"advantage": "grpo", "sampling_mode": "tree"},
    "treepo": {"advantage": "treepo", "sampling_mode": "tree"},
}


def run_bench(
    variants: list[str],
    *,
    steps: int,
    seed: int,
    output_dir: Path,
    eval_problems: int = 128,
    model_path: str | None = None,
    eval_every: int = 0,
) -> dict[str, Any]:
    """Run each variant in turn (one at a time: they would fight over the CPU) and collect summaries."""
    root = Path(output_dir) / f"bench-train-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for variant in variants:
        options = DemoOptions(
            steps=steps,
            seed=seed,
            output_dir=root,
            name=variant,
            eval_problems=eval_problems,
            model_path=model_path,
            overrides=dict(VARIANTS[variant]),
            eval_every=eval_every,
        )
        summary = run_demo(options).summary
        results[variant] = {
            key: summary[key]
            for key in (
                "accuracy_before",
                "accuracy_after",
                "accuracy_gain",
                "tokens_decoded_tree",
                "tokens_independent",
                "tokens_saved_fraction",
                "train_wall_s",
                "wall_s",
                "steps",
                "trees_consumed",
                "filtered_prompts",
                "curve",
            )
        }
    budgets = add_equal_budget_accuracy(results)
    curves = {name: r["curve"] for name, r in results.items()}
    png = plot_comparison(curves, root / "comparison.png", budgets=budgets)
    return {
        "steps": steps,
        "seed": seed,
        "eval_every": eval_every,
        "runs_dir": str(root),
        "comparison_png": str(png),
        "equal_train_s": budgets[0],
        "equal_decoded_tokens": budgets[1],
        "variants": results,
    }


def accuracy_at(curve: Sequence[Mapping[str, Any]], key: str, budget: float) -> float:
    """Held-out accuracy at `budget` of `key` (train_s or decoded_tokens), linear between held-out points
    (clamped to the first and last: a budget is never past the end of the run it is read from)."""
    xs, ys = [p[key] for p in curve], [p["accuracy"] for p in curve]
    if budget <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if budget <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
    return ys[-1]


def add_equal_budget_accuracy(results: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """Adds each variant's accuracy at the smallest final train seconds and decoded tokens over variants
    (what all of them reached); returns those two budgets."""
    wall = min(r["curve"][-1]["train_s"] for r in results.values())
    tokens = min(r["curve"][-1]["decoded_tokens"] for r in results.values())
    for r in results.values():
        r["accuracy_at_equal_train_s"] = accuracy_at(r["curve"], "train_s", wall)
        r["accuracy_at_equal_tokens"] = accuracy_at(r["curve"], "decoded_tokens", tokens)
    return wall, tokens


def render_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"treepo bench train ({result['steps']} steps, seed {result['seed']})",
        caption=f"held-out curves: {result['comparison_png']}",
    )
    columns = (
        "variant",
        "acc before",
        "acc after",
        f"acc at {result['equal_train_s']:.0f} train s",
        f"acc at {result['equal_decoded_tokens']:,} tokens",
        "decoded tokens",
        "vs independent",
        "train wall s",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for name, r in result["variants"].items():
        table.add_row(
            name,
            f"{r['accuracy_before']:.3f}",
            f"{r['accuracy_after']:.3f}",
            f"{r['accuracy_at_equal_train_s']:.3f}",
            f"{r['accuracy_at_equal_tokens']:.3f}",
            f"{r['tokens_decoded_tree']:,}",
            f"{1 - r['tokens_saved_fraction']:.2f}x",
            f"{r['train_wall_s']:.0f}",
        )
    return table
