"""TreeSampler scenarios on scripted engines: the §5 vectors, budget transfer, fallback, B1-B4, seeds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sampler_helpers import (
    EOS,
    PROMPT,
    check_invariants,
    decode,
    eos_at,
    first_request_dies,
    leaf_paths,
    level_sizes,
    no_eos,
)

from treepo.client.schema import SamplingParams, TreeParams
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.sampler import TreeSampler

TV1 = [
    "1-0#2-0#3-0#4-0",
    "1-0#2-0#3-1#4-1",
    "1-0#2-1#3-2#4-2",
    "1-0#2-1#3-3#4-3",
    "1-1#2-2#3-4#4-4",
    "1-1#2-2#3-5#4-5",
    "1-1#2-3#3-6#4-6",
    "1-1#2-3#3-7#4-7",
]
SMALL = {"width": 8, "branch": 2, "segment_tokens": 4, "max_depth": 4}


async def sample(script, *, seed: int = 1, max_new_tokens: int | None = 16, engine=None, **tree_kwargs):
    engine = engine or ScriptedEngine(script, eos_token_id=EOS)
    params = TreeParams(**{**SMALL, **tree_kwargs})
    tree = await TreeSampler(engine, decode).sample(
        PROMPT, params, SamplingParams(max_new_tokens=max_new_tokens), seed=seed
    )
    return tree, engine, params


@pytest.mark.parametrize("schedule", ["sync", "async"])
async def test_vector_a_no_eos(schedule: str) -> None:
    tree, _, params = await sample(no_eos(), schedule=schedule)
    assert level_sizes(tree) == [2, 4, 8, 8]
    assert leaf_paths(tree) == TV1
    assert tree.stats.finish_reasons == {"max_tokens": 8}
    assert all(len(tokens) == 16 for _, tokens in tree.trajectories())
    assert tree.stats.engine_calls == 2 + 4 + 8 + 8  # one request per segment
    assert tree.stats.decoded_tokens == 4 * (2 + 4 + 8 + 8)
    assert tree.stats.independent_tokens == 8 * 16
    check_invariants(tree, params, 16)


async def test_vector_f_eos_only_segment_finishes_b4() -> None:
    tree, _, params = await sample(eos_at(4), width=2)  # second segment of every path is [EOS]
    assert level_sizes(tree) == [2, 2]
    leaves = [tree.node_map()[leaf] for leaf in tree.leaves]
    assert [(leaf.token_ids, leaf.finish_reason, leaf.depth) for leaf in leaves] == [([EOS], "eos", 2)] * 2
    check_invariants(tree, params, 16)


async def test_early_stop_donates_budget_to_the_survivor() -> None:
    tree, _, params = await sample(first_request_dies(), width=16, max_depth=6, max_new_tokens=24)
    # one of 2 depth-1 paths stops: the survivor gets min(15, 2 + 2) = 4 children; then 8; then 15 (w - F)
    assert level_sizes(tree)[:4] == [2, 4, 8, 15]
    nodes = tree.node_map()
    assert nodes["1-0"].finish_reason == "eos"
    assert [n.parent for n in tree.nodes if n.depth == 2] == ["1-1"] * 4
    fixed_avg_15_over_8 = [1] * 7 + [8]
    children = [sum(1 for n in tree.nodes if n.parent == f"3-{k}") for k in range(8)]
    assert children == fixed_avg_15_over_8
    check_invariants(tree, params, 24)


async def test_async_decides_budget_per_level_whatever_the_return_order() -> None:
    """The stop and the survivor come back at different times; the level's budget is the same as in sync."""
    engine = ScriptedEngine(first_request_dies(), eos_token_id=EOS, jitter_s=0.005, jitter_seed=3)
    tree, _, params = await sample(
        None, engine=engine, width=16, max_depth=6, max_new_tokens=24, schedule="async"
    )
    assert tree.node_map()["1-0"].finish_reason == "eos"
    assert sum(1 for n in tree.nodes if n.parent == "1-1") == 4
    assert level_sizes(tree)[:4] == [2, 4, 8, 15]
    check_invariants(tree, params, 24)


