"""Consume the trees stream in a Redis consumer group, for any trainer (needs the `redis` extra).

At-least-once delivery: entries stay pending until `ack`; entries a dead consumer held longer than
`claim_idle_ms` are taken over with XAUTOCLAIM; after a restart, a consumer first re-reads what it held
itself. An entry that does not decode into a `Tree` goes to the failures stream and is acked, so one bad
entry never blocks the group.

Redis restarts are survived: commands retry with backoff for `retry_s`, and a restart (a new server
`run_id`) makes the consumer re-read its own pending list (deliveries whose replies were lost), repairs the
group's `entries-read` counter (an AOF reload leaves it unknown, and with it the group's lag) and calls
`on_restart` (the trainer re-commits what the crash may have lost) before anything new is read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from treepo.client.constants import DEFAULT_PREFIX, FAILURE_FIELD, TREE_FIELD, failures_stream, trees_stream
from treepo.client.schema import Tree

logger = logging.getLogger(__name__)

_MAX_RAW_CHARS = 2000  # how much of a corrupt entry the failure record keeps

# After an AOF reload a group's entries-read is unknown (nil), or counts only what was read since (measured:
# Redis 7.0 with a trimmed stream), and the group's lag with it. Every entry added but not yet delivered to
# the group has an id above its last-delivered id (trimming only removes delivered ones), so
# entries-read = entries-added - those.
_REPAIR_ENTRIES_READ = """
local stream, group = KEYS[1], ARGV[1]
if redis.call('EXISTS', stream) == 0 then return -1 end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == group then
    local added = 0
    local s = redis.call('XINFO', 'STREAM', stream)
    for i = 1, #s, 2 do if s[i] == 'entries-added' then added = s[i + 1] end end
    local last = info['last-delivered-id']
    local undelivered = #redis.call('XRANGE', stream, '(' .. last, '+')
    if info['entries-read'] == added - undelivered then return -1 end
    redis.call('XGROUP', 'SETID', stream, group, last, 'ENTRIESREAD', added - undelivered)
    return added - undelivered
  end
