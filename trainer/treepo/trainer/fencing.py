"""Fenced, exactly-once training: which consumer may put a tree into an optimizer step, and commit it.

Protocol (all checks are Lua scripts, so each runs atomically inside Redis):

1. **Claim, right before the optimizer step** (`Fence.claim`). For every (entry id, tree id) of the batch:
   - the entry must still be pending *for this consumer* (XPENDING owner); otherwise another consumer took
     it over (XAUTOCLAIM) and we are fenced out: status `lost`, the tree leaves our batch;
   - the ledger (a hash `tree id -> state`) must not say `done`: status `trained`, our copy is acked;
   - the ledger must not hold a live claim of another consumer (`claim|<consumer>|<entry>` whose entry is
     still pending for that consumer): status `busy`, our copy (a duplicate publish) is acked;
   - else the ledger records `claim|<us>|<entry>` (status `claimed`) and the tree is trained.
   A claim whose owner lost its pending entry (dead, its entries taken over) is overwritten by the taker.
2. **Commit, after the checkpoint that holds the step** (`Fence.commit`). A tree is marked `done` and its
   entry XACKed only if the ledger still holds *our* claim on *that* entry (or no claim and we still own
   the entry, or nobody holds it: a Redis restart lost our claim and our delivery, and an unclaimed entry
   pending for nobody was trained by no one else); a consumer whose claim was overwritten commits nothing
   (status `fenced`). Re-committing a `done` tree (a resume after a crash between checkpoint and XACK, or
   a Redis restart that lost the commit) only XACKs our entry.
3. **Heartbeat** (`Fence.touch`). Entries held across steps are XCLAIMed by their owner with JUSTID each
   step, which resets their idle time: a slow-but-alive trainer is never taken over by XAUTOCLAIM as long as
   one step is shorter than `claim_idle_s`.

So a tree enters at most one committed optimizer step per group: two consumers never both hold a valid
claim, and a crashed consumer resumes from a checkpoint that predates its uncommitted claims, which it
re-claims (same consumer name) from its own pending list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

_OWNER = """
local function owner(stream, group, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then return false end
  return p[1][2]
end
"""

_CLAIM = (
    _OWNER
    + """
local stream, ledger, group, me = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 2 do
  local entry, tree = ARGV[i], ARGV[i + 1]
  local status = false
  if owner(stream, group, entry) ~= me then
    status = 'lost'
  else
    local v = redis.call('HGET', ledger, tree)
    if v == 'done' then
      status = 'trained'
    elseif v then
      local who, held = string.match(v, '^claim|(.*)|([^|]*)$')
      if who and who ~= me and owner(stream, group, held) == who then status = 'busy' end
    end
    if not status then
      redis.call('HSET', ledger, tree, 'claim|' .. me .. '|' .. entry)
      status = 'claimed'
    end
  end
  out[#out + 1] = status
end
return out
"""
)

_COMMIT = (
    _OWNER
    + """
local stream, ledger, group, me = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 2 do
  local entry, tree = ARGV[i], ARGV[i + 1]
  local v = redis.call('HGET', ledger, tree)
  local status = 'fenced'
  local held = owner(stream, group, entry)
  if v == 'claim|' .. me .. '|' .. entry or (not v and (held == me or not held)) then
    redis.call('HSET', ledger, tree, 'done')
    redis.call('XACK', stream, group, entry)
    status = 'committed'
  elseif v == 'done' then
    if held == me then redis.call('XACK', stream, group, entry) end
    status = 'already'
  end
  out[#out + 1] = status
end
return out
"""
)

_TOUCH = (
    _OWNER
    + """
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV do
  if owner(stream, group, ARGV[i]) == me then
    redis.call('XCLAIM', stream, group, me, 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""
)

DONE = "done"


@dataclass(slots=True)
class FenceResult:
    """Per-tree statuses of a claim or commit, in the order given."""

    statuses: list[str]

    def count(self, status: str) -> int:
        return self.statuses.count(status)


class Fence:
    """The claim / commit / touch scripts of one consumer of one group."""

    def __init__(self, client: redis.Redis, stream: str, ledger: str, group: str, consumer: str) -> None:
        self.client, self.stream, self.ledger = client, stream, ledger
        self.group, self.consumer = group, consumer
        self._claim = client.register_script(_CLAIM)
        self._commit = client.register_script(_COMMIT)
        self._touch = client.register_script(_TOUCH)

    def claim(self, entry_ids: Sequence[str], tree_ids: Sequence[str]) -> FenceResult:
        """Claim trees for the optimizer step about to run (statuses claimed/lost/trained/busy)."""
        return self._run(self._claim, entry_ids, tree_ids, self.consumer)

    def commit(
        self, entry_ids: Sequence[str], tree_ids: Sequence[str], *, claimant: str | None = None
    ) -> FenceResult:
        """Mark claimed trees trained and XACK them (statuses committed/already/fenced). `claimant`: the
        consumer name that claimed them (a resumed run whose checkpoint was written under another name)."""
        return self._run(self._commit, entry_ids, tree_ids, claimant or self.consumer)

    def touch(self, entry_ids: Sequence[str]) -> int:
        """Reset the idle time of the entries we still own (a heartbeat against XAUTOCLAIM)."""
        if not entry_ids:
            return 0
        return int(self._touch(keys=[self.stream], args=[self.group, self.consumer, *entry_ids]))

    def states(self, tree_ids: Sequence[str]) -> list[str | None]:
        """Ledger state of each tree: None, 'done' or 'claim|<consumer>|<entry>'."""
        if not tree_ids:
            return []
        return [None if v is None else v.decode() for v in self.client.hmget(self.ledger, list(tree_ids))]

    def _run(self, script, entry_ids: Sequence[str], tree_ids: Sequence[str], who: str) -> FenceResult:
        assert len(entry_ids) == len(tree_ids), f"{len(entry_ids)=} {len(tree_ids)=}"
        if not entry_ids:
            return FenceResult([])
        pairs = [value for pair in zip(entry_ids, tree_ids, strict=True) for value in pair]
        reply = script(keys=[self.stream, self.ledger], args=[self.group, who, *pairs])
        return FenceResult([s.decode() if isinstance(s, bytes) else s for s in reply])
