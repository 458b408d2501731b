"""Keep Redis bounded: trim trees every training group has acknowledged, age out failure records, and
report what Redis holds (`treepo_redis_*` gauges).

Tree copies, idempotency records and job records carry their own TTLs (see `Retention` in queue.py); what
has no TTL is the two streams, and this is where they shrink. A tree a training group has not acknowledged
(unread, or delivered and pending) is never trimmed, so nothing accepted is lost to trimming.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from treepo.client import constants as names
from treepo.service.metrics import ServiceMetrics
from treepo.service.queue import TRAINING_GROUPS_LUA

logger = logging.getLogger(__name__)

# Trim the trees stream below the oldest entry any training group still needs: its oldest pending entry,
# or (nothing pending) the first entry after its last delivery. No group yet: nothing was consumed, keep all.
_TRIM = (
    TRAINING_GROUPS_LUA
    + """
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return 0 end
local groups = training_groups(stream, ARGV)
if #groups == 0 then return 0 end
local floor_ms, floor_seq = nil, nil
for _, g in ipairs(groups) do
  local ms, seq
  if tonumber(g['pending']) > 0 then
    local oldest = redis.call('XPENDING', stream, g['name'])[2]
    ms, seq = string.match(oldest, '(%d+)-(%d+)')
    ms, seq = tonumber(ms), tonumber(seq)
  else
    ms, seq = string.match(g['last-delivered-id'], '(%d+)-(%d+)')
    ms, seq = tonumber(ms), tonumber(seq) + 1
  end
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
return redis.call('XTRIM', stream, 'MINID', string.format('%.0f-%.0f', floor_ms, floor_seq))
"""
)


class Housekeeper:
    """Trims the streams now and then and refreshes the Redis gauges on each scrape."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        groups: list[str],
        metrics: ServiceMetrics,
        *,
        failures_retention_s: float,
    ) -> None:
        self.redis, self.groups, self.metrics = redis, groups, metrics
        self.trees, self.failures = names.trees_stream(prefix), names.failures_stream(prefix)
        self.failures_retention_s = failures_retention_s
        self._trim = redis.register_script(_TRIM)

    async def run(self, interval_s: float) -> None:
        """Forever: trim, then wait `interval_s` (Redis errors are logged and retried next round)."""
        while True:
            try:
                await self.trim()
            except (RedisError, OSError):
                logger.warning("could not trim the streams (Redis unreachable); retrying", exc_info=True)
            await asyncio.sleep(interval_s)

    async def trim(self) -> tuple[int, int]:
        """(trees, failure records) removed: trees every training group acknowledged, failure records
        older than the retention window."""
        trees = int(await self._trim(keys=[self.trees], args=self.groups))
        seconds, micros = await self.redis.time()
        min_ms = int((seconds + micros / 1e6 - self.failures_retention_s) * 1000)
        failures = int(await self.redis.xtrim(self.failures, minid=f"{max(min_ms, 0)}-0", approximate=False))
        self.metrics.redis_trimmed.labels(stream="trees").inc(trees)
        self.metrics.redis_trimmed.labels(stream="failures").inc(failures)
        return trees, failures

    async def observe(self) -> None:
        """Refresh `treepo_redis_stream_length_entries{stream}` and `treepo_redis_memory_bytes`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.trees).xlen(self.failures).info("memory")
            trees, failures, memory = await pipe.execute()
        self.metrics.redis_stream_length.labels(stream="trees").set(trees)
        self.metrics.redis_stream_length.labels(stream="failures").set(failures)
        self.metrics.redis_memory.set(memory["used_memory"])
