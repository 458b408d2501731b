"""BatchingEngine: concurrent callers share inner calls; a failure fails exactly its callers.

(Lives beside the sampler tests: the sampler is the batcher's main user.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from sampler_helpers import no_eos

from treepo.service.engine.batcher import BatchingEngine, BatchRecord
from treepo.service.engine.protocol import Engine, GenerateOutput, GenerateRequest
from treepo.service.engine.scripted import ScriptedEngine

POISON = 99


class PoisonEngine(ScriptedEngine):
    """Raises on any batch holding a request whose input contains POISON."""

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        outputs = await super().generate(requests)
        if any(POISON in r.input_ids for r in requests):
            raise RuntimeError("poisoned batch")
        return outputs


def req(*ids: int) -> GenerateRequest:
    return GenerateRequest(input_ids=list(ids), max_new_tokens=3, seed=1)


async def test_same_tick_callers_share_one_inner_call() -> None:
    inner = ScriptedEngine(no_eos())
    engine = BatchingEngine(inner)
    results = await asyncio.gather(*(engine.generate([req(k), req(k, 1)]) for k in range(5)))
    assert inner.batch_sizes == [10]
    assert [len(r) for r in results] == [2] * 5
    alone = [(await inner.generate([req(k)]))[0].output_ids for k in range(5)]
    assert [r[0].output_ids for r in results] == alone  # each caller gets its own outputs


async def test_callers_arriving_while_busy_go_together_next() -> None:
    inner = ScriptedEngine(no_eos(), latency_s=0.05)
    engine = BatchingEngine(inner)
    first = asyncio.create_task(engine.generate([req(1)]))
    await asyncio.sleep(0.01)  # the first call is running now
    later = [asyncio.create_task(engine.generate([req(k)])) for k in range(2, 5)]
    await asyncio.gather(first, *later)
    assert inner.batch_sizes == [1, 3]


async def test_max_batch_size_splits_and_tracks_batch_ids() -> None:
    inner = ScriptedEngine(no_eos())
    engine = BatchingEngine(inner, max_batch_size=3)
    a, b = await asyncio.gather(
        engine.generate_tracked([req(k) for k in range(4)]), engine.generate_tracked([req(9), req(8)])
    )
    assert inner.batch_sizes == [3, 3]
    assert a[1] == (0, 1) and b[1] == (1,)
    assert engine.num_batches == 2 and engine.num_requests == 6 and engine.max_batch_seen == 3


async def test_failure_fails_exactly_the_callers_of_that_batch() -> None:
    inner = PoisonEngine(no_eos(), latency_s=0.02)
    engine = BatchingEngine(inner)
    good_first = asyncio.create_task(engine.generate([req(1)]))
    await asyncio.sleep(0.005)
    bad = asyncio.create_task(engine.generate([req(POISON)]))
    same_batch = asyncio.create_task(engine.generate([req(2)]))
    results = await asyncio.gather(good_first, bad, same_batch, return_exceptions=True)
    assert isinstance(results[0], list)
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)
    assert len(await engine.generate([req(3)])) == 1  # the batcher keeps working


async def test_split_caller_failing_in_a_later_batch_fails_once() -> None:
    inner = PoisonEngine(no_eos())
    engine = BatchingEngine(inner, max_batch_size=2)
    mixed = asyncio.create_task(engine.generate([req(1), req(2), req(POISON), req(4)]))
    other = asyncio.create_task(engine.generate([req(5)]))
    results = await asyncio.gather(mixed, other, return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], list)  # went in the third batch, after the failure
    assert inner.batch_sizes == [2, 2, 1]


async def test_cancelled_caller_is_skipped() -> None:
    inner = ScriptedEngine(no_eos(), latency_s=0.02)
    engine = BatchingEngine(inner)
    first = asyncio.create_task(engine.generate([req(1)]))
    await asyncio.sleep(0.005)
    doomed = asyncio.create_task(engine.generate([req(2), req(3)]))
    kept = asyncio.create_task(engine.generate([req(4)]))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.gather(first, kept)
    assert inner.batch_sizes == [1, 1]


async def test_listeners_and_forwarding() -> None:
    inner = ScriptedEngine(no_eos(), eos_token_id=3, max_context=77)
    engine = BatchingEngine(inner)
    records: list[BatchRecord] = []
    engine.add_listener(records.append)
    engine.add_listener(lambda record: 1 / 0)  # a broken listener never breaks generation
    await engine.generate([req(1), req(2)])
    assert [(r.batch_id, r.size, r.num_callers) for r in records] == [(0, 2, 1)]
    assert records[0].seconds >= 0 and len(records[0].outputs) == 2
    assert (engine.eos_token_ids, engine.max_context, engine.policy_version) == ((3,), 77, 0)
    await engine.update_weights("/w", 4)
    assert engine.policy_version == 4 and engine.weights_path == "/w"  # other attributes: the inner's
    assert await engine.health() and isinstance(engine, Engine)
    assert await engine.generate([]) == []


def test_bad_max_batch_size() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        BatchingEngine(ScriptedEngine(), max_batch_size=0)
