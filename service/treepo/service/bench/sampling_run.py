"""Measurement for `treepo bench sampling`: tree vs sequential sampling of the same prompts on one engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from treepo.client.schema import SamplingParams, Tree, TreeParams
from treepo.service.engine.protocol import Engine, EngineWrapper, GenerateOutput, GenerateRequest
from treepo.service.sampler.tree import TreeSampler


@dataclass(slots=True)
class RunStats:
    """Totals of one run over all prompts."""

    trajectories: int
    decoded_tokens: int
    independent_tokens: int
    prefill_tokens: int
    cached_tokens: int
    engine_calls: int  # requests sent
    forward_passes: int  # engine model steps (embedded engine; 0 for others)
    wall_s: float
    cpu_s: float  # process CPU time (all threads): steadier than wall time on a shared machine
    peak_concurrent_sequences: int  # requests in flight at once (offered to the engine)
    peak_running_rows: int  # rows the engine ran in one step (what its row cap or KV budget let in)
    peak_kv_tokens: int
    peak_kv_bytes: int
    kv_token_steps: int  # KV slots held, summed over forward steps: the run's memory x time
    kv_trace: list[tuple[int, int, int]] = field(default_factory=list)  # per step: rows, locked, owned slots

    @property
    def traj_per_s(self) -> float:
        return self.trajectories / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.decoded_tokens / self.wall_s

    @property
    def traj_per_cpu_s(self) -> float:
        return self.trajectories / self.cpu_s

    def to_dict(self) -> dict:
        return {
            **{key: value for key, value in asdict(self).items() if key != "kv_trace"},  # drawn, not printed
            "traj_per_s": self.traj_per_s,
            "tokens_per_s": self.tokens_per_s,
            "traj_per_cpu_s": self.traj_per_cpu_s,
        }


class InFlightTracker(EngineWrapper):
    """Counts the engine requests in flight at once (the concurrency the engine was offered)."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner)
        self.in_flight = self.peak_in_flight = 0

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self.inner.generate(request)
        finally:
            self.in_flight -= 1


async def run_mode(
    engine: Engine,
    decode: Callable[[list[int]], str],
    prompts: Sequence[list[int]],
    tree: TreeParams,
    sampling: SamplingParams,
    *,
    sequential: bool,
    seed: int,
    kv_bytes_per_token: int,
) -> RunStats:
    """All prompts concurrently, every segment its own request, from a cold prefix cache.

    Peak KV is what the engine measured (embedded engine: slots its running rows held or locked at once),
    KV token-steps the same summed over forward steps, the KV trace the same step by step; 0 / empty for
    engines that do not report them.
    """
    flush = getattr(engine, "flush_cache", None)
    if flush is not None:
        flushed = flush()
        if asyncio.iscoroutine(flushed):  # SGLang: an HTTP call to each worker
            await flushed
    reset = getattr(engine, "reset_peaks", None)
    if reset is not None:
        reset(trace=True)
    passes_before = int(getattr(engine, "num_forward_passes", 0))
    tracked = InFlightTracker(engine)
    sampler = TreeSampler(tracked, decode)
    method = sampler.sample_sequential if sequential else sampler.sample
    started, cpu_started = time.perf_counter(), time.process_time()
    trees: list[Tree] = await asyncio.gather(
        *(method(ids, tree, sampling, seed=seed + i) for i, ids in enumerate(prompts))
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak_kv_bytes = int(getattr(engine, "peak_kv_bytes", 0))
    return RunStats(
        trajectories=sum(len(t.leaves) for t in trees),
        decoded_tokens=sum(t.stats.decoded_tokens for t in trees),
        independent_tokens=sum(t.stats.independent_tokens for t in trees),
        prefill_tokens=sum(t.stats.prefill_tokens for t in trees),
        cached_tokens=sum(t.stats.cached_tokens for t in trees),
        engine_calls=sum(t.stats.engine_calls for t in trees),
        forward_passes=int(getattr(engine, "num_forward_passes", 0)) - passes_before,
        wall_s=wall,
        cpu_s=cpu,
        peak_concurrent_sequences=tracked.peak_in_flight,
        peak_running_rows=int(getattr(engine, "peak_running_rows", 0)),
        peak_kv_tokens=peak_kv_bytes // kv_bytes_per_token if kv_bytes_per_token else 0,
        peak_kv_bytes=peak_kv_bytes,
        kv_token_steps=int(getattr(engine, "kv_token_steps", 0)),
        kv_trace=list(getattr(engine, "kv_trace", ())),
    )


def ratios(tree: RunStats, sequential: RunStats) -> dict[str, float]:
    """tree / sequential; `efficiency` = TrajPS ratio x decoded-token ratio (1.0: saving = time)."""
    traj = tree.traj_per_s / sequential.traj_per_s
    decoded = tree.decoded_tokens / sequential.decoded_tokens
    return {
        "traj_per_s": traj,
        "tokens_per_s": tree.tokens_per_s / sequential.tokens_per_s,
        "decoded_tokens": decoded,
        "efficiency": traj * decoded,
        "traj_per_cpu_s": tree.traj_per_cpu_s / sequential.traj_per_cpu_s,
        "peak_kv_tokens": tree.peak_kv_tokens / max(sequential.peak_kv_tokens, 1),
        "peak_kv_bytes": tree.peak_kv_bytes / max(sequential.peak_kv_bytes, 1),
        "forward_passes": tree.forward_passes / max(sequential.forward_passes, 1),
        "kv_token_steps": tree.kv_token_steps / max(sequential.kv_token_steps, 1),
    }