async def test_all_paths_die_at_step_one_fallback_restarts_from_prompt() -> None:
    tree, _, params = await sample(eos_at(1))  # [t, EOS]: L = 2 < W = 4, so every cut is 0
    assert level_sizes(tree) == [2, 4, 2]
    assert all(node.parent is None and node.finish_reason == "eos" for node in tree.nodes)
    assert tree.stats.num_fallbacks == 2
    check_invariants(tree, params, 16)


async def test_fallback_none_stops_with_fewer_leaves() -> None:
    tree, _, params = await sample(eos_at(1), fallback="none")
    assert level_sizes(tree) == [2]
    assert len(tree.leaves) == 2
    check_invariants(tree, params, 16, exact_width=False)


async def test_fallback_copies_are_new_children_of_a_kept_ancestor() -> None:
    tree, _, params = await sample(eos_at(10), width=16, max_depth=4)  # all 8 stop in segment 3
    nodes = tree.node_map()
    reopened = [n for n in tree.nodes if int(n.id.split("-")[0]) > n.depth]  # created by fallback
    assert reopened, "fallback must have fired"
    for node in reopened:
        assert node.parent is None or len(tree.path(node.parent)) == nodes[node.parent].depth
        assert node.parent is None or nodes[node.parent].finish_reason is None
    assert {n.parent is None for n in reopened} == {True, False}  # cuts at 0 and at later boundaries
    assert tree.stats.num_fallbacks >= 1
    check_invariants(tree, params, 16)


@pytest.mark.parametrize("window", [1, 3, 4, 6])
async def test_fallback_window_other_than_segment_works_b3(window: int) -> None:
    tree, _, params = await sample(eos_at(6), width=12, fallback_window=window)
    check_invariants(tree, params, 16)


@pytest.mark.parametrize("window", [-1, 0])
def test_invalid_fallback_window_is_a_validation_error_b3(window: int) -> None:
    with pytest.raises(ValidationError, match="fallback_window"):
        TreeParams(fallback_window=window)


async def test_random_init_divergence_is_applied_and_capped_b1() -> None:
    firsts = set()
    for seed in range(12):
        tree, _, _ = await sample(no_eos(), seed=seed, width=16, init_branch=(2, 8))
        firsts.add(level_sizes(tree)[0])
    assert len(firsts) >= 3 and firsts <= set(range(2, 9))
    tree, _, _ = await sample(no_eos(), width=4, init_branch=(6, 8))
    assert level_sizes(tree)[0] == 4
    tree, _, _ = await sample(no_eos(), width=3, init_branch=5)
    assert level_sizes(tree)[0] == 3


def repeating_answer(input_ids: list[int], rng) -> list[int]:
    return [7, 8, 8, 8] * 12 + [EOS]  # "\boxed{4}" + "ab"*36 then EOS


@pytest.mark.parametrize(("priority", "reason"), [("first", "repetition"), ("last", "answer")])
async def test_repetition_priority_is_honoured_b2(priority: str, reason: str) -> None:
    tree, _, _ = await sample(
        repeating_answer, width=2, segment_tokens=64, max_new_tokens=256, repetition_priority=priority
    )
    assert tree.stats.finish_reasons == {reason: 2}


def boxed_then(second: int):
    return lambda input_ids, rng: [7, second] if len(input_ids) == len(PROMPT) else [11, 12]


@pytest.mark.parametrize(
    ("answer_stop", "second", "reason"),
    [
        ("boxed_and_eos", EOS, "answer"),
        ("boxed_and_eos", 12, "max_tokens"),
        ("boxed", 12, "answer"),
        ("none", EOS, "eos"),
    ],
)
async def test_answer_stop_variants(answer_stop: str, second: int, reason: str) -> None:
    tree, _, _ = await sample(
        boxed_then(second), width=2, segment_tokens=2, max_new_tokens=4, answer_stop=answer_stop
    )
    assert set(tree.stats.finish_reasons) == {reason}


