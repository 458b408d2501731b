"""Scripts and checks shared by the sampler tests."""

from __future__ import annotations

import itertools
import random

from treepo.client.schema import Tree, TreeParams
from treepo.service.engine.scripted import Script

EOS = 0
PROMPT = [5, 6, 7]
WORDS = {EOS: "", 7: "\\boxed{4}", 8: "ab"}


def decode(token_ids: list[int]) -> str:
    """Token 7 reads as a boxed answer, 8 as 'ab' (repetition fodder), others as 't<id> '."""
    return "".join(WORDS.get(t, f"t{t} ") for t in token_ids)


def response_of(input_ids: list[int]) -> list[int]:
    return input_ids[len(PROMPT) :]


def no_eos(vocab: int = 50) -> Script:
    """Random non-EOS tokens above 10 (no boxed answer, no repetition)."""
    return lambda input_ids, rng: [rng.randrange(10, vocab) for _ in range(64)]


def eos_at(response_len: int) -> Script:
    """Every path emits EOS as soon as its response is `response_len` tokens long."""

    def script(input_ids: list[int], rng: random.Random) -> list[int]:
        done = len(response_of(input_ids))
        return [rng.randrange(10, 50) for _ in range(max(response_len - done, 0))] + [EOS]

    return script


def first_request_dies() -> Script:
    """The very first request answers [11, EOS]; all others never stop."""
    counter = itertools.count()

    def script(input_ids: list[int], rng: random.Random) -> list[int]:
        if next(counter) == 0:
            return [11, EOS]
        return [rng.randrange(10, 50) for _ in range(64)]

    return script


def random_script(eos_prob: float) -> Script:
    """Each token is EOS with probability `eos_prob`: random early stops anywhere, index 0 included."""

    def script(input_ids: list[int], rng: random.Random) -> list[int]:
        return [EOS if rng.random() < eos_prob else rng.randrange(10, 50) for _ in range(64)]

    return script


def level_sizes(tree: Tree) -> list[int]:
    """Paths sampled per level, from the node ids "<level>-<k>" (a fallback split's tail adds ".<offset>")."""
    levels = [int(node.id.split("-")[0]) for node in tree.nodes if "." not in node.id]
    return [levels.count(level) for level in range(1, max(levels) + 1)]


def leaf_paths(tree: Tree) -> list[str]:
    return ["#".join(node.id for node in tree.path(leaf)) for leaf in tree.leaves]


def check_invariants(
    tree: Tree, params: TreeParams, max_new_tokens: int, *, exact_width: bool = True
) -> None:
    """The structural invariants every sampled tree must hold."""
    nodes = tree.node_map()
    assert len(nodes) == len(tree.nodes), "node ids must be unique"
    if exact_width:
        assert len(tree.leaves) == params.width
    assert len(set(tree.leaves)) == len(tree.leaves)
    has_child = {node.parent for node in tree.nodes}
    for node in tree.nodes:
        assert len(node.token_ids) <= params.segment_tokens
        if node.parent is None:
            assert node.depth == 1
        else:
            assert node.parent in nodes and node.depth == nodes[node.parent].depth + 1
        assert (node.finish_reason is not None) == (node.id in tree.leaves)
        assert (node.id in has_child) != (node.id in tree.leaves), f"{node.id} is a dangling interior node"
    assert len(set(leaf_paths(tree))) == len(tree.leaves), "leaf paths must be unique"
    trajectories = tree.trajectories()
    assert all(len(tokens) <= max_new_tokens for _, tokens in trajectories)
    assert tree.stats.decoded_tokens == sum(len(node.token_ids) for node in tree.nodes)
    assert tree.stats.independent_tokens == sum(len(tokens) for _, tokens in trajectories)
    assert tree.stats.num_nodes == len(tree.nodes) and tree.stats.num_leaves == len(tree.leaves)
    assert sum(tree.stats.finish_reasons.values()) == len(tree.leaves)
