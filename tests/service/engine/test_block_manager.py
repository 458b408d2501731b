"""BlockManager: slot tables from the radix cache, and the stopped-row index continuations are admitted from."""

from __future__ import annotations

import pytest
import torch

from treepo.service.engine.block_manager import HOLD_GRACE_STEPS, BlockManager
from treepo.service.engine.kv_pool import KVShape
from treepo.service.engine.sequence import Sequence

SHAPE = KVShape(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32)


def new_row(tokens: list[int], max_new_tokens: int = 3, **fields) -> Sequence:
    return Sequence(list(tokens), max_new_tokens, frozenset(), 1.0, 1.0, -1, seed=0, **fields)


def step(blocks: BlockManager, row: Sequence, token: int) -> None:
    """One forward step of a running row: its uncomputed tokens fed, `token` sampled."""
    row.num_scheduled = row.num_uncomputed
    blocks.allocate_step([row])
    row.num_computed += row.num_scheduled
    row.num_scheduled = 0
    row.append(token, 0.0)


def run_row(blocks: BlockManager, row: Sequence, sampled: list[int]) -> None:
    """Admit, prefill, decode `sampled` as the engine would (the last sampled token is never fed), release."""
    assert blocks.try_admit(row)
    for token in sampled:
        step(blocks, row, token)
    blocks.release(row)


@pytest.fixture
def blocks() -> BlockManager:
    return BlockManager(64, SHAPE, max_rows=4, max_row_tokens=64)


def table_after_a_step(blocks: BlockManager, row: Sequence) -> list[int]:
    """The row's slot table once its first step is allocated (admission fills tables at the next step)."""
    row.num_scheduled = row.num_uncomputed
    blocks.allocate_step([row])
    return blocks.slot_table[blocks.table_row[row.seq_id], : row.num_cached_tokens].tolist()


def cached_slots(blocks: BlockManager, tokens: list[int]) -> list[int]:
    return list(blocks.radix.match_prefix(tokens).indices)


def test_a_continuation_is_admitted_from_the_stopped_row_without_a_radix_walk(blocks, monkeypatch):
    parent = new_row([5, 6, 7])
    run_row(blocks, parent, [8, 9, 10])  # computes 5 tokens: 5 6 7 8 9 (10 sampled, never fed)
    expected = cached_slots(blocks, parent.token_ids[:-1])
    assert len(expected) == 5

    def walk(_):
        raise AssertionError("a continuation of a stopped row walked the radix tree")

    monkeypatch.setattr(blocks.radix, "match_prefix", walk)
    child = new_row(parent.token_ids)  # the next segment: the parent's tokens + the one it sampled
    assert blocks.try_admit(child)
    assert child.num_cached_tokens == 5
    assert table_after_a_step(blocks, child) == expected
    assert blocks.radix.protected_size == 5  # the parent's tokens are locked while the child runs


def test_an_evicted_stopped_row_falls_back_to_the_radix_tree(blocks):
    parent = new_row([5, 6, 7])
    run_row(blocks, parent, [8, 9, 10])
    blocks.radix.evict(blocks.radix.evictable_size)  # every cached token goes; its slots can be reused
    assert blocks.radix.total_size == 0
    run_row(blocks, new_row([1, 2, 3, 4]), [11])  # takes freed slots
    child = new_row(parent.token_ids)
    assert blocks.try_admit(child)
    assert child.num_cached_tokens == 0  # nothing of the parent is cached any more: no stale slots


def test_a_continuation_after_a_split_keeps_the_stopped_rows_slots(blocks):
    parent = new_row([5, 6, 7])
    run_row(blocks, parent, [8, 9, 10])
    expected = cached_slots(blocks, parent.token_ids[:-1])
    run_row(blocks, new_row([5, 6, 1]), [2])  # splits the parent's edge after 5 6
    child = new_row(parent.token_ids)
    assert blocks.try_admit(child)
    assert child.num_cached_tokens == 5
    assert table_after_a_step(blocks, child) == expected