@pytest.mark.parametrize("schedule", ["sync", "async"])
async def test_same_seed_same_tree(schedule: str) -> None:
    from sampler_helpers import random_script

    def dump(tree):
        return tree.model_dump(exclude={"tree_id": True, "stats": {"wall_s"}})

    kwargs = {"width": 10, "schedule": schedule, "fallback_window": 3}
    first, _, _ = await sample(random_script(0.08), seed=7, **kwargs)
    second, _, _ = await sample(random_script(0.08), seed=7, **kwargs)
    other, _, _ = await sample(random_script(0.08), seed=8, **kwargs)
    assert dump(first) == dump(second)
    assert dump(first) != dump(other)


async def test_tree_fields_and_logprobs_toggle() -> None:
    engine = ScriptedEngine(no_eos(), eos_token_id=EOS)
    await engine.update_weights("w", 3)
    sampler = TreeSampler(engine, decode)
    params = TreeParams(**SMALL)
    tree = await sampler.sample(
        PROMPT,
        params,
        SamplingParams(max_new_tokens=16),
        prompt_id="p",
        metadata={"answer": "4"},
        tree_id="t",
    )
    assert (tree.tree_id, tree.prompt_id, tree.metadata, tree.policy_version) == (
        "t",
        "p",
        {"answer": "4"},
        3,
    )
    assert tree.prompt_token_ids == PROMPT
    assert all(n.policy_version == 3 and len(n.logprobs) == len(n.token_ids) for n in tree.nodes)
    assert all(n.text == decode(n.token_ids) for n in tree.nodes)
    bare = await sampler.sample(PROMPT, params, SamplingParams(max_new_tokens=16), return_logprobs=False)
    assert all(n.logprobs is None for n in bare.nodes)
    assert tree.stats.prefill_tokens + tree.stats.cached_tokens == sum(
        len(request.input_ids) for request in engine.requests[: tree.stats.engine_calls]
    )
    assert tree.stats.cached_tokens > 0


async def test_default_length_is_segment_times_depth_within_context() -> None:
    engine = ScriptedEngine(no_eos(), eos_token_id=EOS, max_context=13)
    tree = await TreeSampler(engine, decode).sample(PROMPT, TreeParams(**SMALL), SamplingParams(), seed=1)
    assert all(len(tokens) == 10 for _, tokens in tree.trajectories())  # 13 - 3 prompt tokens, not 16


@pytest.mark.parametrize(
    ("prompt", "max_new_tokens", "message"),
    [
        ([], None, "prompt_ids is empty"),
        (PROMPT, 11, "lower max_new_tokens to at most 10"),
        ([1] * 13, None, "no room"),
    ],
)
async def test_bad_input_is_a_clear_error(
    prompt: list[int], max_new_tokens: int | None, message: str
) -> None:
    sampler = TreeSampler(ScriptedEngine(no_eos(), max_context=13), decode)
    with pytest.raises(ValueError, match=message):
        await sampler.sample(prompt, TreeParams(**SMALL), SamplingParams(max_new_tokens=max_new_tokens))


async def test_stop_token_ids_count_as_eos() -> None:
    engine = ScriptedEngine(lambda ids, rng: [11, 42, 13, 14], eos_token_id=EOS)
    tree = await TreeSampler(engine, decode).sample(
        PROMPT,
        TreeParams(**{**SMALL, "width": 2}),
        SamplingParams(max_new_tokens=16, stop_token_ids=[42]),
        seed=1,
    )
    assert [tree.node_map()[leaf].token_ids for leaf in tree.leaves] == [[11, 42]] * 2
    assert tree.stats.finish_reasons == {"eos": 2}


async def test_sequential_baseline() -> None:
    engine = ScriptedEngine(eos_at(9), eos_token_id=EOS)
    sampler = TreeSampler(engine, decode)
    params = TreeParams(**SMALL)
    tree = await sampler.sample_sequential(PROMPT, params, SamplingParams(max_new_tokens=16), seed=3)
    assert tree.stats.engine_calls == 8
    assert [r.max_new_tokens for r in engine.requests] == [16] * 8
    assert tree.stats.finish_reasons == {"eos": 8}
    assert tree.stats.decoded_tokens == tree.stats.independent_tokens == 8 * 10
    assert all(len(tokens) == 10 for _, tokens in tree.trajectories())
    assert [n.depth for n in tree.path(tree.leaves[0])] == [1, 2, 3]
    check_invariants(tree, params, 16)


