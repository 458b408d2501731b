"""`treepo bench service`: what HTTP + the Redis queue cost over calling the sampler directly, and the
throughput with 1, 4 and 16 concurrent clients. Ratios measured in one run, on one machine."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import typer

from treepo.client.schema import SamplingParams, TreeParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Workload:
    num_prompts: int
    tree: TreeParams
    sampling: SamplingParams
    repeats: int

    def texts(self, round_index: int) -> list[str]:
        """Fresh arithmetic prompts per round: no round finds an earlier one in the prefix cache."""
        return [
            f"{10 + (round_index * 37 + i) % 90}+{10 + (i * 13) % 90}-{round_index % 10}="
            for i in range(self.num_prompts)
        ]


@dataclass(slots=True)
class Timed:
    seconds: float
    cpu_s: float  # CPU time of this process (engine, server thread, client): robust to other load
    decoded_tokens: int  # equal on both sides of a pair when both sampled the same trees


class _Clock:
    """Wall and process CPU time since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self, decoded_tokens: int) -> Timed:
        return Timed(time.perf_counter() - self.wall, time.process_time() - self.cpu, decoded_tokens)


@dataclass(slots=True)
class BenchResult:
    engine: str
    workload: dict[str, Any]
    pairs: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"queue": [], "inline": []})
    throughput: list[dict[str, float]] = field(default_factory=list)

    def add_pair(self, mode: str, direct: Timed, service: Timed) -> None:
        self.pairs[mode].append(
            {
                "direct_s": direct.seconds,
                "service_s": service.seconds,
                "direct_cpu_s": direct.cpu_s,
                "service_cpu_s": service.cpu_s,
                "direct_tokens": direct.decoded_tokens,
                "service_tokens": service.decoded_tokens,
            }
        )

    def summary(self) -> dict[str, Any]:
        """Per mode: medians, and the median of the per-pair ratios (pairs sampled the same trees)."""
        out: dict[str, Any] = {}
        for mode, pairs in self.pairs.items():
            out[f"{mode}_direct_median_s"] = statistics.median(p["direct_s"] for p in pairs)
            out[f"{mode}_service_median_s"] = statistics.median(p["service_s"] for p in pairs)
            out[f"{mode}_overhead"] = statistics.median(p["service_s"] / p["direct_s"] for p in pairs) - 1
            out[f"{mode}_cpu_overhead"] = (
                statistics.median(p["service_cpu_s"] / p["direct_cpu_s"] for p in pairs) - 1
            )
            out[f"{mode}_same_trees"] = all(p["direct_tokens"] == p["service_tokens"] for p in pairs)
        return out


async def _direct(sampler: Any, codec: Any, workload: Workload, texts: list[str]) -> Timed:
    """The same trees with no HTTP and no Redis: one sample() per prompt over a batching engine."""
    seed = workload.sampling.seed or 0
    clock = _Clock()
    trees = await asyncio.gather(
        *(
            sampler.sample(
                codec.encode(text), workload.tree, workload.sampling, seed=seed + i, prompt_text=text
            )
            for i, text in enumerate(texts)
        )
    )
    return clock.stop(sum(tree.stats.decoded_tokens for tree in trees))


def _via_queue(client: Any, redis: Any, stream: str, workload: Workload, texts: list[str]) -> Timed:
    """POST delivery=queue, then wait until every tree is readable from the stream (XREAD)."""
    last = redis.xrevrange(stream, count=1)
    cursor = last[0][0] if last else "0-0"
    clock = _Clock()
    accepted = client.rollout_tree(texts, tree=workload.tree, sampling=workload.sampling, delivery="queue")
    missing, decoded = set(accepted.tree_ids), 0
    while missing:
        for _, entries in redis.xread({stream: cursor}, block=1000) or []:
            for entry_id, fields in entries:
                cursor = entry_id
                tree = json.loads(fields["tree"])
                if tree["tree_id"] in missing:
                    missing.discard(tree["tree_id"])
                    decoded += tree["stats"]["decoded_tokens"]
    return clock.stop(decoded)


