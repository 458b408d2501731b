"""SGLangEngine against the real server: logprobs, prefix cache, limits, abort, warm-ups, seeds."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from sglang_wire import PROMPT
from transformers import AutoModelForCausalLM

from treepo.service.engine.protocol import GenerateRequest, generate_all
from treepo.service.engine.sglang import SGLangEngine


def metric(url: str, prefix: str) -> float:
    """Sum of the samples of `url`/metrics whose line starts with `prefix` (SGLang runs --enable-metrics)."""
    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


@pytest.fixture
async def engine(sglang, model_path):
    engine = SGLangEngine([sglang.url], model_path=model_path, timeout_s=120)
    engine.read_server_limits()
    yield engine
    await engine.aclose()


@pytest.fixture(scope="module")
def hf_model(model_path):
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_logprobs_equal_a_transformers_forward(engine, hf_model, temperature) -> None:
    """Logprobs of the unmodified distribution (SGLANG_RETURN_ORIGINAL_LOGPROB=1), also at T != 1."""
    requests = [GenerateRequest(PROMPT, 24, temperature=temperature, seed=s) for s in range(4)]
    outputs = await generate_all(engine, requests)
    for output in outputs:
        assert len(output.output_ids) == len(output.logprobs) > 0
        ids = torch.tensor([PROMPT + output.output_ids])
        with torch.no_grad():
            logits = hf_model(ids).logits[0, len(PROMPT) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(output.output_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(output.logprobs), expected, atol=1e-4, rtol=0), (
            (torch.tensor(output.logprobs) - expected).abs().max()
        )


async def test_siblings_and_next_segments_hit_the_cache(engine) -> None:
    """cached_tokens as SGLang reports them: copies sent together share one warm-up, children reuse parents."""
    prompt = [*PROMPT, 18, 21, 12]  # not yet in the cache of the shared server
    siblings = await generate_all(engine, [GenerateRequest(prompt, 8, seed=s) for s in range(4)])
    assert all(output.cached_tokens >= len(prompt) - 1 for output in siblings)
    assert sum(output.prefill_tokens for output in siblings) <= len(prompt)  # the prompt prefilled once
    parent = siblings[0]
    child = await engine.generate(GenerateRequest(prompt + parent.output_ids, 8))
    assert child.cached_tokens >= len(prompt) + len(parent.output_ids) - 2


async def test_paths_end_before_the_context(engine) -> None:
    """The limits come from /get_server_info: input < max_req_input_len (506), so max_context is 506."""
    assert engine.max_context == 506
    near = [5] * (engine.max_context - 3)
    output = await engine.generate(GenerateRequest(near, 50, temperature=0.0))
    assert output.finish_reason == "length" and len(output.output_ids) == 3
    last = await engine.generate(GenerateRequest([5] * (engine.max_context - 1), 50))
    assert len(last.output_ids) == 1  # one more token is the most the server accepts


async def test_cancel_aborts_the_request_on_the_server(engine, sglang) -> None:
    """Cancelling a call aborts its SGLang request, not only the HTTP wait (SGLang counts the abort)."""
    aborted = await asyncio.to_thread(metric, sglang.url, "sglang:num_aborted_requests_total")
    long = GenerateRequest([21] * 60, 440, temperature=0.0)  # greedy from here: no EOS for 440 tokens
    for _ in range(5):  # a quiet server may finish a request before the poll sees it running: send another
        task = asyncio.ensure_future(engine.generate(long))
        active = 'sglang:http_requests_active{endpoint="/generate"'
        while not task.done() and await asyncio.to_thread(metric, sglang.url, active) < 1:
            await asyncio.sleep(0.01)
        if not task.done():
            break
    else:
        pytest.fail("every request finished before it could be cancelled")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while await asyncio.to_thread(metric, sglang.url, "sglang:num_aborted_requests_total") == aborted:
        await asyncio.sleep(0.05)
    assert engine.num_aborted == 1


async def test_a_warmup_next_to_generating_requests(engine) -> None:
    """Prefill-only warm-ups (no tokens) sent while other requests decode fail nothing."""
    busy = [GenerateRequest([*PROMPT, 7 + k], 32, temperature=1.0) for k in range(3)]
    fan_out = [GenerateRequest([*PROMPT, 19, 19], 6, seed=s) for s in range(3)]
    outputs = await generate_all(engine, busy + fan_out)
    assert [len(o.output_ids) > 0 for o in outputs] == [True] * 6
    assert engine.num_warmup_requests >= 1


async def test_seeds_fit_every_version(engine, sglang) -> None:
    """Seeds >= 2^31 overflow SGLang 0.5.4; the engine folds them into 31 bits."""
    output = await engine.generate(GenerateRequest(PROMPT, 2, seed=2**62 + 5))
    assert len(output.output_ids) == 2


async def test_a_load_finished_after_a_refused_flush(launch, model_path) -> None:
    """When SGLang loaded a push but refused its own cache flush (requests queued: another replica's), the
    engine flushes and then records the version without aborting requests: those calls, on a real worker."""
    worker = launch()  # its own: the version it reports changes
    engine = SGLangEngine([worker.url], model_path=model_path, timeout_s=120)
    try:
        await engine.generate(GenerateRequest([5, 6, 7, 8], 2))
        await engine.admin._flush_after_load(worker.url, 7)
        info = (await engine._request("GET", worker.url + "/get_model_info")).json()
        again = await engine.generate(GenerateRequest([5, 6, 7, 8], 2))
    finally:
        await engine.aclose()
    assert info["weight_version"] == "7"
    assert again.cached_tokens == 0  # the cache was flushed
