"""Fallback cut points (TREEPO.md §1.5): window boundaries, the depth clamp, cuts inside a node (W != l)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from sampler_helpers import EOS, PROMPT, decode

from treepo.client.schema import TreeParams
from treepo.service.engine.protocol import GenerateOutput
from treepo.service.sampler.fallback import locate_cut, random_cut, reopen
from treepo.service.sampler.paths import Path, TreeBuilder
from treepo.service.sampler.rules import StopRules


@pytest.mark.parametrize(
    ("length", "window", "cuts"),
    [(12, 4, {0, 4, 8}), (11, 4, {0, 4, 8}), (4, 4, {0}), (3, 4, {0}), (1, 4, {0}), (10, 3, {0, 3, 6, 9})],
)
def test_random_cut_is_uniform_over_window_boundaries(length: int, window: int, cuts: set[int]) -> None:
    rng = random.Random(0)
    counts = Counter(random_cut(length, window, rng) for _ in range(3000))
    assert set(counts) == cuts
    assert min(counts.values()) > 3000 / len(cuts) * 0.8


def chain(segments: list[list[int]], max_depth: int = 4) -> TreeBuilder:
    """A builder holding one path of the given segments, the last one ending the path with EOS."""
    rules = StopRules.from_params(TreeParams(max_depth=max_depth), frozenset({EOS}), max_new_tokens=100)
    builder = TreeBuilder(list(PROMPT), rules, decode)
    path = Path(None, 0)
    for step, tokens in enumerate(segments, start=1):
        output = GenerateOutput(tokens, [-0.5] * len(tokens), "length", 0, len(tokens))
        path, _ = builder.grow(path, f"{step}-0", output)
    return builder


SEGMENTS = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, EOS]]


@pytest.mark.parametrize(
    ("cut", "max_depth", "node_id", "kept"),
    [(0, 4, None, 0), (4, 4, "1-0", 4), (8, 4, "2-0", 8), (8, 2, "1-0", 4), (4, 1, None, 0)],
)
def test_cut_on_a_boundary_keeps_whole_nodes(
    cut: int, max_depth: int, node_id: str | None, kept: int
) -> None:
    builder = chain(SEGMENTS, max_depth)
    point = locate_cut(builder, "3-0", cut, max_depth)
    assert (point.node_id, point.tokens) == (node_id, kept)
    assert len(builder.nodes) == 3  # nothing split


def test_cut_inside_a_node_splits_it() -> None:
    builder = chain(SEGMENTS)
    point = locate_cut(builder, "3-0", 6, max_depth=4)
    assert (point.node_id, point.tokens) == ("2-0", 6)
    nodes = builder.nodes
    assert nodes["2-0"].token_ids == [21, 22] and nodes["2-0.2"].token_ids == [23, 24]
    assert nodes["2-0.2"].parent == "2-0" and nodes["3-0"].parent == "2-0.2"
    assert [n.depth for n in builder.path_nodes("3-0")] == [1, 2, 3, 4]
    assert [t for n in builder.path_nodes("3-0") for t in n.token_ids] == [t for s in SEGMENTS for t in s]
    assert builder.path_to(point.node_id).response_ids == [11, 12, 13, 14, 21, 22]


def test_splitting_a_leaf_moves_the_leaf_to_its_tail() -> None:
    builder = chain(SEGMENTS)
    locate_cut(builder, "3-0", 9, max_depth=4)
    assert builder.leaves == ["3-0.1"]
    assert builder.nodes["3-0.1"].finish_reason == "eos" and builder.nodes["3-0"].finish_reason is None
    assert builder.nodes["3-0"].text == decode([31])


def test_cut_inside_a_node_at_max_depth_is_clamped() -> None:
    builder = chain(SEGMENTS, max_depth=3)
    point = locate_cut(builder, "3-0", 9, max_depth=3)
    assert (point.node_id, point.tokens) == ("2-0", 8)
    assert len(builder.nodes) == 3


def test_reopen_copies_min_b_remaining_per_candidate() -> None:
    builder = chain(SEGMENTS)
    params = TreeParams(width=4, branch=3, segment_tokens=4, max_depth=4)
    paths = reopen(builder, params, random.Random(0))
    assert len(paths) == 3  # one candidate: min(b=3, remaining=3)
    assert len({p.node_id for p in paths}) == 1
    assert builder.counts.num_fallbacks == 1


def test_reopen_without_candidates_samples_fresh_from_the_prompt() -> None:
    builder = chain([[11, 12, 13, 14]] * 2, max_depth=2)
    assert [builder.nodes[leaf].finish_reason for leaf in builder.leaves] == ["max_depth"]  # not a candidate
    params = TreeParams(width=8, branch=2, segment_tokens=4, max_depth=2)
    paths = reopen(builder, params, random.Random(0))
    assert [(p.node_id, p.response_ids) for p in paths] == [(None, [])] * 2
    anyone = reopen(builder, params.model_copy(update={"fallback_candidates": "any"}), random.Random(0))
    assert len(anyone) == 2 and builder.counts.num_fallbacks == 2