async def test_a_trees_requests_share_its_start_order_as_their_priority():
    """The engine admits lower priorities first: trees started earlier finish before new ones begin."""
    engine = ScriptedEngine(no_eos(), eos_token_id=EOS)
    sampler = TreeSampler(engine, decode)
    params, sampling = TreeParams(**SMALL), SamplingParams(max_new_tokens=16)
    await sampler.sample(PROMPT, params, sampling, seed=1)
    first = {request.priority for request in engine.requests}
    await sampler.sample_sequential(PROMPT, params, sampling, seed=1)
    second = {request.priority for request in engine.requests} - first
    assert len(first) == 1 and len(second) == 1 and min(second) > max(first)


@pytest.mark.parametrize(("segment", "longest"), [(40, 120), (512, 512)])
async def test_whole_path_requests_stay_short(segment: int, longest: int) -> None:
    """Once the tree is full a path's remaining segments go as one request, but never beyond
    WHOLE_PATH_TOKENS (the engine reserves KV for all of them): 3 segments of 40, none of 512."""
    params = TreeParams(width=4, branch=2, segment_tokens=segment, max_depth=8, init_branch=2)
    sampling = SamplingParams(max_new_tokens=segment * 8)
    trees, requests = [], []
    for segmented in (False, True):
        engine = ScriptedEngine(no_eos(), eos_token_id=EOS, segmented=segmented)
        trees.append(await TreeSampler(engine, decode).sample(PROMPT, params, sampling, seed=3))
        requests.append(engine.requests)
    assert [n.token_ids for n in trees[0].nodes] == [n.token_ids for n in trees[1].nodes]
    assert max(r.max_new_tokens for r in requests[1]) == longest
    assert len(requests[1]) < len(requests[0]) if segment == 40 else len(requests[1]) == len(requests[0])


async def test_async_head_starts_take_the_whole_path_once_the_next_level_is_full() -> None:
    """b * members >= w - F makes the next level full whatever this one gives, so a survivor's first child,
    sent early by `async`, is an only child from there on: it goes as one whole-path request, and async
    sends no more requests than sync (before: one extra single-segment request per path)."""
    params = dict(width=4, branch=2, segment_tokens=8, max_depth=8, init_branch=2)
    sampling = SamplingParams(max_new_tokens=64)
    shapes, counts = [], []
    for schedule in ("sync", "async"):
        engine = ScriptedEngine(no_eos(), eos_token_id=EOS, segmented=True)
        tree = await TreeSampler(engine, decode).sample(
            PROMPT, TreeParams(**params, schedule=schedule), sampling, seed=3
        )
        shapes.append([(n.id, n.parent, n.token_ids) for n in tree.nodes])
        counts.append(len(engine.requests))
    assert shapes[0] == shapes[1]
    assert counts == [2 + 4, 2 + 4]  # level 1, then every path of the full level 2 to the end at once


@pytest.mark.parametrize("segmented", [False, True])
@pytest.mark.parametrize("max_new_tokens", [40, 64])  # the token budget ends paths / the depth limit (48)
async def test_requests_ask_the_engine_to_keep_exactly_the_segments_that_may_be_continued(
    segmented: bool, max_new_tokens: int
):
    """`keep_cached` (the engine holds the stopped segment for its tree): on a request whose path could
    grow after it, never on one that reaches the depth limit or the token budget, nor on sequential ones."""
    params = TreeParams(width=4, branch=2, segment_tokens=8, max_depth=6, init_branch=2)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    limit = min(max_new_tokens, 6 * 8)
    engine = ScriptedEngine(no_eos(), eos_token_id=EOS, segmented=segmented)
    await TreeSampler(engine, decode).sample(PROMPT, params, sampling, seed=3)
    ends = [len(r.input_ids) - len(PROMPT) + r.max_new_tokens for r in engine.requests]
    assert [r.keep_cached for r in engine.requests] == [end < limit for end in ends]
    assert any(end < limit for end in ends) and any(end == limit for end in ends)
    before = len(engine.requests)
    await TreeSampler(engine, decode).sample_sequential(PROMPT, params, sampling, seed=3)
    assert not any(r.keep_cached for r in engine.requests[before:])
