"""Durable queue jobs in Redis: admission, idempotent per-tree publishing, leases and recovery.

A queue request is written to Redis (job record + the set of its unfinished tree ids + a lease) by one Lua
script that also reserves queue capacity, before the 202 is sent. Each tree is published by a script that
removes its id from the job's set and XADDs only if it was still there, so a tree id reaches the trees (or
failures) stream at most once, even when a job is resumed by another replica after its owner died.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from treepo.client import constants as names
from treepo.service.queue import TRAINING_GROUPS_LUA

logger = logging.getLogger(__name__)

# Lease times come from the Redis clock, so replicas whose clocks disagree still agree on expiry.
_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Backlog of the training groups (the stream length while no group exists) plus reserved (admitted, not yet
# published) trees; refuse if adding n would pass the limit, else record the job atomically.
_ADMIT = (
    TRAINING_GROUPS_LUA
    + _NOW_MS
    + """
local stream, reserved_key, leases, job_key, todo_key, idem_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local n, max_depth = tonumber(ARGV[1]), tonumber(ARGV[2])
local job_id, job_json, expiry, ttl = ARGV[3], ARGV[4], now_ms() + tonumber(ARGV[5]), ARGV[6]
local idem_json, idem_ttl, num_ids = ARGV[7], ARGV[8], tonumber(ARGV[9])
local wanted = {}
for i = 10 + num_ids, #ARGV do table.insert(wanted, ARGV[i]) end
local backlog = 0
if redis.call('EXISTS', stream) == 1 then
  local groups = training_groups(stream, wanted)
  if #groups == 0 then backlog = redis.call('XLEN', stream) end
  for _, g in ipairs(groups) do backlog = math.max(backlog, group_backlog(stream, g)) end
end
local reserved = 0
for _, v in ipairs(redis.call('HVALS', reserved_key)) do reserved = reserved + math.max(tonumber(v), 0) end
if backlog + reserved + n > max_depth then return {0, backlog + reserved} end
redis.call('SET', job_key, job_json, 'EX', ttl)
for i = 10, 9 + num_ids do redis.call('SADD', todo_key, ARGV[i]) end
redis.call('EXPIRE', todo_key, ttl)
redis.call('HSET', reserved_key, job_id, n)
redis.call('ZADD', leases, expiry, job_id)
if idem_key ~= '' then redis.call('SET', idem_key, idem_json, 'EX', idem_ttl) end
return {1, backlog + reserved + n}
"""
)

# Publish one tree (or its failure record) at most once: only if its id is still in the job's todo set.
_PUBLISH = """
local todo_key, out_stream, copy_key, reserved_key, job_key, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tree_id, field, payload, copy_ttl, job_id = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
if redis.call('SREM', todo_key, tree_id) == 0 then return 0 end
redis.call('XADD', out_stream, '*', field, payload)
if copy_ttl > 0 then redis.call('SET', copy_key, payload, 'EX', copy_ttl) end
if redis.call('SCARD', todo_key) == 0 then
  redis.call('HDEL', reserved_key, job_id)
  redis.call('ZREM', leases, job_id)
  redis.call('DEL', job_key)
else
  redis.call('HINCRBY', reserved_key, job_id, -1)
end
return 1
"""

# Take over at most `count` jobs whose lease has expired (their owner died or gave them up).
_CLAIM = (
    _NOW_MS
    + """
local leases, lease_ms, count = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, count)
for _, job_id in ipairs(expired) do redis.call('ZADD', leases, now + lease_ms, job_id) end
return expired
"""
)

# Extend the leases of running jobs (XX: a finished job is not added back).
_RENEW = (
    _NOW_MS
    + """
local expiry = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
return #ARGV - 1
"""
)


@dataclass(slots=True)
class Admission:
    accepted: bool
    depth: int  # trees in the queue (training-group backlog + reserved) after admission, or before refusal


@dataclass(slots=True)
class StoredJob:
    job_id: str
    record: dict[str, Any]  # {"request": RolloutTreeRequest JSON, "prompts": [PreparedPrompt fields]}
    todo: set[str]


class JobStore:
    """The Redis side of durable jobs, under one key prefix."""

    def __init__(self, redis: aioredis.Redis, prefix: str, *, lease_s: float, job_ttl_s: int) -> None:
        self.redis, self.prefix = redis, prefix
        self.lease_s, self.job_ttl_s = lease_s, job_ttl_s
        self.reserved_key = f"{prefix}:jobs:reserved"
        self.leases_key = f"{prefix}:jobs:leases"
        self._admit = redis.register_script(_ADMIT)
        self._publish = redis.register_script(_PUBLISH)
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def todo_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:todo"

    async def admit(
        self,
        job_id: str,
        record: dict[str, Any],
        tree_ids: list[str],
        *,
        max_depth: int,
        groups: list[str],
        idempotency: tuple[str, str, int] | None,
    ) -> Admission:
        """Reserve capacity and record the job (and the idempotency record pointing at it) atomically."""
        idem_key, idem_json, idem_ttl = idempotency or ("", "", 1)
        keys = [
            names.trees_stream(self.prefix),
            self.reserved_key,
            self.leases_key,
            self.job_key(job_id),
            self.todo_key(job_id),
            idem_key,
        ]
        args = [len(tree_ids), max_depth, job_id, json.dumps(record), self._lease_ms, self.job_ttl_s]
        args += [idem_json, idem_ttl, len(tree_ids), *tree_ids, *groups]
        accepted, depth = await self._admit(keys=keys, args=args)
        return Admission(bool(accepted), int(depth))

    async def publish(
        self, job_id: str, tree_id: str, stream: str, field: str, payload: str, copy_ttl_s: int
    ) -> bool:
        """XADD `payload` to `stream` unless this tree id was published already; True if it was added now."""
        keys = [
            self.todo_key(job_id),
            stream,
            names.tree_key(tree_id, self.prefix),
            self.reserved_key,
            self.job_key(job_id),
            self.leases_key,
        ]
        return bool(await self._publish(keys=keys, args=[tree_id, field, payload, copy_ttl_s, job_id]))

    async def renew(self, job_ids: list[str]) -> None:
        """Extend the leases of the jobs this process is running."""
        if job_ids:
            await self._renew(keys=[self.leases_key], args=[self._lease_ms, *job_ids])

    async def release(self, job_id: str) -> None:
        """Give a job up now (this process cannot finish it): any replica's recovery will take it."""
        await self.redis.zadd(self.leases_key, {job_id: 0}, xx=True)

    async def claim_expired(self, count: int = 16) -> list[StoredJob]:
        """Jobs whose owner stopped renewing their lease, now leased to this process."""
        job_ids = await self._claim(keys=[self.leases_key], args=[self._lease_ms, count])
        jobs = []
        for job_id in job_ids:
            raw = await self.redis.get(self.job_key(job_id))
            todo = await self.redis.smembers(self.todo_key(job_id))
            if raw is None or not todo:  # expired or finished: forget its reservation and lease
                await self.forget(job_id)
                continue
            jobs.append(StoredJob(job_id, json.loads(raw), set(todo)))
        return jobs

    async def forget(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.reserved_key, job_id).zrem(self.leases_key, job_id)
            pipe.delete(self.job_key(job_id), self.todo_key(job_id))
            await pipe.execute()

    async def remaining(self, job_id: str) -> int:
        """Trees of the job not yet published (0 once it is done)."""
        return int(await self.redis.scard(self.todo_key(job_id)))

    async def num_reserved(self) -> int:
        return sum(max(int(v), 0) for v in await self.redis.hvals(self.reserved_key))

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_s * 1000)
