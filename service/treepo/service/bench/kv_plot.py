"""`treepo bench sampling --plot`: where the KV held by the running rows goes, forward step by step.

A peak ratio alone hides when the peak happens and what holds it; the per-step trace shows both: each
run's KV (locked cached prefixes + the rows' own tokens) and its running rows over the run.
"""

from __future__ import annotations

from pathlib import Path

import typer

from treepo.service.bench.sampling_run import RunStats

LABELS = {"sync": "tree (sync)", "async": "tree (async)", "sequential": "sequential"}
COLORS = {"sync": "tab:green", "async": "tab:olive", "sequential": "tab:blue"}


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise typer.BadParameter(
            "--plot needs matplotlib: pip install 'treepo-service[plot]' (make setup installs it)"
        ) from exc
    matplotlib.use("Agg")  # headless: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def check_target(path: Path) -> None:
    """Fail before a long benchmark, not after it: the file's folder, its format and matplotlib must be there."""
    if path.is_dir() or not path.parent.is_dir():
        raise typer.BadParameter(f"--plot {path}: give a file in an existing directory ({path.parent})")
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise typer.BadParameter(
            f"--plot {path}: name it .png (or {', '.join(f'.{f}' for f in sorted(formats))})"
        )


def plot_kv_trace(runs: dict[str, RunStats], bytes_per_token: int, path: Path, title: str) -> Path:
    """Left: KV held per forward step (solid), of which locked prefixes (dotted). Right: running rows."""
    plt = pyplot()
    mib = bytes_per_token / 2**20
    fig, (held, rows) = plt.subplots(1, 2, figsize=(12, 4.2))
    for mode in ("sequential", "sync", "async"):
        run = runs.get(mode)
        if run is None or not run.kv_trace:
            continue
        steps = range(1, len(run.kv_trace) + 1)
        total = [(locked + owned) * mib for _, locked, owned in run.kv_trace]
        peak = max(total)
        label = f"{LABELS[mode]}: peak {peak:.1f} MiB at step {total.index(peak) + 1} of {len(total)}"
        held.plot(steps, total, color=COLORS[mode], label=label)
        held.plot(steps, [locked * mib for _, locked, _ in run.kv_trace], color=COLORS[mode], linestyle=":")
        rows.plot(steps, [count for count, _, _ in run.kv_trace], color=COLORS[mode], label=LABELS[mode])
    held.set(
        xlabel="forward step", ylabel="MiB", title="KV held by the running rows (dotted: locked prefixes)"
    )
    rows.set(xlabel="forward step", ylabel="rows", title="running rows")
    for axis in (held, rows):
        axis.grid(alpha=0.3)
        axis.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
