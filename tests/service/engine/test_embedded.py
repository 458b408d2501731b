"""EmbeddedEngine (continuously batched, one request per call) against plain transformers on a tiny random
Qwen2: outputs, cache reuse, eviction, requests joining mid-decode, cancellation, per-request errors."""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from treepo.service.engine.embedded import GIL_SWITCH_INTERVAL_S, EmbeddedEngine
from treepo.service.engine.protocol import Engine, EngineRequestError, GenerateRequest, generate_all

EOS = 1  # as saved by conftest.save_tiny_qwen2
PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18], [19]]


def greedy(input_ids: list[int], max_new_tokens: int = 12, **kwargs) -> GenerateRequest:
    return GenerateRequest(input_ids=input_ids, max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)


def hf_greedy(model, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate on one unpadded prompt."""
    out = model.generate(
        torch.tensor([input_ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return out[0, len(input_ids) :].tolist()


@pytest.fixture
def engine(tiny_model_path):
    engine = EmbeddedEngine(tiny_model_path, max_kv_tokens=4096, max_running_rows=8)
    yield engine
    engine.close()


def test_implements_the_engine_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.eos_token_ids == (EOS,)
    assert engine.max_context == 512
    assert engine.policy_version == 0
    assert sys.getswitchinterval() <= GIL_SWITCH_INTERVAL_S  # the worker gets the GIL back quickly


async def test_greedy_matches_transformers_generate_cold_and_warm(engine, reference_model):
    expected = [hf_greedy(reference_model, p, 12) for p in PROMPTS]
    cold = await generate_all(engine, [greedy(p) for p in PROMPTS])
    assert [o.output_ids for o in cold] == expected
    assert [o.cached_tokens for o in cold] == [0, 0, 0, 0]
    warm = await generate_all(engine, [greedy(p) for p in PROMPTS])
    assert [o.output_ids for o in warm] == expected
    assert [o.cached_tokens for o in warm] == [len(p) - 1 for p in PROMPTS]  # capped: one token computed
    # the next segment of each path: the whole input is cached except its last (sampled) token
    continued = [p + out for p, out in zip(PROMPTS, expected, strict=True)]
    nxt = await generate_all(engine, [greedy(p, 8) for p in continued])
    assert [o.output_ids for o in nxt] == [hf_greedy(reference_model, p, 8) for p in continued]
    assert [o.prefill_tokens for o in nxt] == [1, 1, 1, 1]


async def test_mixed_cached_and_fresh_rows_in_one_batch(engine, reference_model):
    await generate_all(engine, [greedy(PROMPTS[0], 4)])
    batch = [PROMPTS[0] + [20, 21, 22], [30, 31, 32, 33, 34, 35, 36], [*PROMPTS[0][:4], 40]]
    outs = await generate_all(engine, [greedy(p, 10) for p in batch])
    assert [o.cached_tokens for o in outs] == [9, 0, 4]
    assert [o.output_ids for o in outs] == [hf_greedy(reference_model, p, 10) for p in batch]


async def test_siblings_of_a_cached_prefix_only_compute_their_suffix(engine):
    prefix = list(range(3, 43))  # 40 tokens
    await generate_all(engine, [greedy(prefix, 1)])
    before = engine.num_computed_tokens
    embedded_tokens: list[int] = []
    hook = engine.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: embedded_tokens.append(args[0].numel())
    )
    try:
        outs = await generate_all(engine, [greedy([*prefix, 50 + i], 5) for i in range(4)])
    finally:
        hook.remove()
    assert [o.cached_tokens for o in outs] == [40] * 4
    assert [o.prefill_tokens for o in outs] == [1] * 4
    assert embedded_tokens[0] == 4  # the prefill forward saw one token per sibling, no padding
    assert engine.num_computed_tokens - before == 4 + 4 * 4  # 4 suffix tokens + 4 decode steps of 4 rows


async def test_eviction_under_a_tiny_budget_still_gives_correct_output(tiny_model_path, reference_model):
    engine = EmbeddedEngine(tiny_model_path, max_kv_tokens=24, max_running_rows=4)
    for _ in range(2):
        outs = await generate_all(engine, [greedy(p, 10) for p in PROMPTS])
        assert [o.output_ids for o in outs] == [hf_greedy(reference_model, p, 10) for p in PROMPTS]
        assert engine.radix.total_size <= 24 and engine.radix.protected_size == 0
        assert engine.radix.total_size + engine.pool.num_free == 24  # no slot leaked


async def test_nodes_in_use_are_not_evicted_mid_batch(tiny_model_path, reference_model):
    engine = EmbeddedEngine(tiny_model_path, max_kv_tokens=40, max_running_rows=8)
    long_prompt = list(range(3, 23))  # 20 tokens
    other = list(range(30, 42))  # 12 tokens: evictable once its request is done
    await generate_all(engine, [greedy(long_prompt, 1), greedy(other, 1)])
    seen_protected = []
    original = engine.radix.evict

    def watching_evict(num_tokens: int, **kwargs) -> int:
        seen_protected.append(engine.radix.protected_size)
        freed = original(num_tokens, **kwargs)
        assert engine.radix.match_prefix(long_prompt).length >= 19  # the locked prefix is still there
        return freed

    engine.radix.evict = watching_evict
    batch = [[*long_prompt, 40], [*long_prompt, 41]]
    outs = await generate_all(engine, [greedy(p, 6) for p in batch])
    assert seen_protected and max(seen_protected) >= 19  # evicted `other` while the prefix was locked
    assert [o.cached_tokens for o in outs] == [20, 20]
    assert [o.output_ids for o in outs] == [hf_greedy(reference_model, p, 6) for p in batch]
    assert engine.radix.protected_size == 0  # every lock released
    engine.close()


async def test_stop_ids_and_max_new_tokens(engine, reference_model):
    free_run = hf_greedy(reference_model, PROMPTS[0], 12)
    stop = free_run[3]
    first_stop = free_run.index(stop)
    outs = await generate_all(
        engine, [greedy(PROMPTS[0], 12, stop_token_ids=(stop,)), greedy(PROMPTS[0], 2), greedy(PROMPTS[0], 1)]
    )
    assert outs[0].output_ids == free_run[: first_stop + 1] and outs[0].finish_reason == "stop"
    assert outs[1].output_ids == free_run[:2] and outs[1].finish_reason == "length"
    assert outs[2].output_ids == free_run[:1] and len(outs[2].logprobs) == 1


async def test_eos_stops_a_request(engine):
    # make EOS the most likely token by scaling its output row: greedy must stop on it at once
    with torch.no_grad():
        engine.model.lm_head.weight[EOS] *= 50
    outs = await generate_all(engine, [greedy(PROMPTS[1], 10)])
    assert outs[0].output_ids[-1] == EOS and outs[0].finish_reason == "stop"
    assert len(outs[0].output_ids) < 10


async def test_logprobs_match_a_direct_forward_pass(engine, reference_model):
    request = GenerateRequest(input_ids=PROMPTS[2], max_new_tokens=8, temperature=0.7, top_k=10, seed=3)
    [out] = await generate_all(engine, [request])
    sequence = torch.tensor([PROMPTS[2] + out.output_ids])
    with torch.no_grad():
        logits = reference_model(sequence).logits[0, len(PROMPTS[2]) - 1 : -1]  # (T, V)
    expected = (
        torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(out.output_ids)[:, None]).squeeze(1)
    )
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=1e-4)


async def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model_path):
    def sampled(seed: int, prompt: list[int]) -> GenerateRequest:
        return GenerateRequest(input_ids=prompt, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed)

    engine = EmbeddedEngine(tiny_model_path)
    alone = await generate_all(engine, [sampled(7, PROMPTS[0])])
    again = EmbeddedEngine(tiny_model_path)
    crowd = await generate_all(
        again, [sampled(1, PROMPTS[1]), sampled(7, PROMPTS[0]), sampled(2, PROMPTS[3])]
    )
    assert crowd[1].output_ids == alone[0].output_ids
    others = await generate_all(engine, [sampled(s, PROMPTS[0]) for s in (8, 9, 10)])
    assert len({tuple(o.output_ids) for o in others + alone}) > 1  # seeds matter


async def test_a_multi_segment_request_decodes_what_one_request_per_segment_does(tiny_model_path):
    """Segment j drawn with seed j continuing the tokens before it: the tree's whole-path requests give the
    tokens (and logprobs) its per-segment requests would."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = EmbeddedEngine(tiny_model_path, eos_token_ids=())
    try:
        seeds, size = (101, 202, 303), 4
        whole = await engine.generate(
            GenerateRequest(PROMPTS[0], 11, temperature=1.0, segment_seeds=seeds, segment_tokens=size)
        )
        engine.flush_cache()
        tokens: list[int] = []
        logprobs: list[float] = []
        for seed in seeds:
            piece = await engine.generate(
                GenerateRequest(PROMPTS[0] + tokens, min(size, 11 - len(tokens)), temperature=1.0, seed=seed)
            )
            tokens += piece.output_ids
            logprobs += piece.logprobs
    finally:
        engine.close()
        torch.set_num_threads(threads)
    assert len(whole.output_ids) == 11 and whole.output_ids == tokens
    torch.testing.assert_close(torch.tensor(whole.logprobs), torch.tensor(logprobs), rtol=0, atol=1e-6)


async def test_logprobs_are_bit_identical_whatever_runs_beside_the_request(tiny_model_path):
    """Seeded runs repeat exactly (the demo's --seed): a row's numbers do not depend on its step-mates.
    With one torch thread, as the service runs on CPU (several threads split a GEMM by its row count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        await _check_bit_identical(tiny_model_path)
    finally:
        torch.set_num_threads(threads)


async def _check_bit_identical(tiny_model_path) -> None:
    engine = EmbeddedEngine(tiny_model_path, eos_token_ids=())
    request = GenerateRequest(input_ids=PROMPTS[0], max_new_tokens=24, temperature=1.0, seed=11)
    alone = await engine.generate(request)
    for crowd in (2, 11):
        engine.flush_cache()
        others = [GenerateRequest([20 + i, 3, 4], 10 + 2 * i, temperature=1.0, seed=i) for i in range(crowd)]
        outs = await generate_all(engine, [*others[: crowd // 2], request, *others[crowd // 2 :]])
        beside = outs[crowd // 2]
        assert beside.output_ids == alone.output_ids
        assert torch.equal(torch.tensor(beside.logprobs), torch.tensor(alone.logprobs))
    engine.close()


async def test_update_weights_changes_outputs_and_flushes_the_cache(engine, other_model_path):
    before = await generate_all(engine, [greedy(p) for p in PROMPTS])
    assert engine.radix.total_size > 0
    await engine.update_weights(str(other_model_path / "model.safetensors"), version=3)
    assert engine.policy_version == 3 and engine.radix.total_size == 0
    after = await generate_all(engine, [greedy(p) for p in PROMPTS])
    assert [o.cached_tokens for o in after] == [0, 0, 0, 0]
    assert [o.output_ids for o in after] != [o.output_ids for o in before]
    assert all(o.policy_version == 3 for o in after)


async def test_update_weights_from_a_checkpoint_directory(tiny_model_path, other_model_path, reference_model):
    engine = EmbeddedEngine(other_model_path)
    await engine.update_weights(str(tiny_model_path), version=1)
    outs = await generate_all(engine, [greedy(PROMPTS[0])])
    assert outs[0].output_ids == hf_greedy(reference_model, PROMPTS[0], 12)


async def test_bad_weights_raise_value_error(engine, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    wrong_shape = dict(state, **{"lm_head.weight": torch.zeros(3, 3)})
    unknown = dict(state, **{"not.a.weight": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    for name, bad, message in [
        ("shape", wrong_shape, "wrong shape"),
        ("unknown", unknown, "unknown tensor names"),
        ("missing", missing, "lack 1 tensors"),
    ]:
        save_file(bad, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match=message):
            await engine.update_weights(str(tmp_path / f"{name}.safetensors"), version=9)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        await engine.update_weights(str(tmp_path / "junk.safetensors"), version=9)
    with pytest.raises(ValueError, match="does not exist"):
        await engine.update_weights(str(tmp_path / "nope.safetensors"), version=9)
    assert engine.policy_version == 0


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"input_ids": [3, 64]}, "outside the vocabulary"),
        ({"input_ids": [3] * 500, "max_new_tokens": 20}, "exceeds the model context"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
    ],
)
async def test_bad_requests_are_rejected_with_a_clear_message(engine, request_kwargs, message):
    request = GenerateRequest(**{"input_ids": [3, 4], "max_new_tokens": 4, **request_kwargs})
    with pytest.raises(EngineRequestError, match=message):
        await engine.generate(request)


async def test_concurrent_callers_share_the_engine_and_each_get_exact_results(engine, reference_model):
    calls = [generate_all(engine, [greedy(p, 6) for p in PROMPTS]) for _ in range(3)]
    results = await asyncio.gather(*calls)
    expected = [hf_greedy(reference_model, p, 6) for p in PROMPTS]
    assert all([o.output_ids for o in outs] == expected for outs in results)
    assert engine.counters.num_requests == 12


async def test_a_request_joining_mid_decode_matches_transformers(tiny_model_path, reference_model):
    engine = EmbeddedEngine(tiny_model_path, eos_token_ids=())
    first = asyncio.create_task(engine.generate(greedy(PROMPTS[0], 60)))
    while engine.num_forward_passes < 3:
        await asyncio.sleep(0.001)
    assert not first.done()
    second = await engine.generate(greedy(PROMPTS[2], 8))
    assert not first.done()  # the joiner finished (and was delivered) while the first row kept decoding
    assert second.output_ids == hf_greedy(reference_model, PROMPTS[2], 8)
    expected = reference_model.generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=60, min_new_tokens=60, do_sample=False, pad_token_id=0
    )[0, len(PROMPTS[0]) :].tolist()
    assert (await first).output_ids == expected
    engine.close()


async def test_cancel_aborts_the_row_and_releases_its_locks(tiny_model_path):
    engine = EmbeddedEngine(tiny_model_path, eos_token_ids=())  # no early stop: still running when cancelled
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


async def test_an_invalid_request_fails_alone(engine, reference_model):
    good = engine.generate(greedy(PROMPTS[0], 6))
    bad = engine.generate(GenerateRequest([3, 4], 4, top_p=0.0))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert results[0].output_ids == hf_greedy(reference_model, PROMPTS[0], 6)
    assert isinstance(results[1], EngineRequestError)


def test_rejects_a_path_without_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        EmbeddedEngine(tmp_path)


async def test_a_prefix_shared_within_one_call_is_computed_once(engine, reference_model):
    prefix = list(range(3, 33))  # 30 tokens, not cached yet
    copies = list(range(50, 60))  # two identical prompts (TreePO's init_branch copies)
    batch = [[*prefix, 40 + i] for i in range(4)] + [copies, [61, 62], copies]
    before = engine.num_computed_tokens
    outs = await generate_all(engine, [greedy(p, 3) for p in batch])
    prefill = sum(o.prefill_tokens for o in outs)
    assert prefill == len(prefix) + 4 + len(copies) + 1 + 2  # shared parts once, then each row's last token
    assert sum(o.cached_tokens for o in outs) + prefill == sum(len(p) for p in batch)
    decoded = sum(len(o.output_ids) - 1 for o in outs)  # the last sampled token is never fed back
    assert engine.num_computed_tokens - before == prefill + decoded
    assert [o.output_ids for o in outs] == [hf_greedy(reference_model, p, 3) for p in batch]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_greedy_matches_transformers_generate_on_cuda(tiny_model_path, reference_model):
    engine = EmbeddedEngine(tiny_model_path, device="cuda", dtype=torch.float32)
    expected = [hf_greedy(reference_model, p, 12) for p in PROMPTS]
    for _ in range(2):  # cold, then warm
        outs = await generate_all(engine, [greedy(p) for p in PROMPTS])
        assert [o.output_ids for o in outs] == expected


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
async def test_other_llama_style_architectures_match_transformers(tmp_path, architecture):
    """Qwen3 (per-head q/k RMSNorm, no qkv bias) and Llama run through the same packed-weight step."""
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    config_class, model_class = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[architecture]
    torch.manual_seed(0)
    config = config_class(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, initializer_range=0.2,
        eos_token_id=EOS, pad_token_id=0, bos_token_id=2,
    )  # fmt: skip
    model_class(config).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    engine = EmbeddedEngine(tmp_path, max_running_rows=4)
    outs = await generate_all(engine, [greedy(p, 8) for p in PROMPTS])
    assert [o.output_ids for o in outs] == [hf_greedy(reference, p, 8) for p in PROMPTS]
    engine.close()


async def test_peak_kv_counts_a_locked_shared_prefix_once(engine):
    prefix = list(range(3, 13))  # 10 tokens
    await generate_all(engine, [greedy(prefix, 1)])
    assert engine.kv_trace == []  # a serving engine records no per-step trace
    engine.reset_peaks(trace=True)
    outs = await generate_all(engine, [greedy([*prefix, 40 + i], 3) for i in range(2)])
    assert [o.cached_tokens for o in outs] == [10, 10]
    per_token = engine.pool.shape.bytes_per_token
    # the shared prefix once + each row's own 3 fed tokens (its last input token and 2 decoded ones)
    assert engine.peak_kv_bytes == (10 + 2 * 3) * per_token
    assert engine.kv_token_steps == (10 + 2) + (10 + 4) + (10 + 6)  # the same, summed over its 3 steps
    assert engine.peak_running_rows == 2
    assert engine.kv_trace == [(2, 10, 2), (2, 10, 4), (2, 10, 6)]  # rows, locked prefix, own slots per step
    assert engine.blocks.num_active_tokens == 0  # nothing held once the rows left
    engine.reset_peaks()
    assert engine.kv_trace == []


def test_length_cuts_only_where_padding_wastes_enough_key_reads():
    from treepo.service.engine.forward_batch import MIN_SPLIT_KEYS, _length_cuts

    short, long = [20] * 64, [84] * 64
    assert _length_cuts(short + long) == [64]  # 64 rows x 64 padded keys saved
    assert _length_cuts([20] * 2 + [84]) == []  # 128 keys: not worth another group's kernels
    assert _length_cuts([30] * 128) == []
    assert len(_length_cuts([10] * 64 + [40] * 64 + [70] * 64 + [100] * 64 + [130] * 64)) == 3  # <= 4 groups
    assert MIN_SPLIT_KEYS > 0


@pytest.mark.parametrize("min_split_keys", [1, 10**9])
async def test_rows_cut_into_length_groups_match_transformers(
    tiny_model_path, reference_model, monkeypatch, min_split_keys
):
    """Decode rows of very different lengths attend in separate groups (forced here); outputs stay exact."""
    monkeypatch.setattr("treepo.service.engine.forward_batch.MIN_SPLIT_KEYS", min_split_keys)
    engine = EmbeddedEngine(tiny_model_path, eos_token_ids=())
    prompts = [[3 + i % 7] * (4 + 13 * i) for i in range(6)]  # 4 to 69 tokens
    outs = await generate_all(engine, [greedy(p, 10) for p in prompts])
    assert [o.output_ids for o in outs] == [hf_greedy(reference_model, p, 10) for p in prompts]
    sampled = GenerateRequest(input_ids=prompts[0], max_new_tokens=10, temperature=1.0, seed=5)
    engine.flush_cache()
    alone = await engine.generate(sampled)
    engine.flush_cache()
    crowd = await generate_all(engine, [sampled, *(greedy(p, 10) for p in prompts[1:])])
    assert crowd[0].output_ids == alone.output_ids
    assert crowd[0].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    engine.close()
