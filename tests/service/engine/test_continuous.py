"""ContinuousEngine (one request per call) against transformers: greedy identity, eviction, cancellation."""

from __future__ import annotations

import asyncio

import pytest
import torch

from treepo.service.engine.continuous import ContinuousEngine
from treepo.service.engine.protocol import EngineRequestError, GenerateRequest

EOS = 1
PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18], [19]]


def greedy(input_ids: list[int], max_new_tokens: int = 12) -> GenerateRequest:
    return GenerateRequest(input_ids=input_ids, max_new_tokens=max_new_tokens, temperature=0.0)


def hf_greedy(model, input_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([input_ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return out[0, len(input_ids) :].tolist()


async def run_all(engine: ContinuousEngine, requests: list[GenerateRequest]):
    return await asyncio.gather(*[engine.generate(r) for r in requests])


async def test_greedy_matches_transformers_cold_and_warm(tiny_model_path, reference_model):
    engine = ContinuousEngine(tiny_model_path, max_kv_tokens=4096)
    expected = [hf_greedy(reference_model, p, 12) for p in PROMPTS]
    for cached in ([0, 0, 0, 0], [len(p) - 1 for p in PROMPTS]):
        outs = await run_all(engine, [greedy(p) for p in PROMPTS])
        assert [o.output_ids for o in outs] == expected
        assert [o.cached_tokens for o in outs] == cached
    engine.close()


async def test_eviction_under_a_tiny_budget_leaks_no_slot(tiny_model_path, reference_model):
    engine = ContinuousEngine(tiny_model_path, max_kv_tokens=24)
    outs = await run_all(engine, [greedy(p, 10) for p in PROMPTS])
    assert [o.output_ids for o in outs] == [hf_greedy(reference_model, p, 10) for p in PROMPTS]
    assert engine.radix.total_size + engine.pool.num_free == 24 and engine.radix.protected_size == 0
    engine.close()


async def test_cancel_aborts_the_row_and_releases_its_locks(tiny_model_path):
    engine = ContinuousEngine(tiny_model_path, eos_token_ids=())  # no early stop: still running when cancelled
    task = asyncio.create_task(engine.generate(GenerateRequest([5, 6], 400, temperature=1.0, seed=1)))
    while not engine.scheduler.running:
        assert not task.done(), "the request ended before it could be cancelled"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while engine.scheduler.running:
        await asyncio.sleep(0.01)
    assert engine.radix.protected_size == 0 and engine.blocks.num_reserved == 0
    assert engine.counters.decoded_tokens == 0
    engine.close()


async def test_an_invalid_request_fails_alone(tiny_model_path, reference_model):
    engine = ContinuousEngine(tiny_model_path)
    good = engine.generate(greedy(PROMPTS[0], 6))
    bad = engine.generate(GenerateRequest([3, 4], 4, top_p=0.0))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert results[0].output_ids == hf_greedy(reference_model, PROMPTS[0], 6)
    assert isinstance(results[1], EngineRequestError)
    engine.close()


async def test_a_request_joining_mid_decode_matches_transformers(tiny_model_path, reference_model):
    engine = ContinuousEngine(tiny_model_path, eos_token_ids=())
    first = asyncio.create_task(engine.generate(greedy(PROMPTS[0], 60)))
    while engine.num_forward_passes < 3:
        await asyncio.sleep(0.001)
    assert not first.done()
    second = await engine.generate(greedy(PROMPTS[2], 8))
    assert not first.done()  # the joiner finished while the first row kept decoding
    assert second.output_ids == hf_greedy(reference_model, PROMPTS[2], 8)
    assert (await first).output_ids == reference_model.generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=60, min_new_tokens=60, do_sample=False, pad_token_id=0
    )[0, len(PROMPTS[0]) :].tolist()
    engine.close()
