"""The Redis side of the service: the trees stream (XADD per tree), failures, recent trees, idempotency."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from treepo.client import constants as names
from treepo.client.schema import Tree

logger = logging.getLogger(__name__)
T = TypeVar("T")
_RETRYABLE = (RedisConnectionError, RedisTimeoutError)


# Lua helpers shared by the admission and trim scripts. The groups whose backlog is the queue depth (and
# whose acknowledgements allow trimming): the configured training groups that exist, else every group (a
# trainer with another group name still gets backpressure). A group's backlog is pending + lag, at most the
# stream length (all of it is in the stream); after deletions or an AOF reload Redis reports the lag as
# unknown, or too high: then the stream length, which trimming keeps close to the backlog, bounds it.
TRAINING_GROUPS_LUA = """
local function training_groups(stream, wanted_names)
  local wanted, all, chosen = {}, {}, {}
  for _, name in ipairs(wanted_names) do wanted[name] = true end
  for _, raw in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local g = {}
    for i = 1, #raw, 2 do g[raw[i]] = raw[i + 1] end
    table.insert(all, g)
    if wanted[g['name']] then table.insert(chosen, g) end
  end
  if #chosen == 0 then return all end
  return chosen
end
local function group_backlog(stream, g)
  local length = redis.call('XLEN', stream)
  if not g['lag'] then return length end
  return math.min(tonumber(g['pending']) + tonumber(g['lag']), length)
