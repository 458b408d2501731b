"""BlockManager: slot tables from the radix cache, and the stopped-row index continuations are admitted from."""

from __future__ import annotations

import pytest
import torch

from treepo.service.engine.block_manager import BlockManager
from treepo.service.engine.kv_pool import KVShape
from treepo.service.engine.sequence import Sequence

SHAPE = KVShape(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32)


def new_row(tokens: list[int], max_new_tokens: int = 3) -> Sequence:
    return Sequence(list(tokens), max_new_tokens, frozenset(), 1.0, 1.0, -1, seed=0)


def run_row(blocks: BlockManager, row: Sequence, sampled: list[int]) -> None:
    """Admit, prefill, decode `sampled` as the engine would (the last sampled token is never fed), release."""
    assert blocks.try_admit(row)
    for token in sampled:
        row.num_scheduled = row.num_uncomputed
        blocks.allocate_step([row])
        row.num_computed += row.num_scheduled
        row.num_scheduled = 0
        row.append(token, 0.0)
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
