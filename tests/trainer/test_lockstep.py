"""The deterministic (lockstep) schedule against the real Redis and a real scripted service."""

from __future__ import annotations

from pathlib import Path

import redis
from test_checkpoint import loop_config, scripted_service  # noqa: F401 (the fixture)

from treepo.client.constants import trained_ledger, trees_stream
from treepo.service.config import Settings
from treepo.trainer.consumer import Batch
from treepo.trainer.lockstep import LockstepAssembler, tree_seq
from treepo.trainer.loop import build_run


class Recorder:
    """Forwards to the real assembler and remembers the sequence numbers of each batch."""

    def __init__(self, inner: LockstepAssembler) -> None:
        self.inner, self.batches = inner, []

    def assemble(self, *args, **kwargs) -> Batch:
        batch = self.inner.assemble(*args, **kwargs)
        self.batches.append([tree_seq(t) for t in batch.trees])
        return batch


def test_lockstep_batches_in_sequence_order_and_carries_extra_trees(
    scripted_service: Settings,  # noqa: F811
    tmp_path: Path,
    redis_url: str,
) -> None:
    config = loop_config(scripted_service, tmp_path, deterministic=True, steps=3, checkpoint_every=2)
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    run = build_run(config)
    assert run.lockstep is not None
    lockstep = run.lockstep
    lockstep._read, lockstep._kept = 3, 0  # a survival rate of 1/4: the first round overshoots
    run.lockstep = recorder = Recorder(lockstep)  # type: ignore[assignment]

    run.step()
    assert run.feeder.submitted == 8 and len(lockstep.carry) >= 2, "8 prompts for 2 trees: extras carried"
    carried = [tree_seq(t) for t in lockstep.carry]
    assert carried == sorted(carried) and min(carried) > max(recorder.batches[0])
    run.step()  # checkpoint: acks what steps 1-2 trained, not what is still carried
    assert recorder.batches[1] == carried[:2], "the next step starts with the carried trees, in order"
    assert run.feeder.submitted == 8, "no new prompts while carried trees last"
    stream = trees_stream(config.key_prefix)
    assert db.xpending(stream, config.group)["pending"] == len(lockstep.carry), "carried: pending"
    assert db.hlen(trained_ledger(config.group, config.key_prefix)) == 4
    records = run.log.read()
    assert [r["staleness_mean"] for r in records] == [0, 1], "fresh trees on-policy, carried one step old"
    seqs = [s for batch in recorder.batches for s in batch]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4, "trained in submission order, none twice"
