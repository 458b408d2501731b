"""Prefixes that several requests of one call share but the cache lacks: computed once, before the batch.

The radix cache only helps across calls. Within a call, TreePO sends e.g. several copies of a fresh
prompt (init_branch) or siblings whose common parent was evicted; without this step each row would
prefill the shared tokens again. We find, per request, the longest prefix it shares with any other
request (sorted order: the longest shared prefix is with a neighbour), keep the maximal ones, and
let the engine prefill them first so every request of the call then finds them in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise


@dataclass(slots=True)
class SharedPrefix:
    token_ids: list[int]
    owner: int  # the request the computation is accounted to (its reported cached_tokens shrink)


def shared_prefixes(inputs: list[list[int]], cached: list[int], *, min_tokens: int = 4) -> list[SharedPrefix]:
    """Maximal uncached prefixes shared by >= 2 requests and longer than `cached` by >= `min_tokens`.

    A shared prefix stops one token short of each request's input (that token gives the request's
    logits), and nested shared prefixes are dropped: computing the longest also caches the shorter.
    """
    assert len(inputs) == len(cached), f"{len(inputs)=} {len(cached)=}"
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    shared = [0] * len(inputs)
    for a, b in pairwise(order):
        common = _common_length(inputs[a], inputs[b])
        shared[a], shared[b] = max(shared[a], common), max(shared[b], common)
    candidates: dict[tuple[int, ...], int] = {}
    for i in order:
        length = min(shared[i], len(inputs[i]) - 1)
        if length - cached[i] >= min_tokens:
            prefix = tuple(inputs[i][:length])
            candidates[prefix] = min(candidates.get(prefix, i), i)
    keys = sorted(candidates)
    maximal = [k for k, nxt in zip(keys, [*keys[1:], ()], strict=False) if nxt[: len(k)] != k]
    return [SharedPrefix(list(k), candidates[k]) for k in maximal]


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