def test_flush_forgets_the_stopped_rows(blocks):
    parent = new_row([5, 6, 7])
    run_row(blocks, parent, [8, 9, 10])
    blocks.flush()
    child = new_row(parent.token_ids)
    assert blocks.try_admit(child)
    assert child.num_cached_tokens == 0


def test_the_index_is_bounded(blocks):
    for first in range(100):
        run_row(blocks, new_row([first, 1]), [2])
    # each row computed 2 tokens: the index keeps the newest rows within 2 tokens per KV slot (64 slots)
    assert blocks._stopped_tokens == sum(len(key) for key in blocks._stopped) <= 2 * 64
    assert len(blocks._stopped) == 64 and (99, 1) in blocks._stopped and (0, 1) not in blocks._stopped


def test_a_row_released_before_its_first_step_leaves_true_slots(blocks):
    parent = new_row([5, 6, 7])
    run_row(blocks, parent, [8, 9, 10])
    expected = cached_slots(blocks, parent.token_ids[:-1])
    run_row(blocks, new_row([1, 2, 3, 4]), [11])  # leaves other slots in the table line reused next
    child = new_row(parent.token_ids)
    assert blocks.try_admit(child)
    blocks.release(child)  # aborted at once: its prefix fill was still pending
    _node, slots = blocks._stopped[tuple(parent.token_ids[:-1])]
    assert list(slots) == expected
    assert blocks.radix.protected_size == 0


def stopped_segment(blocks: BlockManager) -> Sequence:
    """An older tree's segment stopped at its length (5 tokens cached, held) while a sibling waits."""
    sibling = new_row([1, 2, 3, 4], priority=0)
    blocks.arrive(sibling)  # its tree still has work in the engine
    segment = new_row([1, 2, 3], priority=0, keep_cached=True)
    blocks.arrive(segment)
    run_row(blocks, segment, [8, 9, 10])
    blocks.leave(segment)
    assert segment.finish_reason == "length" and blocks.radix.evictable_size == 5
    return sibling


def test_a_newer_tree_may_not_evict_a_live_older_trees_kept_segment():
    blocks = BlockManager(32, SHAPE, max_rows=4, max_row_tokens=64)
    sibling = stopped_segment(blocks)
    running = new_row([7, 8], max_new_tokens=20, priority=1)  # reserves 21 of the 27 free slots
    assert blocks.try_admit(running)
    newer = new_row([20, 21, 22, 23, 24], max_new_tokens=4, priority=1)  # needs 8: fits only by evicting
    assert not blocks.try_admit(newer)
    older = new_row([30, 31, 32, 33, 34], max_new_tokens=4, priority=0)  # the same need, older work: may
    assert blocks.try_admit(older)
    blocks.release(older)
    blocks.leave(sibling)  # the older tree has no work left here: the hold ends after a grace period
    for token in range(HOLD_GRACE_STEPS):
        step(blocks, running, 40 + token)
        assert not blocks.try_admit(newer)
    step(blocks, running, 50)
    assert blocks.try_admit(newer)


def test_eviction_takes_a_kept_segment_last():
    blocks = BlockManager(16, SHAPE, max_rows=4, max_row_tokens=64)
    stopped_segment(blocks)
    run_row(blocks, new_row([60, 61, 62]), [63, 64, 65])  # 5 more cached tokens, newer, not kept
    running = new_row([70, 71], max_new_tokens=9, priority=0)  # 12 slots: 6 free, 5 evicted
    assert blocks.try_admit(running)
    for token in range(9):
        step(blocks, running, 80 + token)
    assert blocks.radix.match_prefix([1, 2, 3, 8, 9]).length == 5  # the kept segment is still cached
    assert blocks.radix.match_prefix([60, 61, 62]).length == 0


def test_with_nothing_running_a_newer_row_may_evict_a_kept_segment():
    blocks = BlockManager(8, SHAPE, max_rows=4, max_row_tokens=64)
    stopped_segment(blocks)  # 5 of 8 slots held for a live older tree
    assert blocks.try_admit(new_row([20, 21], max_new_tokens=3, priority=1))  # else it would wait forever
