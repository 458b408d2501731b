"""Rich progress display of `treepo demo`: step, reward, accuracy and tokens saved by the tree."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class DemoProgress:
    """Receives the demo's events (`on_event(kind, payload)`) and renders them."""

    def __init__(self, console: Console, steps: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self.task = self.progress.add_task("train", total=steps, status="")
        self.decoded = self.independent = 0

    def __enter__(self) -> DemoProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "redis":
            self.console.print(f"Redis: {payload['url']} ({_redis_origin(payload['origin'])})")
        elif kind == "service":
            self.console.print(
                f"service: {payload['url']} (embedded engine, tiny model; log {payload['log']})"
            )
        elif kind == "eval":
            self.console.print(
                f"held-out accuracy {payload['when']} training: {payload['accuracy']:.3f} "
                f"({payload['wall_s']:.1f}s)"
            )
        elif kind == "step":
            self._step(payload)

    def _step(self, record: dict[str, Any]) -> None:
        self.decoded += record["decoded_tokens"]
        self.independent += record["independent_tokens"]
        saved = 1 - self.decoded / max(1, self.independent)
        accuracy = record.get("accuracy_unfiltered", record["accuracy"])
        status = f"train acc {accuracy:.2f}  tokens saved by the tree {saved:.0%}"
        self.progress.update(self.task, completed=record["step"], status=status)

    def report(self, result) -> None:
        s = result.summary
        table = Table(title=f"TreePO demo: {result.run_dir}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("held-out accuracy before", f"{s['accuracy_before']:.3f}")
        table.add_row("held-out accuracy after", f"{s['accuracy_after']:.3f}")
        table.add_row("gain (points)", f"{100 * s['accuracy_gain']:+.1f}")
        table.add_row("steps", str(s["steps"]))
        table.add_row("tokens decoded (tree)", f"{s['tokens_decoded_tree']:,}")
        table.add_row("tokens independent sampling", f"{s['tokens_independent']:,}")
        table.add_row("tokens saved", f"{s['tokens_saved_fraction']:.1%}")
        table.add_row("wall time", f"{s['wall_s']:.0f} s (training {s['train_wall_s']:.0f} s)")
        self.console.print(table)


def _redis_origin(origin: str) -> str:
    return {
        "REDIS_URL": "from REDIS_URL",
        "local": "the local server",
        "private": "a private redis-server started for this run",
    }.get(origin, origin)
