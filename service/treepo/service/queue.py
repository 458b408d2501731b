"""The Redis side of the service: the trees stream (XADD per tree), failures, recent trees, idempotency."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from treepo.client import constants as names
from treepo.client.schema import Tree

logger = logging.getLogger(__name__)
T = TypeVar("T")
_RETRYABLE = (RedisConnectionError, RedisTimeoutError)


@dataclass(slots=True)
class QueueStats:
    depth: int  # trees not yet consumed by the slowest consumer group (the stream length without groups)
    oldest_age_s: float  # age of the oldest of them


@dataclass(slots=True)
class IdempotencyRecord:
    fingerprint: str
    is_done: bool
    status: int = 0
    media_type: str = "application/json"
    body: str = ""


class TreeQueue:
    """Producer side of the queue. Stream entries never get trimmed here: backpressure is a 429 instead."""

    def __init__(
        self, redis: aioredis.Redis, prefix: str, *, tree_ttl_s: int, idempotency_ttl_s: int
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.stream = names.trees_stream(prefix)
        self.failures = names.failures_stream(prefix)
        self._tree_ttl_s = tree_ttl_s
        self._idem_ttl_s = idempotency_ttl_s

    # Public API

    async def publish(self, tree: Tree) -> str:
        """XADD the tree and keep it for GET /trees/{id}, atomically; returns the stream entry id."""
        payload = tree.model_dump_json()

        async def write() -> str:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.stream, {names.TREE_FIELD: payload})
                pipe.set(names.tree_key(tree.tree_id, self.prefix), payload, ex=self._tree_ttl_s)
                entry_id, _ = await pipe.execute()
            return entry_id

        return await _with_retries(write)

    async def remember(self, tree: Tree) -> None:
        """Keep an inline/stream-delivered tree for GET /trees/{id} (not queued)."""
        key = names.tree_key(tree.tree_id, self.prefix)
        await _with_retries(lambda: self.redis.set(key, tree.model_dump_json(), ex=self._tree_ttl_s))

    async def publish_failure(self, record: dict[str, Any]) -> None:
        """An accepted tree that could not be sampled: its error record, so nothing accepted vanishes."""
        payload = json.dumps({**record, "time": time.time()})
        await _with_retries(lambda: self.redis.xadd(self.failures, {names.FAILURE_FIELD: payload}))

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

    async def stats(self) -> QueueStats:
        """Backlog of the slowest consumer group and the age of its oldest unconsumed tree."""
        try:
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError:  # no stream yet
            return QueueStats(depth=0, oldest_age_s=0.0)
        now_s = _seconds(await self.redis.time())
        if not groups:
            first = await self.redis.xrange(self.stream, count=1)
            depth = await self.redis.xlen(self.stream)
            return QueueStats(depth, _age(first[0][0], now_s) if first else 0.0)
        backlogs = [await self._group_backlog(group, now_s) for group in groups]
        return QueueStats(
            depth=max(b.depth for b in backlogs), oldest_age_s=max(b.oldest_age_s for b in backlogs)
        )

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (*_RETRYABLE, OSError):
            return False

    # Idempotency

    async def claim(self, key: str, fingerprint: str) -> IdempotencyRecord | None:
        """Reserve `key` for this request; None if reserved now, else the record of the earlier request."""
        redis_key = names.idempotency_key(key, self.prefix)
        pending = json.dumps({"fingerprint": fingerprint, "is_done": False})
        if await self.redis.set(redis_key, pending, nx=True, ex=self._idem_ttl_s):
            return None
        raw = await self.redis.get(redis_key)
        if raw is None:  # expired between the two calls: claim again
            return await self.claim(key, fingerprint)
        return IdempotencyRecord(**json.loads(raw))

    async def complete(self, key: str, record: IdempotencyRecord) -> None:
        redis_key = names.idempotency_key(key, self.prefix)
        value = json.dumps(
            {
                "fingerprint": record.fingerprint,
                "is_done": True,
                "status": record.status,
                "media_type": record.media_type,
                "body": record.body,
            }
        )
        await _with_retries(lambda: self.redis.set(redis_key, value, ex=self._idem_ttl_s))

    async def release(self, key: str) -> None:
        """Forget a claim whose request was refused, so a retry can run."""
        await self.redis.delete(names.idempotency_key(key, self.prefix))

    # Internal helpers

    async def _group_backlog(self, group: dict[str, Any], now_s: float) -> QueueStats:
        pending, lag = int(group["pending"]), group.get("lag")
        if lag is None:  # Redis cannot tell (e.g. after deletions): count what follows the last delivery
            lag = len(await self.redis.xrange(self.stream, min=f"({group['last-delivered-id']}", max="+"))
        if pending:
            summary = await self.redis.xpending(self.stream, group["name"])
            oldest_id = summary["min"]
        else:
            after = await self.redis.xrange(self.stream, min=f"({group['last-delivered-id']}", count=1)
            oldest_id = after[0][0] if after else None
        return QueueStats(pending + int(lag), _age(oldest_id, now_s) if oldest_id else 0.0)


def _seconds(redis_time: tuple[int, int]) -> float:
    return redis_time[0] + redis_time[1] / 1e6


def _age(entry_id: str, now_s: float) -> float:
    return max(0.0, now_s - int(entry_id.split("-")[0]) / 1000)


async def _with_retries(call: Callable[[], Awaitable[T]], attempts: int = 4, base_delay_s: float = 0.1) -> T:
    """Retry a Redis write on connection errors with exponential backoff (bounded)."""
    for attempt in range(attempts):
        try:
            return await call()
        except _RETRYABLE:
            if attempt == attempts - 1:
                raise
            logger.warning("redis write failed (attempt %d/%d); retrying", attempt + 1, attempts)
            await asyncio.sleep(base_delay_s * 2**attempt)
    raise AssertionError("unreachable")
