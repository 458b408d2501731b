"""Fallback (TREEPO.md §1.5): when a prompt has no live path and fewer than w leaves, re-open finished paths
at a random segment boundary so that every prompt ends with exactly w trajectories."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from treepo.client.schema import TreeParams
from treepo.service.sampler.paths import Path, TreeBuilder

REOPENABLE = frozenset({"answer", "eos"})


@dataclass(slots=True, frozen=True)
class CutPoint:
    """Where a re-opened path continues: after node `node_id` (None = the prompt), keeping `tokens` tokens."""

    node_id: str | None
    tokens: int


def random_cut(length: int, window: int, rng: random.Random) -> int:
    """`blocks = ceil(L/W)`, `k ~ U{1..blocks}`, `cut = (blocks - k) * W`: a window boundary before L."""
    blocks = math.ceil(length / window)
    if blocks <= 1:
        return 0
    return (blocks - rng.randint(1, blocks)) * window


def locate_cut(builder: TreeBuilder, leaf_id: str, cut: int, max_depth: int) -> CutPoint:
    """The node after which a copy of `leaf_id`'s path cut at `cut` tokens continues.

    A cut inside a node (only possible when the window differs from the segment length) splits that node, so
    the tree stays a prefix tree and no token is stored twice. The kept depth stays below `max_depth`.
    """
    ends, total = [], 0
    nodes = builder.path_nodes(leaf_id)
    for node in nodes:
        total += len(node.token_ids)
        ends.append(total)
    whole = sum(1 for end in ends if end <= cut)  # nodes kept whole
    inside = whole < len(nodes) and cut > (ends[whole - 1] if whole else 0)
    if whole + inside >= max_depth:  # the release: cut = l * (max_depth - 1)
        keep = max_depth - 1
        return CutPoint(nodes[keep - 1].id if keep else None, ends[keep - 1] if keep else 0)
    if not inside:
        return CutPoint(nodes[whole - 1].id if whole else None, cut)
    offset = cut - (ends[whole - 1] if whole else 0)
    return CutPoint(builder.split(nodes[whole].id, offset), cut)


def reopen(builder: TreeBuilder, tree: TreeParams, rng: random.Random) -> list[Path]:
    """New live paths for a prompt with no live path and fewer than `width` leaves (none if fallback off)."""
    remaining = tree.width - builder.num_leaves
    if tree.fallback == "none" or remaining <= 0:
        return []
    builder.counts.num_fallbacks += 1
    window = tree.fallback_window or tree.segment_tokens
    # leaf positions, not ids: a split earlier in this round may rename a leaf (its tail takes a new id)
    candidates = [
        index
        for index, leaf in enumerate(builder.leaves)
        if tree.fallback_candidates == "any" or builder.nodes[leaf].finish_reason in REOPENABLE
    ]
    rng.shuffle(candidates)
    if not candidates:  # one fresh sample from the prompt
        return [Path(node_id=None, depth=0) for _ in range(min(tree.branch, remaining))]
    plans: list[tuple[int, int, int]] = []  # (leaf position, kept tokens, copies)
    for index in candidates:
        if remaining == 0:
            break
        leaf = builder.leaves[index]
        length = sum(len(node.token_ids) for node in builder.path_nodes(leaf))
        point = locate_cut(builder, leaf, random_cut(length, window, rng), tree.max_depth)
        copies = min(tree.branch, remaining)
        plans.append((index, point.tokens, copies))
        remaining -= copies
    # resolve nodes only after every split of this round: a later split can move an earlier cut's node
    paths: list[Path] = []
    for index, kept, copies in plans:
        node_id = _node_ending_at(builder, builder.leaves[index], kept, tree.max_depth)
        paths.extend(builder.path_to(node_id) for _ in range(copies))
    return paths


def _node_ending_at(builder: TreeBuilder, leaf_id: str, kept: int, max_depth: int) -> str | None:
    """The node of `leaf_id`'s path ending at token `kept` (None = the prompt), moved up below max_depth."""
    if kept == 0:
        return None
    total = 0
    for node in builder.path_nodes(leaf_id):
        total += len(node.token_ids)
        if total == kept:
            if node.depth < max_depth:
                return node.id
            ancestors = builder.path_nodes(node.id)
            return ancestors[max_depth - 2].id if max_depth > 1 else None
    raise AssertionError(f"no node boundary at {kept=} on the path of {leaf_id=}")