def _via_inline(client: Any, workload: Workload, texts: list[str]) -> Timed:
    clock = _Clock()
    answer = client.rollout_tree(texts, tree=workload.tree, sampling=workload.sampling)
    return clock.stop(sum(tree.stats.decoded_tokens for tree in answer.trees))


async def _throughput(url: str, workload: Workload, num_clients: int, metrics: Any) -> dict[str, float]:
    """`num_clients` clients, each sending its share of `num_prompts` one-prompt requests back to back."""
    from treepo.client import AsyncTreePOClient

    calls_before, tokens_before = _engine_counters(metrics)
    per_client = max(1, workload.num_prompts // num_clients)

    async def one_client(index: int) -> int:
        leaves = 0
        async with AsyncTreePOClient(url) as client:
            for k in range(per_client):
                text = f"{10 + (index * 7 + k) % 90}*{num_clients}="
                answer = await client.rollout_tree([text], tree=workload.tree, sampling=workload.sampling)
                leaves += sum(len(tree.leaves) for tree in answer.trees)
        return leaves

    started = time.perf_counter()
    leaves = sum(await asyncio.gather(*(one_client(i) for i in range(num_clients))))
    wall = time.perf_counter() - started
    calls, tokens = _engine_counters(metrics)
    num_trees = per_client * num_clients
    return {
        "clients": num_clients,
        "trees": num_trees,
        "wall_s": wall,
        "trees_per_s": num_trees / wall,
        "trajectories_per_s": leaves / wall,
        "decoded_tokens_per_s": (tokens - tokens_before) / wall,
        "engine_requests": calls - calls_before,
    }


def _engine_counters(metrics: Any) -> tuple[float, float]:
    names = ("treepo_engine_calls_total", "treepo_decoded_tokens_total")
    calls, tokens = (metrics.registry.get_sample_value(name) or 0.0 for name in names)
    return calls, tokens


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bench(settings: Any, workload: Workload) -> BenchResult:
    """Pairs of (sampler direct, service) on the same prompts and seeds, then the concurrency sweep."""
    import redis as redis_sync

    from treepo.client import TreePOClient
    from treepo.service.app import create_app
    from treepo.service.factory import build_engine
    from treepo.service.sampler import TreeSampler
    from treepo.service.server import BackgroundServer

    engine, codec = build_engine(settings)  # the direct side's own engine: both sides start cold
    sampler = TreeSampler(engine, codec.decode)
    app = create_app(settings)
    shape = {
        "num_prompts": workload.num_prompts,
        "repeats": workload.repeats,
        "tree": workload.tree.model_dump(mode="json"),
    }
    result = BenchResult(settings.engine, shape)
    with BackgroundServer(app, port=settings.port) as server, TreePOClient(server.url) as client:
        redis = redis_sync.Redis.from_url(settings.redis_url, decode_responses=True)
        _wait_ready(client)
        services = {
            "queue": lambda texts: _via_queue(client, redis, f"{settings.key_prefix}:trees", workload, texts),
            "inline": lambda texts: _via_inline(client, workload, texts),
        }
        asyncio.run(_direct(sampler, codec, workload, workload.texts(999)))  # warm-up, both sides
        services["inline"](workload.texts(998))
        for r in range(workload.repeats):
            for k, (mode, via_service) in enumerate(services.items()):
                texts = workload.texts(2 * r + k)
                if r % 2:  # alternate which side goes first: load drift cancels out
                    service_side = via_service(texts)
                    direct = asyncio.run(_direct(sampler, codec, workload, texts))
                else:
                    direct = asyncio.run(_direct(sampler, codec, workload, texts))
                    service_side = via_service(texts)
                result.add_pair(mode, direct, service_side)
        for num_clients in (1, 4, 16):
            result.throughput.append(
                asyncio.run(_throughput(server.url, workload, num_clients, app.state.metrics))
            )
        _cleanup(redis, settings.key_prefix)
    return result


def _wait_ready(client: Any, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while (health := client.health())["status_code"] != 200:
        if health.get("engine") == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not become ready: {health}")
        time.sleep(0.1)


def _cleanup(redis: Any, prefix: str) -> None:
    keys = list(redis.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        redis.delete(*keys)
    redis.close()


def bench_service(
    engine: Annotated[str, typer.Option(help="embedded | scripted | sglang.")] = "embedded",
    model: Annotated[
        str | None, typer.Option(help="Local HF model dir (default: the shipped tiny model).")
    ] = None,
    prompts: Annotated[int, typer.Option(min=1, help="Prompts per round (trees per request).")] = 16,
    width: Annotated[int, typer.Option(min=1)] = 8,
    branch: Annotated[int, typer.Option(min=1)] = 2,
    segment_tokens: Annotated[int, typer.Option(min=1)] = 16,
    max_depth: Annotated[int, typer.Option(min=1)] = 4,
    repeats: Annotated[int, typer.Option(min=1, help="Pairs per service path (medians of ratios).")] = 5,
    scripted_latency_s: Annotated[
        float, typer.Option(min=0, help="Per-call latency of the scripted engine.")
    ] = 0.02,
    redis_url: Annotated[str, typer.Option(help="Redis to use (a private key prefix, deleted after).")] = (
        "redis://127.0.0.1:6379/0"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """HTTP + queue overhead against the sampler called directly, and throughput for 1, 4, 16 clients."""
    from treepo.service.config import Settings

    if engine not in ("embedded", "scripted", "sglang"):
        raise typer.BadParameter(f"unknown engine {engine!r}; expected embedded, scripted or sglang")
    settings = Settings(
        engine=engine,
        model_path=model,
        redis_url=redis_url,
        port=_free_port(),
        key_prefix=f"treepo-bench-{_free_port()}",
        scripted_latency_s=scripted_latency_s,
        max_queue_depth=10**9,
    )
    tree = TreeParams(width=width, branch=branch, segment_tokens=segment_tokens, max_depth=max_depth)
    workload = Workload(prompts, tree, SamplingParams(seed=0), repeats)
    result = run_bench(settings, workload)
    if as_json:
        typer.echo(json.dumps({**asdict(result), "summary": result.summary()}, indent=2))
    else:
        _print_table(result)


def _print_table(result: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = result.summary()
    title = (
        f"treepo bench service ({result.engine} engine, {result.workload['num_prompts']} prompts per request)"
    )
    table = Table(title=title)
    for column in ("service path", "direct median s", "service median s", "wall overhead", "CPU overhead"):
        table.add_column(column)
    table.add_column("same trees")
    for mode, label in (("queue", "HTTP + Redis queue"), ("inline", "HTTP inline")):
        table.add_row(
            label,
            f"{summary[f'{mode}_direct_median_s']:.3f}",
            f"{summary[f'{mode}_service_median_s']:.3f}",
            f"{summary[f'{mode}_overhead']:+.1%}",
            f"{summary[f'{mode}_cpu_overhead']:+.1%}",
            str(summary[f"{mode}_same_trees"]),
        )
    sweep = Table(title="throughput (one-prompt inline requests, back to back per client)")
    for column in ("clients", "trees/s", "trajectories/s", "decoded tokens/s", "engine requests"):
        sweep.add_column(column)
    for row in result.throughput:
        sweep.add_row(
            str(row["clients"]),
            f"{row['trees_per_s']:.2f}",
            f"{row['trajectories_per_s']:.1f}",
            f"{row['decoded_tokens_per_s']:.0f}",
            f"{row['engine_requests']:.0f}",
        )
    console = Console()
    console.print(table)
    console.print(sweep)
