"""`treepo bench sampling`: tree vs sequential sampling on the same prompts, model and engine, in one process.

Prints one JSON object (`--json`) or rich tables: the default shape for both schedules, then a table of
depth x segment shapes (equal budget d*l) with TrajPS and TokenPS ratios, like the paper's Figures 4-5.
Regimes: `throughput` offers many more paths than the engine's running-row cap (rows freed by shared
prefixes and early stops are refilled by other trees' paths: what a busy GPU sees); `latency` gives the
engine room for every row at once. `--engine sglang` runs the same on a real SGLang server (sampling_sglang.py;
its own scheduler caps rows), keeping the median run of each mode instead of the fastest: a sequential
run's wall time varies several-fold as its rows overflow SGLang's KV budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from treepo.client.schema import SamplingParams, TreeParams
from treepo.service.bench.sampling_run import RunStats, ratios, run_mode

logger = logging.getLogger(__name__)

MODES = ("sequential", "sync", "async")
ENGINES = ("embedded", "sglang")
REGIMES = ("throughput", "latency")
# `--model random-25m`: a compute-bound stand-in (random init, the shipped tokenizer), ~25 M parameters
RANDOM_25M_SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1600,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
RUN_KEYS = (
    "trajectories", "decoded_tokens", "prefill_tokens", "cached_tokens", "wall_s", "cpu_s", "traj_per_s",
    "tokens_per_s", "peak_concurrent_sequences", "peak_running_rows", "peak_kv_tokens", "peak_kv_bytes",
    "engine_calls", "forward_passes",
)  # fmt: skip


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4x16,8x8' -> [(4, 16), (8, 8)] as (depth, segment)."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            depth, segment = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise typer.BadParameter(f"shape {part!r} is not DEPTHxSEGMENT, e.g. 4x16") from None
        if depth < 1 or segment < 1:
            raise typer.BadParameter(f"shape {part!r} needs depth >= 1 and segment >= 1")
        shapes.append((depth, segment))
    return shapes


def bench_sampling(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    model: Annotated[
        str,
        typer.Option(
            help="Local HF model dir; 'random' = random-init tiny shape; 'random-25m' = random-init ~25 M "
            "Qwen2 with the shipped tokenizer (compute-bound on CPU)."
        ),
    ] = "",
    regime: Annotated[
        str,
        typer.Option(help="throughput: prompts x width >> --max-running-rows; latency: all rows at once."),
    ] = "throughput",
    prompts: Annotated[
        int | None, typer.Option(min=1, help="Prompts sampled concurrently [128 throughput, 32 latency].")
    ] = None,
    max_running_rows: Annotated[
        int, typer.Option(min=1, help="Engine running-row cap in the throughput regime.")
    ] = 256,
    width: Annotated[int, typer.Option(min=1, help="w: trajectories per prompt.")] = 16,
    segment: Annotated[int, typer.Option(min=1, help="l: tokens per segment (default shape).")] = 16,
    depth: Annotated[int, typer.Option(min=1, help="d: segments per trajectory (default shape).")] = 4,
    shapes: Annotated[
        str, typer.Option(help="DEPTHxSEGMENT list for the table ('' = none).")
    ] = "4x16,8x8,16x4",
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the samples (prompts are fixed).")] = 0,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per measurement; the fastest is kept.")] = 2,
    device: Annotated[str, typer.Option(help="torch device of the embedded engine.")] = "cpu",
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0 = torch default).")] = 1,
    engine: Annotated[str, typer.Option(help="embedded | sglang (a real SGLang server).")] = "embedded",
    sglang_url: Annotated[
        str | None,
        typer.Option(help="SGLang server serving --model; default: launch the pinned one (make sglang-env)."),
    ] = None,
    max_kv_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-kv-tokens",
            "--max-total-tokens",  # SGLang's name for it
            min=64,
            help="KV token budget: of the embedded engine [room for every running row at its longest, so the "
            "row cap binds] or of the SGLang server launched here [16384].",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Draw the default shape's KV held and running rows per forward step (tree sync / async / "
            "sequential, the runs kept) to this image, e.g. kv.png (embedded engine)."
        ),
    ] = None,
) -> None:
    """Tree vs sequential sampling: trajectories/s, tokens/s, decoded tokens, prefix cache, peak KV."""
    import torch

    if regime not in REGIMES:
        raise typer.BadParameter(f"unknown regime {regime!r}; expected one of {', '.join(REGIMES)}")
    if engine not in ENGINES:
        raise typer.BadParameter(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if plot is not None:  # before the runs, not after them
        from treepo.service.bench.kv_plot import check_target

        if engine != "embedded":
            raise typer.BadParameter(
                "--plot draws the embedded engine's per-step KV; SGLang does not report it"
            )
        check_target(plot)
    if threads:
        torch.set_num_threads(threads)
    table = parse_shapes(shapes)
    prompts = prompts or (128 if regime == "throughput" else 32)
    rows = max_running_rows if regime == "throughput" else prompts * width
    with tempfile.TemporaryDirectory() as tmp:
        model_path = _resolve_model(model, Path(tmp), seed)
        longest = segment * depth if not table else max(segment * depth, *(d * s for d, s in table))
        if engine == "sglang":
            from treepo.service.bench.sampling_sglang import sglang_engine

            with sglang_engine(model_path, sglang_url, max_kv_tokens or 16384) as (server, info):
                bench = _Bench.load(model_path, prompts, width, longest, device, rows, sglang=server)
                bench.temperature, bench.seed, bench.repeats, bench.median = temperature, seed, repeats, True
                with _progress(bench, table, depth, segment):
                    result = asyncio.run(bench.measure(depth, segment, table, close=True))
            result["config"].update(info, engine="sglang", pick="median")
        else:
            bench = _Bench.load(model_path, prompts, width, longest, device, rows, kv_tokens=max_kv_tokens)
            bench.temperature, bench.seed, bench.repeats = temperature, seed, repeats
            with _progress(bench, table, depth, segment):
                result = asyncio.run(bench.measure(depth, segment, table))
        parameters = _parameters(model_path)
    result["config"].update(
        model=model or "tiny-arith (shipped)", regime=regime, max_running_rows=rows, parameters=parameters,
        prompts=prompts, width=width, segment=segment, depth=depth, max_kv_tokens=bench.kv_tokens,
        temperature=temperature, seed=seed, device=device, repeats=repeats, threads=torch.get_num_threads(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
    )  # fmt: skip
    if plot is not None:
        from treepo.service.bench.kv_plot import plot_kv_trace

        budget = f", KV budget {max_kv_tokens:,} tokens" if max_kv_tokens else ""
        title = (
            f"{model or 'tiny-arith'}, {regime} regime: {prompts} prompts x w={width} on {rows} rows{budget}, "
            f"{depth}x{segment}"
        )
        plot_kv_trace(bench.kept, bench.kv_bytes_per_token, plot, title)
    if json_output:
        print(json.dumps(result, indent=2))
    else:
        _print_tables(result)


@contextmanager
def _progress(bench: _Bench, table: list[tuple[int, int]], depth: int, segment: int) -> Iterator[None]:
    """A bar on stderr (stdout may carry --json), one tick per run; nothing left of it when done."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    shapes = {(depth, segment), *table}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("sampling runs", total=len(shapes) * len(MODES) * bench.repeats)
        bench.on_run = lambda label: progress.update(task, advance=1, description=f"done: {label}")
        yield


