"""Measurement for `treepo bench sampling`: tree vs sequential sampling of the same prompts on one engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from treepo.client.schema import SamplingParams, Tree, TreeParams
from treepo.service.engine.batcher import BatchingEngine, BatchRecord
from treepo.service.engine.protocol import Engine
from treepo.service.sampler.tree import TreeSampler


@dataclass(slots=True)
class RunStats:
    """Totals of one run over all prompts."""

    trajectories: int
    decoded_tokens: int
    independent_tokens: int
    prefill_tokens: int
    cached_tokens: int
    engine_calls: int
    wall_s: float
    cpu_s: float  # process CPU time (all threads): steadier than wall time on a shared machine
    peak_concurrent_sequences: int
    peak_kv_tokens: int
    peak_kv_bytes: int

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
            **asdict(self),
            "traj_per_s": self.traj_per_s,
            "tokens_per_s": self.tokens_per_s,
            "traj_per_cpu_s": self.traj_per_cpu_s,
        }


def trie_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """Distinct prefixes of `sequences` = the KV tokens a prefix-sharing cache holds for them."""
    ordered = sorted(tuple(s) for s in sequences)
    total, previous = 0, ()
    for seq in ordered:
        common = 0
        for a, b in zip(previous, seq, strict=False):
            if a != b:
                break
            common += 1
        total += len(seq) - common
        previous = seq
    return total


class PeakTracker:
    """Listens to engine batches: the largest batch, and the largest KV footprint of one batch."""

    def __init__(self) -> None:
        self.peak_sequences = 0
        self.peak_kv_tokens = 0

    def __call__(self, record: BatchRecord) -> None:
        self.peak_sequences = max(self.peak_sequences, record.size)
        sequences = [
            list(r.input_ids) + list(o.output_ids)
            for r, o in zip(record.requests, record.outputs, strict=True)
        ]
        self.peak_kv_tokens = max(self.peak_kv_tokens, trie_tokens(sequences))


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
    """All prompts concurrently through one BatchingEngine, from a cold prefix cache."""
    flush = getattr(engine, "flush_cache", None)
    if flush is not None:
        flush()
    batching = BatchingEngine(engine)
    peaks = PeakTracker()
    batching.add_listener(peaks)
    sampler = TreeSampler(batching, decode)
    method = sampler.sample_sequential if sequential else sampler.sample
    started, cpu_started = time.perf_counter(), time.process_time()
    trees: list[Tree] = await asyncio.gather(
        *(method(ids, tree, sampling, seed=seed + i) for i, ids in enumerate(prompts))
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return RunStats(
        trajectories=sum(len(t.leaves) for t in trees),
        decoded_tokens=sum(t.stats.decoded_tokens for t in trees),
        independent_tokens=sum(t.stats.independent_tokens for t in trees),
        prefill_tokens=sum(t.stats.prefill_tokens for t in trees),
        cached_tokens=sum(t.stats.cached_tokens for t in trees),
        engine_calls=batching.num_batches,
        wall_s=wall,
        cpu_s=cpu,
        peak_concurrent_sequences=peaks.peak_sequences,
        peak_kv_tokens=peaks.peak_kv_tokens,
        peak_kv_bytes=peaks.peak_kv_tokens * kv_bytes_per_token,
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
    }
