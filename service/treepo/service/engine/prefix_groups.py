"""Prefixes that several requests of one call share but the cache lacks: computed once, before the batch.

The radix cache only helps across calls. Within a call, TreePO sends e.g. several copies of a fresh
prompt (init_branch) or siblings whose common parent was evicted; without this step each row would
prefill the shared tokens again. The prefixes shared by requests are the longest common prefixes of
neighbours in sorted order (the branch points of the call's token trie). They nest, so they come in
levels: level 0 has no shared ancestor, level k extends one of level k - 1. The engine prefills level
by level, each pass reusing the KV the previous one inserted, so every shared token is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise


@dataclass(slots=True)
class SharedPrefix:
    token_ids: list[int]
    owner: int  # the request the computation is accounted to (its reported cached_tokens shrink)


def shared_prefixes(
    inputs: list[list[int]], cached: list[int], *, min_tokens: int = 4
) -> list[list[SharedPrefix]]:
    """Levels of shared prefixes worth computing first (each adds >= `min_tokens` to what is cached).

    A shared prefix stops one token short of each input that shares it (that last token gives the
    request's logits). `cached` is how much of each input the cache holds already.
    """
    assert len(inputs) == len(cached), f"{len(inputs)=} {len(cached)=}"
    owners: dict[tuple[int, ...], int] = {}
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    for a, b in pairwise(order):
        length = min(_common_length(inputs[a], inputs[b]), len(inputs[a]) - 1, len(inputs[b]) - 1)
        if length > 0:
            prefix = tuple(inputs[a][:length])
            owners[prefix] = min(owners.get(prefix, a), a, b)
    levels: list[list[SharedPrefix]] = []
    chain: list[tuple[int, ...]] = []  # kept shared prefixes that are prefixes of the current key
    for key in sorted(owners):  # a prefix sorts right before its extensions
        while chain and key[: len(chain[-1])] != chain[-1]:
            chain.pop()
        owner = owners[key]
        base = max(len(chain[-1]) if chain else 0, min(cached[owner], len(key)))
        if len(key) - base < min_tokens:
            continue
        if len(levels) == len(chain):
            levels.append([])
        levels[len(chain)].append(SharedPrefix(list(key), owner))
        chain.append(key)
    return levels


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