@dataclass(slots=True)
class _Bench:
    """One engine and prompt set; every run starts from a cold prefix cache."""

    engine: Any  # EmbeddedEngine or SGLangEngine (imported lazily)
    decode: Callable[[list[int]], str]
    prompt_ids: list[list[int]]
    width: int
    kv_bytes_per_token: int
    kv_tokens: int | None  # the embedded engine's KV token budget
    temperature: float = 1.0
    seed: int = 0
    repeats: int = 3
    median: bool = False  # keep the median run of each mode, not the fastest
    kept: dict[str, RunStats] = field(default_factory=dict)  # the default shape's kept run of each mode
    on_run: Callable[[str], None] = lambda label: None  # after each measured run (the progress bar)

    @classmethod
    def load(
        cls, model_path: Path, num_prompts: int, width: int, longest: int, device: str, rows: int, *,
        kv_tokens: int | None = None, sglang: Any = None,
    ) -> _Bench:  # fmt: skip
        """An engine with `rows` running rows and `kv_tokens` of KV (default: room for all of them at their
        longest), or `sglang`."""
        from transformers import AutoTokenizer

        from treepo.service.codec import decoder
        from treepo.service.engine.embedded import EmbeddedEngine
        from treepo.service.task import generate_problems

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        prompt_ids = [tokenizer.encode(p.prompt) for p in generate_problems("test", num_prompts, seed=0)]
        if sglang is not None:
            from treepo.service.bench.sampling_sglang import kv_bytes_per_token

            engine, kv_bytes = sglang, kv_bytes_per_token(model_path)  # its budget: in `config`
        else:
            request = max(map(len, prompt_ids)) + longest
            if kv_tokens is not None and kv_tokens < request:
                raise typer.BadParameter(
                    f"--max-kv-tokens {kv_tokens} cannot hold one trajectory (prompt + {longest} tokens = "
                    f"{request}); raise it to at least {request}"
                )
            kv_tokens = kv_tokens or rows * request
            engine = EmbeddedEngine(model_path, device=device, max_kv_tokens=kv_tokens, max_running_rows=rows)
            kv_bytes = engine.pool.shape.bytes_per_token

        return cls(
            engine, decoder(tokenizer, skip_special_tokens=True), prompt_ids, width, kv_bytes, kv_tokens
        )

    async def run(self, depth: int, segment: int, mode: str, num_prompts: int | None = None) -> RunStats:
        schedule = "async" if mode == "async" else "sync"
        tree = TreeParams(width=self.width, segment_tokens=segment, max_depth=depth, schedule=schedule)
        sampling = SamplingParams(temperature=self.temperature)
        return await run_mode(
            self.engine, self.decode, self.prompt_ids[:num_prompts], tree, sampling,
            sequential=mode == "sequential", seed=self.seed, kv_bytes_per_token=self.kv_bytes_per_token,
        )  # fmt: skip

    async def best(self, depth: int, segment: int) -> dict[str, RunStats]:
        """Each mode `repeats` times, interleaved; the fastest run of each (the machine may be shared), or
        the median one on SGLang (whose sequential runs vary with KV pressure)."""
        runs: dict[str, list[RunStats]] = {mode: [] for mode in MODES}
        for _ in range(self.repeats):
            for mode in MODES:
                runs[mode].append(await self.run(depth, segment, mode))
                self.on_run(f"{depth}x{segment} {mode}")
        return {
            mode: sorted(done, key=lambda r: r.wall_s)[(len(done) - 1) // 2 if self.median else 0]
            for mode, done in runs.items()
        }

    async def measure(
        self, depth: int, segment: int, table: list[tuple[int, int]], close: bool = False
    ) -> dict[str, Any]:
        try:
            return await self._measure(depth, segment, table)
        finally:
            if close:  # an HTTP engine's client lives in this event loop
                await self.engine.aclose()

    async def _measure(self, depth: int, segment: int, table: list[tuple[int, int]]) -> dict[str, Any]:
        await self.run(depth, segment, "sync", num_prompts=4)  # warm-up (allocator, kernels, lazy pool)
        default = self.kept = await self.best(depth, segment)
        rows = []
        for d, s in table:
            runs = default if (d, s) == (depth, segment) else await self.best(d, s)
            for schedule in ("sync", "async"):
                tree, sequential = runs[schedule], runs["sequential"]
                rows.append({"depth": d, "segment": s, "schedule": schedule, **ratios(tree, sequential),
                             "tree_forward_passes": tree.forward_passes,
                             "sequential_forward_passes": sequential.forward_passes,
                             "tree_peak_kv_bytes": tree.peak_kv_bytes,
                             "sequential_peak_kv_bytes": sequential.peak_kv_bytes,
                             "tree_peak_running_rows": tree.peak_running_rows,
                             "sequential_peak_running_rows": sequential.peak_running_rows})  # fmt: skip
        return {
            "config": {"kv_bytes_per_token": self.kv_bytes_per_token},
            "tree": default["sync"].to_dict(),
            "sequential": default["sequential"].to_dict(),
            "tree_async": default["async"].to_dict(),
            "ratios": ratios(default["sync"], default["sequential"]),
            "ratios_async": ratios(default["async"], default["sequential"]),
            "shapes": rows,
        }


def _parameters(model_path: Path) -> int:
    """Parameters in the checkpoint's safetensors files (tied tensors once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = tensors.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def _resolve_model(model: str, tmp: Path, seed: int) -> Path:
    """The shipped tiny model by default; 'random' / 'random-25m' build a random-init model in `tmp`."""
    from transformers import AutoTokenizer

    from treepo.service.tinymodel import build_model, build_tokenizer, default_model_path

    if model == "random-25m":
        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
        build_model(tokenizer, seed, RANDOM_25M_SHAPE).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return tmp
    if model == "random":
        from treepo.service.task import generate_problems

        corpus = [p.prompt + p.solution for p in generate_problems("train", 200, seed=seed)]
        tokenizer = build_tokenizer(corpus)
        build_model(tokenizer, seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return tmp
    path = Path(model) if model else default_model_path()
    if not (path / "config.json").is_file():
        raise typer.BadParameter(
            f"no model at {path}; train one with `treepo init-model`, pass --model PATH, --model random "
            "or --model random-25m"
        )
    return path


def _print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"config: {result['config']}")
    runs = Table(title="default shape")
    keys = RUN_KEYS
    runs.add_column("run")
    for key in keys:
        runs.add_column(key, justify="right")
    for name in ("sequential", "tree", "tree_async"):
        runs.add_row(name, *(_fmt(result[name][key]) for key in keys))
    console.print(runs)
    console.print(f"ratios tree/sequential: {_fmt_dict(result['ratios'])}")
    console.print(f"ratios async tree/sequential: {_fmt_dict(result['ratios_async'])}")
    shapes = Table(title="shapes (tree / sequential)")
    columns = ("depth x segment", "schedule", "TrajPS", "TokenPS", "decoded", "efficiency", "Traj/CPU-s")
    for column in (*columns, "forward passes", "peak KV", "KV x steps"):
        shapes.add_column(column, justify="right")
    keys = ("traj_per_s", "tokens_per_s", "decoded_tokens", "efficiency", "traj_per_cpu_s", "forward_passes",
            "peak_kv_bytes", "kv_token_steps")  # fmt: skip
    for row in result["shapes"]:
        shapes.add_row(f"{row['depth']}x{row['segment']}", row["schedule"], *(_fmt(row[k]) for k in keys))
    console.print(shapes)


def _fmt(value: float | int) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _fmt_dict(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in values.items())
