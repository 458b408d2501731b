"""The `treepo` command line: one entry point for the service, the trainer, the demo and the benchmarks.

Heavy imports (torch, transformers) stay inside the commands so `treepo --help` is instant.
"""

from __future__ import annotations

import typer

from treepo.service.bench.engine import bench_engine
from treepo.service.bench.load import bench_load
from treepo.service.bench.sampling import bench_sampling
from treepo.service.bench.service import bench_service
from treepo.service.serve import serve
from treepo.service.tinymodel import init_model

app = typer.Typer(
    help="TreePO rollout-as-a-service.", no_args_is_help=True, pretty_exceptions_show_locals=False
)
bench = typer.Typer(
    help="Benchmarks (ratios measured in one run; print JSON with --json).", no_args_is_help=True
)
app.add_typer(bench, name="bench")

# Each command lives beside the code it drives and is registered here.
# (registrations are appended below as the pieces land)
app.command("init-model")(init_model)
bench.command("sampling")(bench_sampling)
app.command("serve")(serve)
bench.command("service")(bench_service)
bench.command("load")(bench_load)
bench.command("engine")(bench_engine)
try:  # the trainer's commands, when treepo-trainer is installed beside the service
    from treepo.trainer.cli import bench_train, demo, train
except ImportError:  # pragma: no cover - service-only installs
    pass
else:
    app.command("train")(train)
    app.command("demo")(demo)
    bench.command("train")(bench_train)
