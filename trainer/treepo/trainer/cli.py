"""The trainer's commands: `treepo train`, `treepo demo` and `treepo bench train`.

`train` exposes every TrainConfig field as an option of the same name (its help text included), built
from the dataclass so the two never drift apart. Heavy imports stay inside the command bodies.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from treepo.trainer.config import TrainConfig

DEMO_STEPS = 120  # keep equal to treepo.trainer.demo.DEMO_STEPS (not imported: it pulls in torch)

_EXTRA = {"resume": "Continue from the newest checkpoint under --output-dir (model, optimizer, step, queue)."}


def _option_type(annotation: Any) -> Any:
    """Typer knows neither Literal nor `X | None`: map them to str and Optional[X]."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return typing.Optional[_option_type(inner[0])]  # noqa: UP045 (typer needs the typing form)
    return annotation


def _train_signature() -> inspect.Signature:
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        option = typer.Option(help=f.metadata.get("help", ""))
        annotation = Annotated[_option_type(hints[f.name]), option]
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )
    resume = Annotated[bool, typer.Option(help=_EXTRA["resume"])]
    params.append(
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=resume)
    )
    return inspect.Signature(params)


def train(**options: Any) -> None:
    """Train a policy on trees pulled from the service's Redis stream (TreePO advantages, DAPO loss)."""
    import logging

    from treepo.trainer.loop import build_run

    resume = options.pop("resume")
    try:
        config = TrainConfig(**options)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = build_run(config, resume=resume)
    console = _console()
    console.print(f"training {config.steps} steps from step {run.state.step}; logs in {config.output_dir}")
    run.run(on_step=lambda r: console.print(_step_line(r)))


train.__signature__ = _train_signature()  # type: ignore[attr-defined]


def demo(
    steps: Annotated[
        int, typer.Option(help="Training steps (default sized for well under 10 minutes on 2 cores).")
    ] = DEMO_STEPS,
    seed: Annotated[int, typer.Option(help="Seed of the problems, the sampling and the trainer.")] = 0,
    output_dir: Annotated[Path, typer.Option(help="Runs land in <output-dir>/<name>/.")] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Run name (default demo-seed<S>-<time>).")] = None,
    eval_problems: Annotated[int, typer.Option(help="Held-out test problems.")] = 128,
    eval_samples: Annotated[int, typer.Option(help="Samples per held-out problem.")] = 4,
    eval_every: Annotated[
        int, typer.Option(help="Also measure held-out accuracy every N steps (0: only before and after).")
    ] = 0,
    lr: Annotated[float | None, typer.Option(help="Override the demo's learning rate.")] = None,
    width: Annotated[int | None, typer.Option(help="Override the tree width w.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Local HF model dir (default: the shipped tiny model).")
    ] = None,
    deterministic: Annotated[
        bool,
        typer.Option(help="Lockstep schedule: the same --seed reproduces the run (off: sampling overlaps)."),
    ] = True,
) -> None:
    """Redis + service (embedded engine, tiny model) + trainer: watch held-out accuracy rise."""
    from treepo.trainer.demo import DemoOptions, run_demo
    from treepo.trainer.progress import DemoProgress

    _exit_on_sigterm()
    overrides = {k: v for k, v in {"lr": lr, "width": width}.items() if v is not None}
    overrides["deterministic"] = deterministic
    try:
        options = DemoOptions(
            steps, seed, output_dir, name, eval_problems, eval_samples, model, overrides, eval_every
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    with DemoProgress(_console(), steps) as progress:
        result = run_demo(options, on_event=progress.on_event)
    progress.report(result)


def _exit_on_sigterm() -> None:
    """`kill` ends a run as Ctrl-C does: its `finally` blocks stop the service and delete its Redis keys
    (without this a SIGTERM left the run's keys in a shared Redis)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def bench_train(
    steps: Annotated[int, typer.Option(help="Training steps per variant.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed shared by all variants.")] = 0,
    output_dir: Annotated[Path, typer.Option(help="Runs land in <output-dir>/bench-train-<time>/.")] = Path(
        "runs"
    ),
    eval_problems: Annotated[int, typer.Option(help="Held-out test problems.")] = 128,
    eval_every: Annotated[
        int,
        typer.Option(
            help="Measure held-out accuracy every N steps: the curves of comparison.png and the accuracy at "
            "equal wall time and equal decoded tokens (0: only before and after)."
        ),
    ] = 10,
    variants: Annotated[
        str, typer.Option(help="Comma list of grpo-seq, grpo-tree, treepo.")
    ] = "grpo-seq,grpo-tree,treepo",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    model: Annotated[
        str | None, typer.Option(help="Local HF model dir (default: the shipped tiny model).")
    ] = None,
) -> None:
    """GRPO + sequential sampling vs GRPO + trees vs TreePO: held-out accuracy (also at equal wall time and
    equal decoded tokens) and sampling cost."""
    from treepo.trainer.bench import VARIANTS, run_bench

    _exit_on_sigterm()
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"unknown variants {unknown}; expected a comma list of {', '.join(VARIANTS)}"
        )
    if eval_every < 0:
        raise typer.BadParameter(f"eval_every must be >= 0 (got {eval_every})")
    result = run_bench(
        chosen,
        steps=steps,
        seed=seed,
        output_dir=output_dir,
        eval_problems=eval_problems,
        model_path=model,
        eval_every=eval_every,
    )
    if as_json:
        typer.echo(json.dumps(result))
        return
    from treepo.trainer.bench import render_table

    _console().print(render_table(result))


def _console():
    from rich.console import Console

    return Console()


def _step_line(record: dict[str, Any]) -> str:
    saved = 1 - record["decoded_tokens"] / max(1, record["independent_tokens"])
    return (
        f"step {record['step']:4d}  reward {record['reward_mean']:+.3f}  acc {record['accuracy']:.3f}  "
        f"loss {record['loss']:+.4f}  saved {saved:.0%}  {record['step_s']:.1f}s"
    )
