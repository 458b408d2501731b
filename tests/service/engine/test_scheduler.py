"""Scheduler: admission by row cap, token budget and KV budget; shared-prefix deferral (no tensors)."""

from __future__ import annotations

from treepo.service.engine.scheduler import Scheduler, SchedulerConfig
from treepo.service.engine.sequence import Sequence


class FakeSlots:
    """Admits while `capacity` slots last; records releases."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.released, self.cached, self.present = capacity, [], [], set()

    def try_admit(self, seq: Sequence) -> bool:
        if seq.max_slots > self.capacity:
            return False
        self.capacity -= seq.max_slots
        return True

    def cache_input(self, seq: Sequence) -> None:
        self.cached.append(seq.seq_id)

    def release(self, seq: Sequence) -> None:
        self.capacity += seq.max_slots
        self.released.append(seq.seq_id)

    def arrive(self, seq: Sequence) -> None:
        self.present.add(seq.seq_id)

    def leave(self, seq: Sequence) -> None:
        self.present.remove(seq.seq_id)


def row(ids: list[int], max_new_tokens: int = 2) -> Sequence:
    return Sequence(ids, max_new_tokens, frozenset({0}), 0.0, 1.0, -1, seed=0)


class TestScheduler:
    def test_row_cap_and_kv_budget_bound_admission(self):
        slots = FakeSlots(capacity=100)
        scheduler = Scheduler(slots, SchedulerConfig(max_running_rows=2, max_step_tokens=64))
        for i in range(3):
            scheduler.add(row([10 + i, 20 + i]))
        assert len(scheduler.schedule()) == 2 and len(scheduler.waiting) == 1
        tight = Scheduler(FakeSlots(capacity=4), SchedulerConfig(max_running_rows=8, max_step_tokens=64))
        for i in range(3):
            tight.add(row([10 + i, 20 + i]))  # 3 slots each
        assert len(tight.schedule()) == 1

    def test_rows_join_at_step_boundaries_and_leave_when_done(self):
        slots = FakeSlots(capacity=100)
        scheduler = Scheduler(slots, SchedulerConfig(max_running_rows=4, max_step_tokens=64))
        first = row([5, 6, 7], max_new_tokens=3)
        scheduler.add(first)
        rows = scheduler.schedule()
        assert [r.num_scheduled for r in rows] == [3]
        scheduler.postprocess(rows, {first.seq_id: (9, -0.1)})
        assert slots.cached == [first.seq_id]
        second = row([8, 9])
        scheduler.add(second)
        rows = scheduler.schedule()
        assert [r.num_scheduled for r in rows] == [1, 2]  # decode step + the joiner's prefill
        done = scheduler.postprocess(rows, {first.seq_id: (0, -0.2), second.seq_id: (4, -0.3)})
        assert done == [first] and first.finish_reason == "stop" and slots.released == [first.seq_id]

    def test_a_row_sharing_an_uncached_prefix_waits_for_it(self):
        scheduler = Scheduler(
            FakeSlots(capacity=100), SchedulerConfig(max_running_rows=4, max_step_tokens=64)
        )
        prompt = list(range(10, 20))
        a, b = row(prompt), row(prompt)
        scheduler.add(a)
        scheduler.add(b)
        assert scheduler.schedule() == [a] and list(scheduler.waiting) == [b]

    def test_abort_releases_a_running_row(self):
        slots = FakeSlots(capacity=100)
        scheduler = Scheduler(slots, SchedulerConfig(max_running_rows=4, max_step_tokens=64))
        seq = row([3, 4])
        scheduler.add(seq)
        scheduler.schedule()
        assert scheduler.abort(seq.seq_id) is seq and slots.released == [seq.seq_id]
        assert scheduler.is_idle and scheduler.abort(seq.seq_id) is None
        assert not slots.present  # the slot manager heard it leave (it keeps per-priority work counts)

    def test_lower_priority_values_join_first_then_arrival_order(self):
        slots = FakeSlots(capacity=100)
        scheduler = Scheduler(slots, SchedulerConfig(max_running_rows=2, max_step_tokens=64))
        new_tree = [row([30 + i, 1]) for i in range(2)]
        old_tree = [row([40 + i, 1]) for i in range(2)]
        for seq in new_tree:
            seq.priority = 7
            scheduler.add(seq)
        for seq in old_tree:
            seq.priority = 3  # arrived later, but its tree started earlier
            scheduler.add(seq)
        assert scheduler.schedule() == old_tree and scheduler.waiting == new_tree
        assert scheduler.abort(new_tree[0].seq_id) is new_tree[0] and scheduler.waiting == new_tree[1:]
        assert slots.present == {seq.seq_id for seq in [*old_tree, new_tree[1]]}  # waiting and running

    def test_a_one_token_input_tail_is_not_cached_before_the_row_ends(self):
        slots = FakeSlots(capacity=100)
        scheduler = Scheduler(slots, SchedulerConfig(max_running_rows=4, max_step_tokens=64))
        seq = row([5, 6, 7])
        seq.num_cached_tokens = seq.num_computed = 2  # a later segment: all but the last token cached
        scheduler.add(seq)
        rows = scheduler.schedule()
        scheduler.postprocess(rows, {seq.seq_id: (9, -0.1)})
        assert slots.cached == []  # a sibling would compute that last token anyway