end
"""


# Extend the TTL of idempotency records that are still pending (IdempotencyRecord.to_json: "is_done": false).
_HOLD = """
for _, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value and string.find(value, '"is_done": false', 1, true) then redis.call('EXPIRE', key, ARGV[1]) end
end
return 0
"""


@dataclass(slots=True)
class QueueStats:
    depth: int  # backlog of the slowest training group (+ reserved trees); the stream length without groups
    oldest_age_s: float  # age of the oldest of them


@dataclass(slots=True)
class IdempotencyRecord:
    fingerprint: str
    is_done: bool
    status: int = 0
    media_type: str = "application/json"
    body: str = ""
    job: str | None = None  # a queue request's job id: a replay reports how many of its trees remain
    trees: list[str] | None = None  # ids of trees kept as GET /trees copies, left out of `body` (not twice)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclass(slots=True, frozen=True)
class Retention:
    """How long (and up to what size) Redis keeps what it does not strictly need."""

    tree_ttl_s: int  # GET /trees/{id} copies
    idempotency_ttl_s: int  # finished idempotency records
    pending_lease_s: int  # an in-progress idempotency key whose owner stops renewing it frees up after this
    max_copy_bytes: int  # larger trees / answers are not copied (GET /trees 404, a replay says so)


class TreeQueue:
    """Producer side of the queue: stream names, tree copies, idempotency records and queue statistics."""

    def __init__(self, redis: aioredis.Redis, prefix: str, retention: Retention, groups: list[str]) -> None:
        self.redis = redis
        self.prefix = prefix
        self.stream = names.trees_stream(prefix)
        self.failures = names.failures_stream(prefix)
        self.retention = retention
        self.groups = groups  # the training groups whose backlog is the queue depth
        self._hold = redis.register_script(_HOLD)

    # Public API

    def copy_ttl(self, payload: str) -> int:
        """TTL of a tree copy for GET /trees/{id}; 0 (no copy) above the byte budget."""
        return self.retention.tree_ttl_s if len(payload) <= self.retention.max_copy_bytes else 0

    @staticmethod
    def failure_payload(record: dict[str, Any]) -> str:
        return json.dumps({**record, "time": time.time()})

    async def remember(self, tree: Tree, payload: str) -> bool:
        """Keep an inline/stream-delivered tree (`payload`: its JSON) for GET /trees/{id}, best effort: the
        caller gets its tree even when Redis is down or the tree is over the byte budget. True if kept."""
        ttl = self.copy_ttl(payload)
        if not ttl:
            return False
        try:
            await self.redis.set(names.tree_key(tree.tree_id, self.prefix), payload, ex=ttl)
        except (RedisError, OSError):
            logger.warning("could not keep a copy of tree %s (Redis unreachable)", tree.tree_id)
            return False
        return True

    async def tree_copies(self, tree_ids: list[str]) -> list[str] | None:
        """The kept JSON of these trees, in order; None if any has expired."""
        if not tree_ids:
            return []
        copies = await self.redis.mget([names.tree_key(tree_id, self.prefix) for tree_id in tree_ids])
        return None if any(copy is None for copy in copies) else list(copies)

    async def get_tree(self, tree_id: str) -> Tree | None:
        raw = await self.redis.get(names.tree_key(tree_id, self.prefix))
        return None if raw is None else Tree.model_validate_json(raw)

    async def rewards(self, tree_id: str) -> dict[str, float]:
        """Leaf rewards the trainer wrote back (empty when unknown)."""
        raw = await self.redis.hgetall(names.rewards_key(tree_id, self.prefix))
        rewards: dict[str, float] = {}
        for leaf, value in raw.items():
            try:
                rewards[leaf] = float(value)
            except ValueError:
                logger.warning("ignoring non-numeric reward %r for leaf %s of tree %s", value, leaf, tree_id)
        return rewards

    async def stats(self, reserved: int = 0) -> QueueStats:
        """Backlog of the slowest training group (other groups do not count; the stream length while none
        exists) plus `reserved` admitted trees, and the age of the oldest unconsumed tree."""
        try:
            every = await self.redis.xinfo_groups(self.stream)
        except ResponseError:  # no stream yet
            return QueueStats(depth=reserved, oldest_age_s=0.0)
        groups = [g for g in every if g["name"] in self.groups] or every  # as TRAINING_GROUPS_LUA
        now_s = _seconds(await self.redis.time())
        if not groups:
            first = await self.redis.xrange(self.stream, count=1)
            depth = await self.redis.xlen(self.stream)
            return QueueStats(depth + reserved, _age(first[0][0], now_s) if first else 0.0)
        backlogs = [await self._group_backlog(group, now_s) for group in groups]
        return QueueStats(
            depth=max(b.depth for b in backlogs) + reserved,
            oldest_age_s=max(b.oldest_age_s for b in backlogs),
        )

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (*_RETRYABLE, OSError):
            return False

    # Idempotency

    async def claim(self, key: str, fingerprint: str) -> IdempotencyRecord | None:
        """Reserve `key` for this request; None if reserved now, else the record of the earlier request. The
        reservation lapses after `pending_lease_s` unless its owner renews it (QueueJobs.held_keys)."""
        redis_key = names.idempotency_key(key, self.prefix)
        pending = IdempotencyRecord(fingerprint, False).to_json()
        if await self.redis.set(redis_key, pending, nx=True, ex=self.retention.pending_lease_s):
            return None
        raw = await self.redis.get(redis_key)
        if raw is None:  # expired between the two calls: claim again
            return await self.claim(key, fingerprint)
        return IdempotencyRecord(**json.loads(raw))

    def done_record(self, key: str, record: IdempotencyRecord) -> tuple[str, str, int]:
        """(redis key, value, ttl) of a finished record; an answer over the byte budget is kept without
        its body (a replay then says so instead of running the request twice)."""
        if len(record.body) > self.retention.max_copy_bytes:
            record = dataclasses.replace(record, body="", status=-record.status)
        return names.idempotency_key(key, self.prefix), record.to_json(), self.retention.idempotency_ttl_s

    async def complete(self, key: str, record: IdempotencyRecord) -> None:
        redis_key, value, ttl = self.done_record(key, record)
        await self.redis.set(redis_key, value, ex=ttl)

    async def hold(self, keys: set[str]) -> None:
        """Renew the pending idempotency keys of requests still running here (a finished record, written
        meanwhile, keeps its own TTL)."""
        if keys:
            redis_keys = [names.idempotency_key(key, self.prefix) for key in keys]
            await self._hold(keys=redis_keys, args=[self.retention.pending_lease_s])

    async def release(self, key: str) -> None:
        """Forget a claim whose request was refused or failed, so a retry can run (best effort)."""
        try:
            await self.redis.delete(names.idempotency_key(key, self.prefix))
        except (RedisError, OSError):
            logger.warning("could not release idempotency key %s; it lapses by itself", key)

    # Internal helpers

    async def _group_backlog(self, group: dict[str, Any], now_s: float) -> QueueStats:
        pending, lag = int(group["pending"]), group.get("lag")
        length = await self.redis.xlen(self.stream)  # bounds an unknown or too-high lag (TRAINING_GROUPS_LUA)
        depth = length if lag is None else min(pending + int(lag), length)
        if pending:
            summary = await self.redis.xpending(self.stream, group["name"])
            oldest_id = summary["min"]
        else:
            after = await self.redis.xrange(self.stream, min=f"({group['last-delivered-id']}", count=1)
            oldest_id = after[0][0] if after else None
        return QueueStats(depth, _age(oldest_id, now_s) if oldest_id else 0.0)


def _seconds(redis_time: tuple[int, int]) -> float:
    return redis_time[0] + redis_time[1] / 1e6


def _age(entry_id: str, now_s: float) -> float:
    return max(0.0, now_s - int(entry_id.split("-")[0]) / 1000)


async def with_retries(call: Callable[[], Awaitable[T]], window_s: float, base_delay_s: float = 0.1) -> T:
    """Retry a Redis call on connection errors with exponential backoff (capped at 5 s) for `window_s`."""
    deadline = time.monotonic() + window_s
    attempt = 0
    while True:
        try:
            return await call()
        except _RETRYABLE:
            delay = min(base_delay_s * 2**attempt, 5.0)
            if time.monotonic() + delay > deadline:
                raise
            attempt += 1
            logger.warning("redis call failed (attempt %d); retrying in %.1f s", attempt, delay)
            await asyncio.sleep(delay)
