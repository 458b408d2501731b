"""Tree invariants on random scripted engines and random tree parameters (hypothesis)."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sampler_helpers import EOS, PROMPT, check_invariants, decode, random_script

from treepo.client.schema import SamplingParams, TreeParams
from treepo.service.engine.batcher import BatchingEngine
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


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=tree_params(),
    eos_prob=st.sampled_from([0.0, 0.05, 0.2, 0.6]),
    max_new_tokens=st.one_of(st.none(), st.integers(1, 30)),
    max_batch_size=st.one_of(st.none(), st.integers(1, 5)),
    seed=st.integers(0, 2**31),
)
def test_tree_invariants(
    params: TreeParams, eos_prob: float, max_new_tokens: int | None, max_batch_size: int | None, seed: int
) -> None:
    scripted = ScriptedEngine(random_script(eos_prob), eos_token_id=EOS)
    engine = BatchingEngine(scripted, max_batch_size=max_batch_size)
    engine_decoded: list[int] = []
    engine.add_listener(lambda record: engine_decoded.extend(len(out.output_ids) for out in record.outputs))
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    tree = asyncio.run(TreeSampler(engine, decode).sample(PROMPT, params, sampling, seed=seed))
    limit = max_new_tokens or params.segment_tokens * params.max_depth
    check_invariants(tree, params, limit)
    assert all(r.max_new_tokens <= params.segment_tokens for call in scripted.calls for r in call)
    # no token decoded twice: what the engine decoded is exactly the tree's unique (node) tokens
    assert tree.stats.decoded_tokens == sum(engine_decoded)