end
return -1
"""


def connect(url: str, *, retry_s: float = 0.0) -> redis.Redis:
    """A client (bytes replies) that retries connection errors, timeouts and a server still loading its
    AOF with exponential backoff (50 ms doubling to 1 s) for about `retry_s` seconds."""
    retries = 0 if retry_s <= 0 else 5 + int(retry_s)
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
    )


def repair_entries_read(client: redis.Redis, stream: str, group: str) -> int | None:
    """Restore a group's entries-read counter if an AOF reload left it unknown or wrong; returns the value
    set (None: it was right)."""
    value = int(client.eval(_REPAIR_ENTRIES_READ, 1, stream, group))
    if value < 0:
        return None
    logger.info("set entries-read=%d of group %s on %s (unknown or wrong, e.g. after an AOF reload)",
                value, group, stream)  # fmt: skip
    return value


@dataclass(slots=True)
class StreamedTree:
    """One delivered tree and the stream entry to acknowledge once it is trained."""

    entry_id: str
    tree: Tree
    is_claimed: bool = False  # taken over from another consumer (or redelivered after a restart)


class TreeStream:
    """A consumer `consumer` of group `group` on the `<prefix>:trees` stream."""

    def __init__(
        self,
        redis_url: str,
        group: str,
        consumer: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        retry_s: float = 60.0,
        on_restart: Callable[[], object] | None = None,
    ) -> None:
        if not group or not consumer:
            raise ValueError("group and consumer names must be non-empty strings")
        if block_ms < 0 or claim_idle_ms < 1:
            raise ValueError(f"need block_ms >= 0 and claim_idle_ms >= 1 (got {block_ms}, {claim_idle_ms})")
        self.redis = connect(
            redis_url, retry_s=retry_s
        )  # bytes replies: corrupt payloads must not crash decoding
        self.on_restart = on_restart
        self.group, self.consumer, self.prefix = group, consumer, prefix
        self.stream = trees_stream(prefix)
        self.failures = failures_stream(prefix)
        self.block_ms, self.claim_idle_ms = block_ms, claim_idle_ms
        self.num_corrupt = 0
        self._in_flight: set[str] = set()  # delivered to this object, not yet acked
        self._claim_cursor = "0-0"
        self._has_read_own_pending = False
        self._own_cursor = "0"
        self._run_id: str | None = None

    # Public API

    def ensure_group(self, start: str = "$") -> None:
        """Create the group (and the stream); an existing group is kept (and its entries-read repaired if a
        Redis restart lost it). A new group reads what is published from now on (`$`), or the whole
        retained stream with `start="0"`."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id=start, mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
            repair_entries_read(self.redis, self.stream, self.group)

    def read(self, count: int = 1) -> list[StreamedTree]:
        """Up to `count` trees: own pending entries after a restart, then idle entries of dead
        consumers, then new entries (blocking up to block_ms only when nothing else was found)."""
        if count < 1:
            raise ValueError(f"count must be >= 1 (got {count})")
        self.check_server()
        trees: list[StreamedTree] = []
        if not self._has_read_own_pending:
            trees += self._read_own_pending(count)
        if len(trees) < count:
            trees += self._autoclaim(count - len(trees))
        if len(trees) < count:
            block = None if trees else self.block_ms
            trees += self._read_new(count - len(trees), block)
        return trees

    @property
    def has_backlog(self) -> bool:
        """Whether entries this consumer held before a restart (its own or Redis's) may remain unread."""
        return not self._has_read_own_pending

    def read_backlog(self, count: int) -> list[StreamedTree]:
        """Up to `count` entries this consumer held before a restart, without reading anything new (may be
        empty while `has_backlog` is still True: entries we already hold are skipped)."""
        self.check_server()
        return self._read_own_pending(count) if self.has_backlog else []

    def check_server(self) -> bool:
        """Notice a Redis restart (its run_id changed) and recover from it before reading; True if it did.
        AOF `everysec` loses up to about a second of writes: deliveries (re-read from our pending list),
        the group's entries-read (repaired) and whatever `on_restart` restores."""
        run_id = _text(self.redis.info("server")["run_id"])
        if self._run_id in (None, run_id):
            self._run_id = run_id
            return False
        self._run_id = run_id
        logger.warning("Redis restarted (new run_id): re-reading %s's pending entries", self.consumer)
        self._has_read_own_pending, self._own_cursor, self._claim_cursor = False, "0", "0-0"
        repair_entries_read(self.redis, self.stream, self.group)
        if self.on_restart is not None:
            self.on_restart()
        return True

    def take_over(self, consumer: str) -> int:
        """Move every entry `consumer` holds to this consumer (a resumed run under a new name: the old
        process is dead); they are then re-read like our own. Returns how many moved."""
        moved = 0
        while rows := self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=1000, consumername=consumer
        ):
            ids = [row["message_id"] for row in rows]
            self.redis.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)
            moved += len(ids)
        if moved:
            logger.info("took over %d entries %s held", moved, consumer)
        return moved

    def ack(self, entry_ids: Iterable[str], *, also: Callable[[Pipeline], object] | None = None) -> int:
        """Acknowledge entries; returns how many were pending.

        `also(pipe)` may queue more commands (e.g. a ledger SADD) to run in the same MULTI/EXEC.
        """
        ids = list(entry_ids)
        if not ids and also is None:
            return 0
        pipe = self.redis.pipeline(transaction=True)
        if also is not None:
            also(pipe)
        if ids:
            pipe.xack(self.stream, self.group, *ids)
        results = pipe.execute()
        self._in_flight.difference_update(ids)
        return int(results[-1]) if ids else 0

    def forget(self, entry_ids: Iterable[str]) -> None:
        """Stop tracking entries settled elsewhere (a Lua commit acked them, or another consumer took
        them over)."""
        self._in_flight.difference_update(entry_ids)

    def pending(self) -> int:
        """Entries delivered to the group and not yet acknowledged (all consumers)."""
        return int(self.redis.xpending(self.stream, self.group)["pending"])

    def lag(self) -> int | None:
        """Entries not yet delivered to the group (Redis >= 7), None if unknown."""
        for info in self.redis.xinfo_groups(self.stream):
            if _text(info.get("name")) == self.group:
                lag = info.get("lag")
                return None if lag is None else int(lag)
        return None

    def close(self) -> None:
        self.redis.close()

    # Internal helpers

    def _read_own_pending(self, count: int) -> list[StreamedTree]:
        """Entries this consumer name held when it last stopped: XREADGROUP from an id reads its own
        pending list, after that id (a cursor, so long lists are walked in pages)."""
        reply = self.redis.xreadgroup(self.group, self.consumer, {self.stream: self._own_cursor}, count=count)
        entries = _entries_of(reply)
        if entries:
            self._own_cursor = _text(entries[-1][0])
        if len(entries) < count:
            self._has_read_own_pending = True
        fresh = [(entry_id, fields) for entry_id, fields in entries if _text(entry_id) not in self._in_flight]
        if fresh:
            logger.info("re-reading %d entries %s held before a restart", len(fresh), self.consumer)
        return self._decode(fresh, is_claimed=True)

    def _autoclaim(self, count: int) -> list[StreamedTree]:
        """Take over entries idle longer than claim_idle_ms (their consumer is presumed dead)."""
        reply = self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=count,
        )
        self._claim_cursor = _text(reply[0])
        claimed = reply[1]
        # Redis 7 also lists (and drops from the pending list) entries deleted while pending.
        if len(reply) > 2 and reply[2]:
            logger.warning(
                "%d pending entries were deleted from %s before training", len(reply[2]), self.stream
            )
        # Our own in-flight entries can look idle during a long training step: never hand them out twice.
        claimed = [
            (entry_id, fields) for entry_id, fields in claimed if _text(entry_id) not in self._in_flight
        ]
        if claimed:
            logger.info("claimed %d idle entries of %s for %s", len(claimed), self.group, self.consumer)
        return self._decode(claimed, is_claimed=True)

    def _read_new(self, count: int, block_ms: int | None) -> list[StreamedTree]:
        reply = self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms or None
        )
        return self._decode(_entries_of(reply), is_claimed=False)

    def _decode(self, entries: list[tuple[Any, Any]], *, is_claimed: bool) -> list[StreamedTree]:
        trees = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            if not fields:  # deleted (or trimmed) while pending: nothing left to train on
                logger.warning("acking entry %s, deleted from %s while pending", entry_id, self.stream)
                self.redis.xack(self.stream, self.group, entry_id)
                continue
            payload = fields.get(TREE_FIELD.encode())
            try:
                if payload is None:
                    raise ValueError(f"entry has no {TREE_FIELD!r} field")
                tree = Tree.model_validate_json(payload)
            except (ValueError, ValidationError) as error:
                self._quarantine(entry_id, fields, error)
                continue
            self._in_flight.add(entry_id)
            trees.append(StreamedTree(entry_id, tree, is_claimed))
        return trees

    def quarantine(self, entry_id: str, reason: str, error: Exception, fields: dict[str, str]) -> None:
        """Move an entry that cannot be trained to the failures stream and ack it, in one transaction:
        it stops blocking the group, and nothing accepted vanishes."""
        record = {
            "reason": reason,
            "stream": self.stream,
            "entry_id": entry_id,
            "group": self.group,
            "consumer": self.consumer,
            "error": f"{type(error).__name__}: {str(error)[:500]}",
            "fields": fields,
            "time": time.time(),
        }
        logger.error(
            "%s: entry %s of %s moved to %s: %s", reason, entry_id, self.stream, self.failures, error
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.failures, {FAILURE_FIELD: json.dumps(record)})
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self._in_flight.discard(entry_id)

    def _quarantine(self, entry_id: str, fields: Any, error: Exception) -> None:
        self.num_corrupt += 1
        raw = {_text(key): _text(value)[:_MAX_RAW_CHARS] for key, value in (fields or {}).items()}
        self.quarantine(entry_id, "corrupt_tree_entry", error, raw)


def _entries_of(reply: Any) -> list[tuple[Any, Any]]:
    """The (id, fields) list of a one-stream XREADGROUP reply."""
    if not reply:
        return []
    return [entry for _, entries in reply for entry in entries]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
