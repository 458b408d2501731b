"""Tree invariants, and async = sync, on random scripted engines and random tree parameters (hypothesis)."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sampler_helpers import EOS, PROMPT, check_invariants, decode, random_script

from treepo.client.schema import SamplingParams, Tree, TreeParams
from treepo.service.engine.protocol import EngineWrapper, GenerateOutput, GenerateRequest
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.sampler import TreeSampler

SPLITS = ["fixed_avg", "low_prob", "high_prob", "low_path_prob", "high_path_prob", "low_path_mean_prob"]


@st.composite
def tree_params(draw: st.DrawFn) -> TreeParams:
    low = draw(st.integers(1, 4))
    init = draw(st.one_of(st.integers(1, 6), st.tuples(st.just(low), st.integers(low, 8))))
    return TreeParams(
        width=draw(st.integers(1, 12)),
        branch=draw(st.integers(1, 4)),
        segment_tokens=draw(st.integers(1, 5)),
        max_depth=draw(st.integers(1, 5)),
        init_branch=init,
        split=draw(st.sampled_from(SPLITS)),
        split_temperature=draw(st.sampled_from([0.5, 2.0])),
        fallback_window=draw(st.one_of(st.none(), st.integers(1, 7))),
        fallback_candidates=draw(st.sampled_from(["answer_or_eos", "any"])),
        schedule=draw(st.sampled_from(["sync", "async"])),
    )


class Recorder(EngineWrapper):
    """Keeps every request and how many tokens the engine decoded for it."""

    def __init__(self, inner: ScriptedEngine) -> None:
        super().__init__(inner)
        self.requests: list[GenerateRequest] = []
        self.decoded = 0

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        self.requests.append(request)
        output = await self.inner.generate(request)
        self.decoded += len(output.output_ids)
        return output


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=tree_params(),
    eos_prob=st.sampled_from([0.0, 0.05, 0.2, 0.6]),
    max_new_tokens=st.one_of(st.none(), st.integers(1, 30)),
    jitter_s=st.sampled_from([0.0, 0.001]),
    seed=st.integers(0, 2**31),
    segmented=st.booleans(),
)
def test_tree_invariants(
    params: TreeParams,
    eos_prob: float,
    max_new_tokens: int | None,
    jitter_s: float,
    seed: int,
    segmented: bool,
) -> None:
    scripted = ScriptedEngine(
        random_script(eos_prob), eos_token_id=EOS, jitter_s=jitter_s, segmented=segmented
    )
    engine = Recorder(scripted)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    tree = asyncio.run(TreeSampler(engine, decode).sample(PROMPT, params, sampling, seed=seed))
    limit = max_new_tokens or params.segment_tokens * params.max_depth
    check_invariants(tree, params, limit)
    for request in engine.requests:  # several segments per request only on an engine that takes them
        assert request.max_new_tokens <= params.segment_tokens * max(1, len(request.segment_seeds))
        assert segmented or not request.segment_seeds
    # no token decoded twice: what the engine decoded is the tree's node tokens, plus (several segments per
    # request) the segments decoded past a path's stop, which the tree counts as decoded too
    assert tree.stats.decoded_tokens == engine.decoded
    assert segmented or engine.decoded == sum(len(n.token_ids) for n in tree.nodes)
    assert tree.stats.engine_calls == len(engine.requests)


def shape(tree: Tree) -> list[tuple]:
    return [(n.id, n.parent, n.token_ids, n.finish_reason) for n in tree.nodes] + [tuple(tree.leaves)]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=tree_params(),
    eos_prob=st.sampled_from([0.0, 0.05, 0.2, 0.6]),
    max_new_tokens=st.one_of(st.none(), st.integers(1, 30)),
    jitter_seed=st.integers(0, 2**16),
    seed=st.integers(0, 2**31),
)
def test_async_builds_the_same_tree_as_sync_whatever_the_timing(
    params: TreeParams, eos_prob: float, max_new_tokens: int | None, jitter_seed: int, seed: int
) -> None:
    """The same seed gives the same tree in both schedules, one request per segment or a full tree's paths
    in one request each, with random engine delays and other trees' requests in flight next to it (the engine
    returns requests in a shuffled order)."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    prompts = [PROMPT, [9, *PROMPT], [4, 4]]

    async def sample_all(schedule: str, jitter_s: float, segmented: bool) -> list[Tree]:
        engine = ScriptedEngine(
            random_script(eos_prob),
            eos_token_id=EOS,
            jitter_s=jitter_s,
            jitter_seed=jitter_seed,
            segmented=segmented,
        )
        sampler, tree = TreeSampler(engine, decode), params.model_copy(update={"schedule": schedule})
        return await asyncio.gather(*(sampler.sample(p, tree, sampling, seed=seed) for p in prompts))

    reference = asyncio.run(sample_all("sync", 0.0, segmented=False))  # one request per segment
    for schedule in ("sync", "async"):
        for segmented in (False, True):  # a full tree's remaining segments in one request per path
            trees = asyncio.run(sample_all(schedule, 0.001, segmented))
            assert [shape(t) for t in trees] == [shape(t) for t in reference], (schedule, segmented)
