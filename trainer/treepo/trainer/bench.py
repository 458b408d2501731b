"""`treepo bench train`: the paper's Table 1 at toy scale.

Three variants on the same task, seed, model and step budget, each with a fresh service:
GRPO advantages + sequential sampling, GRPO advantages + tree sampling, and TreePO (trees + tree
advantages). Reported: held-out accuracy before/after, decoded tokens, and wall time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from treepo.trainer.demo import DemoOptions, run_demo

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
) -> dict[str, Any]:
    """Run each variant in turn (one at a time: they would fight over the CPU) and collect summaries."""
    root = Path(output_dir) / f"bench-train-{time.strftime('%Y%m%d-%H%M%S')}"
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
            )
        }
    return {"steps": steps, "seed": seed, "runs_dir": str(root), "variants": results}


def render_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"treepo bench train ({result['steps']} steps, seed {result['seed']})")
    for column in ("variant", "acc before", "acc after", "decoded tokens", "vs independent", "train wall s"):
        table.add_column(column, justify="right")
    for name, r in result["variants"].items():
        table.add_row(
            name,
            f"{r['accuracy_before']:.3f}",
            f"{r['accuracy_after']:.3f}",
            f"{r['tokens_decoded_tree']:,}",
            f"{1 - r['tokens_saved_fraction']:.2f}x",
            f"{r['train_wall_s']:.0f}",
        )
    return table
