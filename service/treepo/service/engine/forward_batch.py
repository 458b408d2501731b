"""The tensors of one engine step, built from the scheduled rows and the block manager's slot table.

Rows fed one token (decoding, or a new request whose input is cached but its last token) form attention
groups whose (B, K) key-slot matrix is a single `index_select` of the slot table; rows fed a chunk of
their input form another, padded group. Attention reads every row's keys up to its group's longest row,
so when rows of very different lengths decode together (a tree's levels, trees of different ages) the
one-token rows are cut by length into up to four groups wherever a cut saves more key reads than a group
costs. Everything is built with one pass over the rows and a
handful of tensor ops, so a step's bookkeeping stays small next to the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from treepo.service.engine.host_tensors import int64_tensor
from treepo.service.engine.sequence import Sequence


@dataclass(slots=True)
class AttentionGroup:
    """Rows attended together: their key slots, the additive mask and where their queries sit."""

    key_slots: torch.Tensor  # (B, K) pool slots (beyond a row's length: some valid slot, masked)
    mask: torch.Tensor  # (B, 1, Q, K) float: 0 = attend, -inf = hidden
    flat_index: torch.Tensor | None  # the group's tokens in the step's flat order; None = all, in order
    token_index: torch.Tensor | None = None  # (B, Q) flat token of each query (chunks only; 0 = padding)
    token_valid: torch.Tensor | None = None  # (B, Q) bool (chunks only)


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) the step's new tokens, row after row
    positions: torch.Tensor  # (T,)
    write_slots: torch.Tensor  # (T,) pool slot of each new token's KV
    logits_index: torch.Tensor  # (R,) flat index of the tokens to sample from (rows whose input is done)
    max_position: int
    groups: list[AttentionGroup]

    @property
    def is_whole_decode(self) -> bool:
        """One query per row covering the step's tokens in order: no scatter back."""
        return len(self.groups) == 1 and self.groups[0].flat_index is None


def build_batch(
    rows: Seq[Sequence],
    table_rows: Seq[int],
    slot_table: torch.Tensor,
    write_slots: torch.Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> ForwardBatch:
    """The step's tensors; `table_rows[i]` is row i's line in `slot_table` (num_rows, max_row_tokens)."""
    ids: list[int] = []
    positions: list[int] = []
    logits: list[int] = []
    single: tuple[list[int], list[int], list[int]] = ([], [], [])  # table rows, positions, flat indices
    chunks: list[tuple[int, int, int, int]] = []  # (table row, start, count, flat offset)
    for seq, table_row in zip(rows, table_rows, strict=True):
        start, count, offset = seq.num_computed, seq.num_scheduled, len(ids)
        if count == 1:
            ids.append(seq.token_ids[start])
            positions.append(start)
            single[0].append(table_row), single[1].append(start), single[2].append(offset)
        else:
            ids.extend(seq.token_ids[start : start + count])
            positions.extend(range(start, start + count))
            chunks.append((table_row, start, count, offset))
        if start + count == len(seq.token_ids):
            logits.append(len(ids) - 1)
    groups = []
    if single[0]:
        groups.extend(_single_groups(*single, slot_table, is_whole=not chunks, dtype=dtype, device=device))
    if chunks:
        groups.append(_chunk_group(chunks, slot_table, dtype=dtype, device=device))
    return ForwardBatch(
        input_ids=int64_tensor(ids).to(device),
        positions=int64_tensor(positions).to(device),
        write_slots=write_slots.to(device),
        logits_index=int64_tensor(logits).to(device),
        max_position=max(positions),
        groups=groups,
    )


MIN_SPLIT_KEYS = 1024  # key reads a cut must save to pay for another group's kernels (an estimate, not tuned)
MAX_SINGLE_GROUPS = 4


def _single_groups(table_rows, positions, flat, slot_table, *, is_whole, dtype, device):
    """One-token rows in one group, or cut by length where padding to the longest wastes most."""
    cuts = _length_cuts(sorted(positions))
    if not cuts:
        return [
            _single_group(
                table_rows, positions, flat, slot_table, is_whole=is_whole, dtype=dtype, device=device
            )
        ]
    order = sorted(range(len(positions)), key=positions.__getitem__)
    groups = []
    for start, end in zip((0, *cuts), (*cuts, len(order)), strict=True):
        members = order[start:end]
        groups.append(
            _single_group(
                [table_rows[i] for i in members],
                [positions[i] for i in members],
                [flat[i] for i in members],
                slot_table,
                is_whole=False,
                dtype=dtype,
                device=device,
            )
        )
    return groups


def _length_cuts(ascending: list[int]) -> list[int]:
    """Where to cut rows sorted by position into groups: greedily the cut saving the most padded key
    reads (rows below it pad to their own longest, not the group's), while a cut saves MIN_SPLIT_KEYS."""
    cuts: list[int] = []
    while len(cuts) < MAX_SINGLE_GROUPS - 1:
        best_saving, best_cut = MIN_SPLIT_KEYS - 1, None
        bounds = sorted((0, *cuts, len(ascending)))
        for start, end in itertools.pairwise(bounds):
            longest = ascending[end - 1]
            for cut in range(start + 1, end):
                saving = (longest - ascending[cut - 1]) * (cut - start)
                if saving > best_saving:
                    best_saving, best_cut = saving, cut
        if best_cut is None:
            break
        cuts.append(best_cut)
    return sorted(cuts)


def _single_group(table_rows, positions, flat, slot_table, *, is_whole, dtype, device) -> AttentionGroup:
    num_keys = max(positions) + 1
    key_slots = slot_table[:, :num_keys].index_select(0, int64_tensor(table_rows))  # (B, K)
    query_pos = int64_tensor(positions)[:, None, None, None]  # (B, 1, 1, 1)
    return AttentionGroup(
        key_slots=key_slots.to(device),
        mask=_mask(query_pos, num_keys, dtype).to(device),  # (B, 1, 1, K)
        flat_index=None if is_whole else int64_tensor(flat).to(device),
    )


def _chunk_group(chunks, slot_table, *, dtype, device) -> AttentionGroup:
    num_queries = max(count for _, _, count, _ in chunks)
    num_keys = max(start + count for _, start, count, _ in chunks)
    token_index, query_pos, flat = [], [], []
    for _, start, count, offset in chunks:
        pad = num_queries - count
        token_index.append([*range(offset, offset + count), *[0] * pad])
        query_pos.append([*range(start, start + count), *[0] * pad])  # padded queries see key 0: no NaN
        flat.extend(range(offset, offset + count))
    token_index_t = torch.tensor(token_index)  # (B, Q)
    valid = torch.tensor([[q < count for q in range(num_queries)] for _, _, count, _ in chunks])
    key_slots = slot_table[:, :num_keys].index_select(0, int64_tensor([row for row, *_ in chunks]))
    return AttentionGroup(
        key_slots=key_slots.to(device),
        mask=_mask(torch.tensor(query_pos)[:, None, :, None], num_keys, dtype).to(device),  # (B, 1, Q, K)
        flat_index=int64_tensor(flat).to(device),
        token_index=token_index_t.to(device),
        token_valid=valid.to(device),
    )


def _mask(query_pos: torch.Tensor, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: key j is visible to a query at position p iff j <= p."""
    hidden = torch.arange(num_keys) > query_pos  # (..., K)
    return torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))
