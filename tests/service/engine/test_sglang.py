"""SGLangEngine against a stand-in SGLang server under real uvicorn (no mocks of HTTP)."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import httpx
import pytest
from sglang_standin import ModelTokens, StandinState, script_tokens, serve

from treepo.service.engine.protocol import (
    Engine,
    EngineError,
    EngineRequestError,
    EngineUnavailable,
    GenerateRequest,
    generate_all,
)
from treepo.service.engine.sglang import SGLangEngine, WeightUpdateError
from treepo.service.engine.sglang_wire import parse_item

VOCAB = 40


def counting(input_ids: list[int], rng: random.Random) -> list[int]:
    """Next token = last token + 1 (skipping EOS 0): a resumed request continues the same sequence."""
    start = input_ids[-1]
    return [(start + k - 1) % (VOCAB - 1) + 1 for k in range(1, 200)]


def scripted_state(**kwargs) -> StandinState:
    return StandinState(tokens=script_tokens(counting), eos_token_ids=(0,), context_len=256, **kwargs)


def port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_for(urls, **kwargs) -> SGLangEngine:
    kwargs.setdefault("eos_token_ids", (0,))
    kwargs.setdefault("max_context", 256)
    return SGLangEngine(urls, timeout_s=30, **kwargs)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two random-initialised tiny Qwen2 checkpoints (policy v0 and v1), EOS 0, context 256."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, eos_token_id=0,
        )  # fmt: skip
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=[0], bos_token_id=1)
        path = tmp_path_factory.mktemp(f"tiny-v{seed}")
        model.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


def test_reads_eos_and_context_from_model_dir(model_dirs) -> None:
    engine = SGLangEngine("http://127.0.0.1:1/", model_path=model_dirs[0])
    assert engine.eos_token_ids == (0,)
    assert engine.max_context == 256
    assert engine.base_urls == ["http://127.0.0.1:1"]
    assert isinstance(engine, Engine)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_urls": []}, "at least one base URL"),
        ({"base_urls": "127.0.0.1:30000"}, "must start with http"),
        ({"base_urls": "http://x", "routing": "random"}, "Unknown routing 'random'"),
        ({"base_urls": "http://x", "eos_token_ids": ()}, "eos_token_ids"),
        ({"base_urls": "http://x", "eos_token_ids": None, "max_context": None}, "model_path"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message) -> None:
    kwargs = {"eos_token_ids": (0,), "max_context": 64} | kwargs
    with pytest.raises(ValueError, match=message):
        SGLangEngine(**kwargs)


async def test_one_request_per_call_logprobs_stop_ids_and_seed() -> None:
    state = scripted_state(weight_version="3")
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            outputs = await generate_all(
                engine,
                [
                    GenerateRequest([5], max_new_tokens=4, seed=7, temperature=0.7, top_p=0.9, top_k=5),
                    GenerateRequest([10, 11], max_new_tokens=8, stop_token_ids=(14,)),
                    GenerateRequest([38], max_new_tokens=8),  # 39 -> EOS 0 is skipped by the script
                ],
            )
    bodies = state.generate_bodies
    assert [body["input_ids"] for body in bodies] == [[5], [10, 11], [38]]  # each its own request
    body = bodies[0]
    assert body["return_logprob"] is True and body["logprob_start_len"] == -1 and body["stream"] is False
    assert len({body["rid"] for body in bodies}) == 3  # a rid each, for /abort_request
    first, second = bodies[0]["sampling_params"], bodies[1]["sampling_params"]
    assert first == {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "stop_token_ids": [],
                     "sampling_seed": 7}  # fmt: skip
    assert "sampling_seed" not in second and second["stop_token_ids"] == [14]
    assert [o.output_ids for o in outputs] == [[6, 7, 8, 9], [12, 13, 14], [39, 1, 2, 3, 4, 5, 6, 7]]
    assert [o.finish_reason for o in outputs] == ["length", "stop", "length"]
    assert outputs[1].logprobs == [-1.0 - (t % 7) / 7 for t in (12, 13, 14)]
    # nothing pushed yet: what the worker launched with ("3") is the engine's version 0
    assert all(o.policy_version == 0 for o in outputs) and engine.policy_version == 0


async def test_eos_stops_and_is_kept() -> None:
    def eos_after_two(input_ids, rng):
        return [3, 4, 0, 5]

    state = StandinState(tokens=script_tokens(eos_after_two), eos_token_ids=(0,))
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            (output,) = await generate_all(engine, [GenerateRequest([1, 2], max_new_tokens=10)])
    assert output.output_ids == [3, 4, 0] and output.finish_reason == "stop"


async def test_model_seeds_are_reproducible(model_dirs) -> None:
    state = StandinState(tokens=ModelTokens(str(model_dirs[0])), vocab_size=VOCAB, context_len=256)
    with serve(state, port()) as url:
        async with engine_for(url, prefill_first=False) as engine:
            prompt = [1, 2, 3, 4]
            runs = await generate_all(engine, [GenerateRequest(prompt, 12, seed=s) for s in (1, 1, 2, 3, 4)])
            greedy = await generate_all(engine, [GenerateRequest(prompt, 12, temperature=0.0)] * 2)
    assert runs[0].output_ids == runs[1].output_ids
    assert len({tuple(r.output_ids) for r in runs}) > 1  # other seeds give other samples
    assert greedy[0].output_ids == greedy[1].output_ids
    assert all(lp <= 0 for r in runs for lp in r.logprobs)


@pytest.mark.parametrize("prefill_first", [False, True])
async def test_prefill_first_shares_the_prompt_prefill(prefill_first: bool) -> None:
    state = scripted_state()
    prompt = list(range(1, 41))
    with serve(state, port()) as url:
        async with engine_for(url, prefill_first=prefill_first) as engine:
            copies = await generate_all(engine, [GenerateRequest(prompt, 5, seed=s) for s in range(4)])
            warmups = engine.num_warmup_requests
            children = await generate_all(engine, [GenerateRequest(prompt + copies[0].output_ids, 5)] * 2)
    prefill = sum(o.prefill_tokens for o in copies)
    cached = sum(o.cached_tokens for o in copies)
    if prefill_first:  # the prompt once, then one recomputed token per copy (SGLang caps at len - 1)
        assert (warmups, prefill, cached) == (1, 40 + 4, 4 * 39)
        assert copies[0].extra["warmup_prefill_tokens"] == 40
    else:  # no warm-up: each copy gets what the server happened to cache before it
        assert warmups == 0 and prefill + cached == 4 * 40
    assert engine.num_warmup_requests == warmups  # children of a finished path: already cached, no warm-up
    assert [o.cached_tokens for o in children] == [44, 44]
    assert prefill + cached == 4 * 40 + (40 if prefill_first else 0)


async def test_abort_is_resubmitted_with_the_tokens_so_far() -> None:
    state = scripted_state(abort_plan=[3])
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            (output,) = await generate_all(engine, [GenerateRequest([20], max_new_tokens=6, seed=1)])
    resumed = state.generate_bodies[1]
    assert resumed["input_ids"] == [20, 21, 22, 23]
    assert resumed["sampling_params"]["max_new_tokens"] == 3
    assert output.output_ids == [21, 22, 23, 24, 25, 26] and output.finish_reason == "length"
    assert len(output.logprobs) == 6 and output.extra["num_aborts"] == 1


async def test_abort_retries_are_bounded() -> None:
    state = scripted_state(abort_plan=[1, 1, 1])
    with serve(state, port()) as url:
        async with engine_for(url, max_abort_retries=2) as engine:
            with pytest.raises(EngineError, match=r"aborted a request .*3 times"):
                await generate_all(engine, [GenerateRequest([20], max_new_tokens=6)])


async def test_weight_update_with_pause_resumes_running_requests(model_dirs) -> None:
    state = StandinState(tokens=ModelTokens(str(model_dirs[0])), weight_version="0", token_delay_s=0.01)
    with serve(state, port()) as url:
        async with engine_for(url, pause_for_update=True) as engine:
            running = asyncio.create_task(engine.generate(GenerateRequest([1, 2], 60, temperature=0.0)))
            while not state.inflight:  # the update must catch the request running
                await asyncio.sleep(0.005)
            await engine.update_weights(str(model_dirs[1]), 1)
            output = await running
            (after,) = await generate_all(engine, [GenerateRequest([1, 2], 4)])
    assert state.tokens.model_path == str(model_dirs[1]) and not state.paused
    assert len(output.output_ids) == 60 or output.finish_reason == "stop"
    assert output.extra["num_aborts"] == 1
    assert output.policy_version == 0  # a segment that spans an update reports its oldest weights
    assert after.policy_version == 1 == engine.policy_version


async def test_weight_update_reaches_every_worker() -> None:
    states = [scripted_state(weight_version="0"), scripted_state(weight_version="0")]
    with serve(states[0], port()) as url_a, serve(states[1], port()) as url_b:
        async with engine_for([url_a, url_b], admin_api_key="adm") as engine:
            await generate_all(engine, [GenerateRequest([1, 2, 3], 4)])
            await engine.update_weights("/ckpt/step-5", 5)
            states[1].fail_weight_update = "shape mismatch in lm_head.weight"
            with pytest.raises(WeightUpdateError, match=f"1 of 2 SGLang workers: {url_b}.*shape mismatch"):
                await engine.update_weights("/ckpt/step-6", 6)
    for state in states:
        assert state.weight_updates[0] == {
            "model_path": "/ckpt/step-5",
            "weight_version": "5",
            "flush_cache": True,
        }
        assert state.prefix.match([1, 2, 3, 4]) == 0  # flushed
    assert engine.policy_version == 5


async def test_a_worker_that_cannot_be_reached_during_an_update_is_unavailable_not_invalid() -> None:
    state = scripted_state(weight_version="0")
    dead = f"http://127.0.0.1:{port()}"  # nothing listens there
    with serve(state, port()) as url:
        async with engine_for([url, dead]) as engine:
            with pytest.raises(EngineUnavailable, match="1 of 2 SGLang workers"):
                await engine.update_weights("/ckpt/step-1", 1)
    assert engine.policy_version == 0


async def test_admin_key_guards_weight_updates() -> None:
    state = scripted_state(api_key="user", admin_api_key="adm")
    with serve(state, port()) as url:
        async with engine_for(url, api_key="user") as engine:
            assert len(await generate_all(engine, [GenerateRequest([1], 2)])) == 1
            with pytest.raises(WeightUpdateError, match="HTTP 401"):
                await engine.update_weights("/ckpt", 1)
        async with engine_for(url, api_key="user", admin_api_key="adm") as engine:
            await engine.update_weights("/ckpt", 1)


async def test_prefix_routing_keeps_a_tree_on_one_worker() -> None:
    states = [scripted_state(), scripted_state()]
    with serve(states[0], port()) as url_a, serve(states[1], port()) as url_b:
        async with engine_for([url_a, url_b], affinity_tokens=4) as engine:
            prompts = [[p, p + 1, p + 2, p + 3] for p in range(1, 21)]
            await generate_all(engine, [GenerateRequest(p + [9] * k, 2) for p in prompts for k in range(3)])
        per_worker = [{tuple(body["input_ids"][:4]) for body in s.generate_bodies} for s in states]
        async with engine_for([url_a, url_b], routing="round_robin") as engine:
            outputs = await generate_all(engine, [GenerateRequest([7], 2)] * 4)
    assert per_worker[0].isdisjoint(per_worker[1])  # every prompt prefix on exactly one worker
    assert len(per_worker[0] | per_worker[1]) == 20 and per_worker[0] and per_worker[1]
    assert sorted(o.extra["worker"] for o in outputs) == sorted([url_a, url_b] * 2)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerateRequest([1, 2], 4, top_p=0.0), "top_p must be in"),
        (GenerateRequest([1, VOCAB + 5], 4), "exceeds the vocabulary size"),
        (GenerateRequest(list(range(1, 40)) * 7, 4), "leaves no room in the 256-token context"),
    ],
)
async def test_bad_requests_raise_engine_request_error(request_, message) -> None:
    state = scripted_state(vocab_size=VOCAB)
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            with pytest.raises(EngineRequestError, match=message):
                await generate_all(engine, [request_])


async def test_context_limits_come_from_the_server() -> None:
    """SGLang rejects inputs of max_req_input_len (context - 6) tokens or more: paths end before them."""
    state = scripted_state()
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            with pytest.raises(EngineRequestError, match="exceeds the maximum allowed length"):
                await engine.generate(GenerateRequest([1] * 250, max_new_tokens=2))  # within the config's 256
            engine.read_server_limits()
            assert engine.max_context == 250
            output = await engine.generate(GenerateRequest([1] * 247, max_new_tokens=50))
            with pytest.raises(EngineRequestError, match="leaves no room in the 250-token context"):
                await engine.generate(GenerateRequest([1] * 250, max_new_tokens=2))
    assert len(output.output_ids) == 3 and output.finish_reason == "length"


async def test_unanswered_server_limits_are_a_clear_error() -> None:
    engine = engine_for(f"http://127.0.0.1:{port()}")
    with pytest.raises(EngineUnavailable, match="did not answer /get_server_info within 0 s"):
        engine.read_server_limits(wait_s=0)


async def test_unreachable_and_unhealthy_workers() -> None:
    dead = f"http://127.0.0.1:{port()}"
    async with engine_for(dead) as engine:
        assert await engine.health() is False
        with pytest.raises(EngineUnavailable, match="unreachable"):
            await generate_all(engine, [GenerateRequest([1], 2)])
    state = scripted_state()
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            assert await engine.health() is True
            state.healthy = False
            assert await engine.health() is False


@pytest.mark.parametrize(
    ("item", "ids", "logprobs", "finish"),
    [
        ({"output_ids": [4], "meta_info": {"finish_reason": {"type": "stop", "matched": 4},
          "output_token_logprobs": [[-0.5, 4, None]]}}, [4], [-0.5], "stop"),
        ({"meta_info": {"finish_reason": {"type": "length", "length": 2},
          "output_token_logprobs": [[-0.1, 7, None], [-0.2, 8, None]]}}, [7, 8], [-0.1, -0.2], "length"),
        ({"token_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "paused"}}},
         [], [], "abort"),
    ],
)  # fmt: skip
def test_parse_item_versions(item, ids, logprobs, finish) -> None:
    piece = parse_item(item)
    assert (piece.output_ids, piece.logprobs, piece.finish) == (ids, logprobs, finish)


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        ({"output_ids": [1], "meta_info": {"finish_reason": {"type": "stop"}}},
         EngineError, "1 output ids but 0"),
        ({"output_ids": [], "meta_info": {"finish_reason": None}}, EngineError, "none of stop, length"),
        ({"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "status_code": 400,
          "message": "too long"}}}, EngineRequestError, "too long"),
    ],
)  # fmt: skip
def test_parse_item_rejects_malformed(item, error, message) -> None:
    with pytest.raises(error, match=message):
        parse_item(item)


@pytest.mark.parametrize("prefill_first", [False, True])
async def test_tree_sampler_runs_a_whole_tree_over_sglang(model_dirs, prefill_first: bool) -> None:
    from treepo.client.schema import SamplingParams, TreeParams
    from treepo.service.sampler import TreeSampler

    state = StandinState(tokens=ModelTokens(str(model_dirs[0])), vocab_size=VOCAB, weight_version="0")
    prompt = list(range(2, 18))
    shape = TreeParams(width=4, branch=2, segment_tokens=4, max_depth=3, init_branch=2, repetition_count=50)
    with serve(state, port()) as url:
        async with engine_for(url, prefill_first=prefill_first) as engine:
            sampler = TreeSampler(engine, lambda ids: " ".join(map(str, ids)))
            tree = await sampler.sample(prompt, shape, SamplingParams(seed=11), prompt_id="p0")
    stats = tree.stats
    assert len(tree.leaves) == 4 and tree.prompt_id == "p0" and tree.policy_version == 0
    assert stats.decoded_tokens == sum(len(n.token_ids) for n in tree.nodes) > 0
    assert stats.decoded_tokens < stats.independent_tokens  # siblings shared their prefixes
    # every segment after the first re-sends prompt + path: all but the new tokens come from the radix cache
    assert stats.cached_tokens > stats.prefill_tokens
    first_call_prefill = 16 + 2 if prefill_first else 2 * 16  # the 2 copies of the prompt at step 1
    assert stats.prefill_tokens <= first_call_prefill + stats.decoded_tokens
    assert all(len(n.logprobs) == len(n.token_ids) for n in tree.nodes)


async def test_a_pushed_safetensors_file_is_loaded_as_a_model_dir(model_dirs, tmp_path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    pushed = tmp_path / "policy-v0000002.safetensors"
    save_model(AutoModelForCausalLM.from_pretrained(model_dirs[1]), str(pushed))
    state = StandinState(tokens=ModelTokens(str(model_dirs[0])), weight_version="0")
    with serve(state, port()) as url:
        async with engine_for(url, model_path=model_dirs[0]) as engine:
            await engine.update_weights(str(pushed), 2)
        async with engine_for(url) as engine:  # no model_path: nothing to build the directory from
            with pytest.raises(ValueError, match="SGLang loads a model directory"):
                await engine.update_weights(str(pushed), 3)
    loaded = Path(state.weight_updates[0]["model_path"])
    assert loaded == tmp_path / ".policy-v0000002.sglang"
    assert (loaded / "model.safetensors").resolve() == pushed and (loaded / "config.json").exists()
    assert state.weight_version == "2" and state.tokens.model_path == str(loaded)


async def test_a_warmup_answered_with_a_logprob_and_no_token_fails_nothing() -> None:
    """Some SGLang versions answer max_new_tokens=0 with one logprob and no token (defect 2.6)."""
    state = scripted_state(warmup_logprob=True)
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            outputs = await generate_all(engine, [GenerateRequest([3, 4, 5], 4, seed=s) for s in range(3)])
            assert engine.num_warmup_requests == 1
    assert [len(o.output_ids) for o in outputs] == [4, 4, 4]
    assert [b["sampling_params"]["max_new_tokens"] for b in state.generate_bodies].count(0) == 1


async def test_a_restarted_worker_gets_the_current_weights_again() -> None:
    """After a restart SGLang serves its launch weights as "default": health says so and re-pushes."""
    state = scripted_state()
    with serve(state, port()) as url:
        async with engine_for(url, model_path=None) as engine:
            await engine.update_weights("/ckpt/step-3", 3)
            assert await engine.health() is True
            state.weight_version = "default"  # the worker restarted
            assert await engine.health() is False  # not ready until it has the current weights again
            await engine.admin.resync(url)
            assert state.weight_updates[-1]["model_path"] == "/ckpt/step-3"
            assert state.weight_version == "3" and await engine.health() is True
            state.weight_version = "default"  # restarted again, found by a request this time
            output = await engine.generate(GenerateRequest([20], 3))
    assert output.policy_version == 3 and output.extra["num_aborts"] == 1  # the stale answer was dropped
    assert engine.admin.num_repushes == 2 and len(state.weight_updates) == 3


@pytest.mark.parametrize("busy_flushes", [1, 9])  # queued requests finish soon / keep coming
async def test_a_load_whose_flush_found_requests_queued_still_flushes(busy_flushes) -> None:
    """SGLang 0.5.23 loads the weights, then refuses the flush while requests are queued (another replica's
    on a shared worker): the push still counts, and the cache of the old weights is flushed after it."""
    state = scripted_state()
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            await engine.generate(GenerateRequest([5, 6, 7], 2))
            assert state.prefix.root
            state.busy_flushes = busy_flushes
            await engine.update_weights("/ckpt/step-1", 1)
            assert state.weight_version == "1" and engine.policy_version == 1  # told after the flush
            assert not state.prefix.root and not state.paused  # flushed, and generation goes on
            assert await engine.health() is True


async def test_readiness_holds_while_weights_load() -> None:
    state = scripted_state(update_delay_s=0.5, healthy=True)
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            update = asyncio.ensure_future(engine.update_weights("/ckpt/step-1", 1))
            while not state.weight_updates:
                await asyncio.sleep(0.005)
            state.healthy = False  # a worker busy loading may not answer its health routes
            assert await engine.health() is True
            await update
            state.healthy = True
            assert await engine.health() is True


async def test_cancel_aborts_the_request_on_the_worker() -> None:
    state = scripted_state(token_delay_s=0.01)
    with serve(state, port()) as url:
        async with engine_for(url, prefill_first=False) as engine:
            task = asyncio.ensure_future(engine.generate(GenerateRequest([5], 150)))
            while not state.running:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            while not state.abort_requests:
                await asyncio.sleep(0.005)
    assert state.abort_requests == [{"rid": state.generate_bodies[0]["rid"]}]
    assert engine.num_aborted == 1 and engine.in_flight == 0


async def test_seeds_fit_in_31_bits() -> None:
    """SGLang 0.5.4 overflows int32 on sampling_seed >= 2^31 (defect 2.4)."""
    state = scripted_state()
    with serve(state, port()) as url:
        async with engine_for(url) as engine:
            await engine.generate(GenerateRequest([5], 2, seed=2**62 + 5))
    assert state.generate_bodies[0]["sampling_params"]["sampling_seed"] == 5


async def test_admin_calls_go_to_the_workers_not_the_generation_url() -> None:
    """With an sglang-router in front, generation goes to it and weights to each worker (defect 2.3)."""
    router, worker_b = scripted_state(), scripted_state()
    with serve(router, port()) as router_url, serve(worker_b, port()) as url_b:
        async with engine_for(router_url, admin_urls=[router_url, url_b]) as engine:
            await generate_all(engine, [GenerateRequest([1, 2], 2), GenerateRequest([3, 4], 2)])
            await engine.update_weights("/ckpt/step-2", 2)
            assert await engine.health() is True
    assert len(router.generate_bodies) == 2 and not worker_b.generate_bodies
    assert [u["weight_version"] for u in router.weight_updates + worker_b.weight_updates] == ["2", "2"]


async def test_an_unreachable_worker_fails_over_to_the_others() -> None:
    """Requests routed to a dead worker re-run on a live one; once all are dead the error says so."""
    dead = f"http://127.0.0.1:{port()}"
    state = scripted_state()
    with serve(state, port()) as url:
        async with engine_for([dead, url], prefill_first=False) as engine:
            outputs = await generate_all(engine, [GenerateRequest([p, p + 1], 3) for p in range(1, 13)])
            assert engine._reachable(0) == 1  # the dead worker is routed around for a while
            # degraded, still healthy: the live worker answers for both
            assert await engine.health() is True and engine.unhealthy_workers == [dead]
    assert {o.extra["worker"] for o in outputs} == {url}
    assert len(state.generate_bodies) == 12 and all(len(o.output_ids) == 3 for o in outputs)
    async with engine_for([dead, f"http://127.0.0.1:{port()}"]) as engine:
        assert await engine.health() is False and len(engine.unhealthy_workers) == 2
        with pytest.raises(EngineUnavailable, match="unreachable"):
            await engine.generate(GenerateRequest([1], 2))


async def test_a_connection_lost_inside_the_transport_fails_over() -> None:
    """A worker killed mid-request can make anyio/httpcore fail reading the closed socket's address
    (AttributeError, seen once in the real-SGLang fleet test): that is the worker gone, not a bug."""
    state = scripted_state()
    with serve(state, port()) as url:
        async with engine_for([f"http://127.0.0.1:{port()}", url], prefill_first=False) as engine:
            broken = engine.base_urls[0]

            hits = []

            def lost(request: httpx.Request) -> httpx.Response:
                hits.append(request)
                raise AttributeError("'NoneType' object has no attribute 'getpeername'")

            real = httpx.AsyncClient(timeout=30)
            mocked = httpx.AsyncClient(transport=httpx.MockTransport(lost))

            async def send(request: httpx.Request, **kwargs) -> httpx.Response:
                client = mocked if str(request.url).startswith(broken) else real
                return await client.send(request, **kwargs)

            engine._client = httpx.AsyncClient()
            engine._client.send = send  # type: ignore[method-assign]
            outputs = await generate_all(engine, [GenerateRequest([p, p + 1], 3) for p in range(1, 13)])
            await real.aclose()
            await mocked.aclose()
    assert hits, "no request was routed to the broken worker: use more requests"
    assert {o.extra["worker"] for o in outputs} == {url} and all(len(o.output_ids) == 3 for o in outputs)


async def test_a_version_pushed_by_another_replica_is_adopted_not_reverted() -> None:
    """Two replicas' engines over the same workers: B sees A's newer version on a worker, catches up with
    the fleet (which adopts it) instead of re-pushing its own older weights."""
    states = [scripted_state(), scripted_state()]
    with serve(states[0], port()) as url_a, serve(states[1], port()) as url_b:
        async with engine_for([url_a, url_b]) as a, engine_for([url_a, url_b]) as b:
            await a.update_weights("/ckpt/step-1", 1)
            b.adopt_weights("/ckpt/step-1", 1)
            b.share_weights(lambda: _adopt(b, "/ckpt/step-2", 2))
            await a.update_weights("/ckpt/step-2", 2)  # B has not heard of it yet
            output = await b.generate(GenerateRequest([5], 3))
            assert await b.health() is True
    assert output.policy_version == 2 == b.policy_version and output.extra["num_aborts"] == 1
    assert [[u["weight_version"] for u in s.weight_updates] for s in states] == [["1", "2"]] * 2


async def _adopt(engine: SGLangEngine, path: str, version: int) -> None:
    engine.adopt_weights(path, version)


async def test_worker_versions_are_what_each_worker_reported() -> None:
    states = [scripted_state(weight_version="default"), scripted_state(weight_version="default")]
    with serve(states[0], port()) as url_a, serve(states[1], port()) as url_b:
        async with engine_for([url_a, url_b]) as engine:
            await engine.update_weights("/ckpt/step-4", 4)
            states[1].weight_version = "default"  # restarted
            await engine.health()
    assert engine.worker_versions == {url_a: 4, url_b: 0}
