"""Per-row slot tables into the KV pool, owned together with the radix tree (the prefix cache).

A running row's table lists the pool slot of each of its tokens in order: first the cached prefix (slots
owned by the tree, locked while the row runs), then slots the row allocated for tokens it computed. The
tables are the lines of one (max_rows, max_row_tokens) int64 matrix, so a step's key slots are one
`index_select`. When the row's input is computed it goes into the tree (siblings arriving later hit it);
when the row stops, its whole sequence does. Admission reserves the worst case (input + max_new_tokens)
against the KV token budget, so a step's allocation never fails: it only evicts unlocked cache.

Per request, the bookkeeping is Python lists (each row's slots, the tree's edges, the free list); the
tensor is written once per step with every change since the last one. A tensor op per request would hand
the GIL to the event loop (the tree sampler) and wait to get it back: measured 30-90 us per op while the
loop is busy, against ~1 us for the list operation.

A row stopped at its length whose caller flagged it `keep_cached` (a tree segment below the depth limit:
its children will follow once the tree's level is decided) is held for its priority: while that priority
still has requests in the engine (or left it within HOLD_GRACE_STEPS steps: its next ones are on their
way), newer-priority rows may not count on evicting it to be admitted, and eviction takes it last. Without
this, rows of a newer tree admitted while an older tree waits for its level evict the older tree's paths,
which are then prefilled again.

A request that continues a row which just stopped (the tree sampler's next segment: the row's tokens plus
the one it sampled) finds that row's tree node and slots in a small index of stopped rows instead of walking
the radix tree edge by edge and joining the edges' slots: most of a tree's requests are such continuations.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

import torch

from treepo.service.engine.host_tensors import int64_tensor
from treepo.service.engine.kv_pool import KVPool, KVShape
from treepo.service.engine.radix_cache import RadixCache, TreeNode
from treepo.service.engine.sequence import Sequence

logger = logging.getLogger(__name__)

STOPPED_TOKENS_PER_SLOT = 2  # the stopped-row index holds up to this many tokens per KV slot of the budget
HOLD_GRACE_STEPS = 8  # a priority's held rows stay held this many steps after its last request left


class BlockManager:
    """Slot tables, locks and the KV token budget of the running rows."""

    def __init__(
        self,
        capacity: int,
        shape: KVShape,
        *,
        max_rows: int,
        max_row_tokens: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.pool = KVPool(capacity, shape, device=device)
        self.radix = RadixCache(on_evict=self.pool.free)
        width = min(max_row_tokens, capacity)
        self.slot_table = torch.zeros((max_rows, width), dtype=torch.int64)  # (rows, tokens), CPU
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self.table_row: dict[int, int] = {}  # seq_id -> its line in slot_table
        self._row_slots: dict[int, list[int]] = {}  # seq_id -> its table line's filled part, as a list
        self._locked: dict[int, TreeNode] = {}  # seq_id -> the tree node its cached prefix ends at
        self._locked_length: dict[int, int] = {}  # seq_id -> tokens that node spells
        self._tree_length: dict[int, int] = {}  # seq_id -> leading table entries owned by the tree
        # tokens of a recently stopped row -> the tree node they end at and their slots (oldest first)
        self._stopped: OrderedDict[tuple[int, ...], tuple[TreeNode, tuple[int, ...]]] = OrderedDict()
        self._stopped_tokens = 0  # tokens over the index's entries (each entry: its tokens and its slots)
        self._max_stopped_tokens = STOPPED_TOKENS_PER_SLOT * capacity  # memory bounded by the KV budget
        self._writes: list[tuple[int, int, list[int] | tuple[int, ...]]] = []  # (line, column, slots) due
        self._step = 0  # forward steps so far
        self._present: Counter[int] = Counter()  # priority -> its requests in the engine (waiting or running)
        self._left_at: dict[int, int] = {}  # priority -> the step its last request left
        self._held: dict[TreeNode, int] = {}  # a stopped row's node, kept for its continuation -> priority
        self.num_reserved = 0  # slots promised to running rows and not allocated yet
        self.num_owned = 0  # slots held by running rows outside the tree
        self.peak_active_tokens = 0  # max over steps of slots the running rows hold or lock
        self.active_token_steps = 0  # sum over steps of the same: memory x time, what a KV budget rations
        self.peak_rows = 0  # max over steps of running rows (under a KV budget: how many paths it fits)
        self.kv_trace: list[tuple[int, int, int]] | None = None  # per step, when asked: rows, locked, owned

    # Public API

    def try_admit(self, seq: Sequence) -> bool:
        """Lock the row's cached prefix and reserve its worst-case slots, or leave it waiting."""
        node, slots = self._match(seq)
        cached = min(len(slots), seq.num_input_tokens - 1)  # one input token computed: its logits
        self.radix.inc_lock_ref(node)
        need = seq.max_slots - cached
        room = self.pool.num_free + self.radix.evictable_size - self.num_reserved
        if need > self.pool.num_free - self.num_reserved and self._row_slots:  # it would evict: not what
            room -= self._held_before(seq.priority)  # older work keeps (none running: nothing would free)
        if need > room:
            self.radix.dec_lock_ref(node)
            return False
        assert self._free_rows and seq.max_slots <= self.slot_table.shape[1], f"{seq.max_slots=}"
        line = self._free_rows.pop()
        prefix = list(slots[:cached])
        self._writes.append((line, 0, prefix))
        self.table_row[seq.seq_id] = line
        self._row_slots[seq.seq_id] = prefix
        self._locked[seq.seq_id] = node
        self._locked_length[seq.seq_id] = len(slots)
        self._tree_length[seq.seq_id] = cached
        self.num_reserved += need
        seq.num_cached_tokens = seq.num_computed = cached
        return True

    def allocate_step(self, rows: list[Sequence]) -> torch.Tensor:
        """Slots for every token fed this step, (sum of num_scheduled,) in row order; tables written."""
        total = sum(seq.num_scheduled for seq in rows)
        self._step += 1
        if self._step % HOLD_GRACE_STEPS == 0:
            self._forget_holds()
        if self.pool.num_free < total:
            self.radix.evict(total - self.pool.num_free, hold=self._hold_rank)
        slots = self.pool.alloc(total)
        assert slots is not None, f"{total=} {self.pool.num_free=} {self.num_reserved=}"
        start = 0
        for seq in rows:
            row_slots, count = self._row_slots[seq.seq_id], seq.num_scheduled
            assert len(row_slots) == seq.num_computed, f"{len(row_slots)=} {seq.num_computed=}"
            fed = slots[start : start + count]
            self._writes.append((self.table_row[seq.seq_id], len(row_slots), fed))
            row_slots += fed
            start += count
        self._write_tables()
        self.num_reserved -= total
        self.num_owned += total
        active = self.num_active_tokens
        self.peak_active_tokens = max(self.peak_active_tokens, active)
        self.active_token_steps += active
        self.peak_rows = max(self.peak_rows, len(rows))
        if self.kv_trace is not None:
            self.kv_trace.append((len(rows), self.radix.protected_size, self.num_owned))
        return int64_tensor(slots)

    def cache_input(self, seq: Sequence) -> None:
        """Put the row's computed input into the tree and lock it there instead of the old match."""
        length = seq.num_input_tokens
        node = self._insert(seq, length)
        self.radix.inc_lock_ref(node)
        self.radix.dec_lock_ref(self._locked[seq.seq_id])
        self._locked[seq.seq_id] = node
        self._locked_length[seq.seq_id] = length

    def release(self, seq: Sequence) -> None:
        """The row stopped (finished or aborted): cache what it computed, free the rest, unlock."""
        seq_id = seq.seq_id
        computed = seq.num_computed
        node = None
        if computed > self._tree_length[seq_id]:
            node = self._insert(seq, computed)
        elif computed and computed == self._locked_length[seq_id]:
            node = self._locked[seq_id]
        if node is not None:
            self._remember(seq, node)
            if seq.keep_cached and seq.finish_reason == "length":
                self._held[node] = seq.priority
        row_slots = self._row_slots.pop(seq_id)
        if len(row_slots) > computed:  # a failed step's slots
            self.pool.free(row_slots[computed:])
            self.num_owned -= len(row_slots) - computed
        self.radix.dec_lock_ref(self._locked.pop(seq_id))
        del self._locked_length[seq_id], self._tree_length[seq_id]
        self.num_reserved -= seq.max_slots - len(row_slots)
        self._free_rows.append(self.table_row.pop(seq_id))

    def arrive(self, seq: Sequence) -> None:
        """A request entered the engine (waiting): its priority has work here."""
        self._present[seq.priority] += 1

    def leave(self, seq: Sequence) -> None:
        """A request left the engine (finished or aborted, waiting or running)."""
        priority = seq.priority
        self._present[priority] -= 1
        if not self._present[priority]:
            del self._present[priority]
            self._left_at[priority] = self._step

    def flush(self) -> None:
        """Drop the whole prefix cache (after a weight update); no row may be running."""
        assert not self._row_slots and self.radix.protected_size == 0, f"{len(self._row_slots)=}"
        self.radix.reset()
        self.pool.clear()
        self._stopped.clear()
        self._stopped_tokens = 0
        self._held.clear()

    def reset_measures(self, *, trace: bool = False) -> None:
        """Start new peak / sum measurements (benchmarks, between runs); with `trace`, a per-step record too
        (off otherwise: a serving engine's would grow without bound)."""
        self.peak_active_tokens = self.active_token_steps = self.peak_rows = 0
        self.kv_trace = [] if trace else None

    @property
    def num_active_tokens(self) -> int:
        """Slots the running rows use now: locked cached prefixes + their own computed tokens."""
        return self.radix.protected_size + self.num_owned

    # Internal helpers

    def _write_tables(self) -> None:
        """Store every table change since the last call in the slot table, in one indexed store."""
        if not self._writes:
            return
        width = self.slot_table.shape[1]
        flat: list[int] = []  # positions in the flattened table
        values: list[int] = []
        for line, column, slots in self._writes:
            start = line * width + column
            flat += range(start, start + len(slots))
            values += slots
        self._writes.clear()
        self.slot_table.view(-1).index_copy_(0, int64_tensor(flat), int64_tensor(values))

    def _match(self, seq: Sequence) -> tuple[TreeNode, tuple[int, ...]]:
        """The longest cached prefix of the row's input: the node it ends at and its slots."""
        if seq.num_input_tokens > 1:
            hit = self._stopped.get(tuple(seq.token_ids[:-1]))
            if hit is not None and self.radix.touch(hit[0]):  # still cached: a stopped row's continuation
                return hit
        match = self.radix.match_prefix(seq.token_ids)
        return match.last_node, match.indices

    def _is_live(self, priority: int) -> bool:
        """Whether work of this priority is in the engine or just left it (its next requests may follow)."""
        left = self._left_at.get(priority)
        return priority in self._present or (left is not None and self._step - left <= HOLD_GRACE_STEPS)

    def _holds(self, node: TreeNode, owner: int) -> bool:
        """Whether a hold stands: its node is a cached leaf (no continuation grew below it yet) and the
        priority it is held for is live."""
        return node.parent is not None and node.is_leaf and self._is_live(owner)

    def _hold_rank(self, leaf: TreeNode) -> int | None:
        """The priority a leaf is held for (eviction takes it last), or None."""
        owner = self._held.get(leaf)
        return owner if owner is not None and self._holds(leaf, owner) else None

    def _held_before(self, priority: int) -> int:
        """Evictable tokens held for live work older than `priority` (a newer row may not count on them)."""
        return sum(
            len(node.key)
            for node, owner in self._held.items()
            if owner < priority and node.lock_ref == 0 and self._holds(node, owner)
        )

    def _forget_holds(self) -> None:
        """Drop holds that no longer stand (see `_holds`), and departures older than the grace period."""
        self._held = {node: owner for node, owner in self._held.items() if self._holds(node, owner)}
        self._left_at = {
            p: step for p, step in self._left_at.items() if self._step - step <= HOLD_GRACE_STEPS
        }

    def _remember(self, seq: Sequence, node: TreeNode) -> None:
        """Index a stopping row's computed tokens (all in the tree now) for a request continuing it."""
        computed = seq.num_computed
        key = tuple(seq.token_ids[:computed])
        if self._stopped.pop(key, None) is not None:
            self._stopped_tokens -= computed
        self._stopped[key] = (node, tuple(self._row_slots[seq.seq_id][:computed]))
        self._stopped_tokens += computed
        while self._stopped_tokens > self._max_stopped_tokens:  # oldest first
            self._stopped_tokens -= len(self._stopped.popitem(last=False)[0])

    def _insert(self, seq: Sequence, length: int) -> TreeNode:
        """Insert the row's first `length` tokens; rows owning duplicates free them and use the tree's."""
        seq_id, row_slots = seq.seq_id, self._row_slots[seq.seq_id]
        owned_from = self._tree_length[seq_id]
        start, start_length = self._locked[seq_id], self._locked_length[seq_id]
        if start_length != owned_from:  # its input was cached whole (the last token recomputed)
            start, start_length = self.radix.root, 0
        present, node, tree_slots = self.radix.extend(
            start, seq.token_ids[start_length:length], row_slots[start_length:length]
        )
        present += start_length
        assert present >= owned_from, f"{present=} {owned_from=}: a locked prefix left the tree"
        if present > owned_from:  # another row cached these tokens meanwhile: use the tree's slots
            self.pool.free(row_slots[owned_from:present])
            row_slots[owned_from:present] = tree_slots[owned_from - start_length :]
            self._writes.append((self.table_row[seq_id], owned_from, row_slots[owned_from:present]))
        self.num_owned -= length - owned_from
        self._tree_length[seq_id] = length
        return node
