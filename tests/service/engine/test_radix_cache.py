"""RadixCache: matching, splitting, insertion, locking and LRU eviction (CPU only, no model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treepo.service.engine.radix_cache import RadixCache


def slots(start: int, n: int) -> tuple[int, ...]:
    return tuple(range(start, start + n))


def edges(cache: RadixCache) -> list[tuple[int, ...]]:
    """Every edge key, depth first in sorted order: the shape of the tree."""
    out, stack = [], [cache.root]
    while stack:
        node = stack.pop()
        out.extend(child.key for child in node.children.values())
        stack.extend(sorted(node.children.values(), key=lambda n: n.key, reverse=True))
    return sorted(out)


class TestRadixCache:
    @pytest.mark.parametrize(
        ("inserted", "query", "expected_length", "expected_edges"),
        [
            ([[1, 2, 3]], [1, 2, 3], 3, [(1, 2, 3)]),
            ([[1, 2, 3]], [1, 2, 3, 4], 3, [(1, 2, 3)]),
            ([[1, 2, 3]], [1, 2], 2, [(1, 2), (3,)]),  # partial match splits the edge
            ([[1, 2, 3]], [1, 5], 1, [(1,), (2, 3)]),
            ([[1, 2, 3]], [4], 0, [(1, 2, 3)]),
            ([[1, 2, 3], [1, 2, 4]], [1, 2, 4, 9], 3, [(1, 2), (3,), (4,)]),
            ([[1, 2, 3], [1, 2, 4], [7]], [7, 7], 1, [(1, 2), (3,), (4,), (7,)]),
            ([], [1], 0, []),
        ],
    )
    def test_match_prefix(self, inserted, query, expected_length, expected_edges):
        cache = RadixCache()
        next_slot = 1
        for key in inserted:
            present = cache.match_prefix(key).length
            cache.insert(key, cache.match_prefix(key).indices + slots(next_slot, len(key) - present))
            next_slot += len(key) - present
        match = cache.match_prefix(query)
        assert match.length == expected_length
        assert edges(cache) == expected_edges
        assert cache.total_size == sum(len(e) for e in expected_edges)

    def test_match_returns_the_slots_of_each_token(self):
        cache = RadixCache()
        cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
        cache.insert([1, 2, 5], [10, 11, 20])
        assert list(cache.match_prefix([1, 2, 3, 9]).indices) == [10, 11, 12]
        assert list(cache.match_prefix([1, 2, 5]).indices) == [10, 11, 20]

    def test_insert_reports_the_cached_prefix_and_keeps_the_first_slots(self):
        cache = RadixCache()
        assert cache.insert([1, 2, 3], [10, 11, 12]) == 0
        assert cache.insert([1, 2, 3, 4], [50, 51, 52, 13]) == 3
        assert list(cache.match_prefix([1, 2, 3, 4]).indices) == [10, 11, 12, 13]
        assert cache.insert([1, 2], [60, 61]) == 2
        assert cache.total_size == 4

    def test_extend_inserts_below_a_node_and_returns_the_cached_slots(self):
        cache = RadixCache()
        _, node = cache.insert_node([1, 2, 3], [10, 11, 12])
        cache.insert([1, 2, 3, 4, 5], [10, 11, 12, 13, 14])  # a sibling cached 4, 5 meanwhile
        present, end, tree_slots = cache.extend(node, [4, 5, 6], [40, 41, 42])
        assert present == 2 and list(tree_slots) == [13, 14]
        assert list(cache.match_prefix([1, 2, 3, 4, 5, 6]).indices) == [10, 11, 12, 13, 14, 42]
        assert cache.match_prefix([1, 2, 3, 4, 5, 6]).last_node is end and cache.total_size == 6

    def test_evict_frees_least_recently_used_leaves_first(self):
        freed: list[list[int]] = []
        cache = RadixCache(on_evict=lambda s: freed.append(list(s)))
        cache.insert([1, 2], slots(1, 2))
        cache.insert([3, 4], slots(3, 2))
        cache.insert([5, 6], slots(5, 2))
        cache.match_prefix([1, 2])  # touch: [3, 4] is now the oldest, then [5, 6]
        assert cache.evict(1) == 2
        assert freed == [[3, 4]]
        assert cache.evict(3) == 4
        assert freed == [[3, 4], [5, 6], [1, 2]]
        assert cache.total_size == 0 and edges(cache) == []

    def test_evict_takes_held_leaves_last_the_newest_rank_first(self):
        freed: list[list[int]] = []
        cache = RadixCache(on_evict=lambda s: freed.append(list(s)))
        _, old_tree = cache.insert_node([1, 2], slots(1, 2))  # oldest access, held for rank 0
        _, new_tree = cache.insert_node([3, 4], slots(3, 2))  # held for rank 5
        cache.insert([5, 6], slots(5, 2))  # newest access, held for nothing
        ranks = {old_tree: 0, new_tree: 5}
        assert cache.evict(1, hold=ranks.get) == 2 and freed == [[5, 6]]
        assert cache.evict(1, hold=ranks.get) == 2 and freed[-1] == [3, 4]  # the newer work's first
        assert cache.evict(1, hold=ranks.get) == 2 and freed[-1] == [1, 2]
        assert cache.total_size == 0

    def test_held_leaves_set_aside_stay_evictable(self):
        freed: list[list[int]] = []
        cache = RadixCache(on_evict=lambda s: freed.append(list(s)))
        _, held = cache.insert_node([1, 2], slots(1, 2))
        cache.insert([3, 4], slots(3, 2))
        assert cache.evict(1, hold={held: 0}.get) == 2 and freed == [[3, 4]]
        assert cache.evict(1) == 2 and freed[-1] == [1, 2]  # without the hold: plain LRU again

    def test_evict_climbs_to_parents_that_become_leaves(self):
        freed: list[list[int]] = []
        cache = RadixCache(on_evict=lambda s: freed.append(list(s)))
        cache.insert([1, 2, 3], slots(1, 3))
        cache.insert([1, 2, 4], [1, 2, 9])
        cache.insert([8], slots(20, 1))
        cache.match_prefix([8])
        assert cache.evict(4) == 4
        assert sorted(freed) == [[1, 2], [3], [9]]
        assert cache.match_prefix([8]).length == 1

    def test_locked_nodes_are_never_evicted(self):
        cache = RadixCache()
        cache.insert([1, 2, 3], slots(1, 3))
        cache.insert([4, 5], slots(4, 2))
        match = cache.match_prefix([1, 2])  # splits; lock the upper part only
        cache.inc_lock_ref(match.last_node)
        assert cache.protected_size == 2 and cache.evictable_size == 3
        assert cache.evict(100) == 3  # [3] below the lock and [4, 5] go; [1, 2] stays
        assert cache.match_prefix([1, 2, 3]).length == 2
        cache.dec_lock_ref(match.last_node)
        assert cache.protected_size == 0 and cache.evictable_size == 2
        assert cache.evict(100) == 2 and cache.total_size == 0

    def test_lock_survives_a_split_below_it(self):
        cache = RadixCache()
        cache.insert([1, 2, 3, 4], slots(1, 4))
        match = cache.match_prefix([1, 2, 3, 4])
        cache.inc_lock_ref(match.last_node)
        cache.match_prefix([1, 2])  # splits the locked edge
        assert cache.evict(100) == 0
        assert cache.protected_size == 4
        cache.dec_lock_ref(match.last_node)
        assert cache.evictable_size == 4 and cache.evict(100) == 4

    def test_unbalanced_unlock_is_an_error(self):
        cache = RadixCache()
        cache.insert([1], slots(1, 1))
        with pytest.raises(AssertionError):
            cache.dec_lock_ref(cache.match_prefix([1]).last_node)

    def test_reset_empties_the_tree(self):
        cache = RadixCache()
        cache.insert([1, 2], slots(1, 2))
        cache.reset()
        assert cache.match_prefix([1, 2]).length == 0 and cache.total_size == 0


@settings(max_examples=60, deadline=None)
@given(
    sequences=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=12),
    evict_tokens=st.integers(0, 40),
)
def test_random_inserts_keep_every_prefix_on_its_first_slots(sequences, evict_tokens):
    """Property: a cached prefix always maps to the slots given when it was first inserted; sizes add up."""
    freed: list[int] = []
    cache = RadixCache(on_evict=lambda s: freed.extend(list(s)))
    slot_of: dict[tuple[int, ...], int] = {}  # prefix -> slot of its last token
    for seq in sequences:
        match = cache.match_prefix(seq)
        new = slots(1 + len(slot_of), len(seq) - match.length)
        for n in range(match.length + 1, len(seq) + 1):
            slot_of[tuple(seq[:n])] = int(new[n - match.length - 1])
        assert cache.insert(seq, match.indices + new) == match.length
    assert cache.total_size == len(slot_of)
    assert cache.evict(evict_tokens) >= min(evict_tokens, len(slot_of))
    assert cache.total_size + len(freed) == len(slot_of)
    for prefix, slot in slot_of.items():
        match = cache.match_prefix(prefix)
        if match.length == len(prefix):
            assert int(match.indices[-1]) == slot
        else:
            assert slot in freed
