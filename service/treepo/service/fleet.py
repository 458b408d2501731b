"""One fleet, many replicas: the policy version and its checkpoint live in Redis, not in a process.

A `POST /weights` on any replica holds the fleet's weights lock (a lease in Redis, renewed while the engine
loads), loads, then records {version, path, digest} with a compare-and-set on the version: two pushes never
interleave and a version is recorded once. The other replicas poll the record and adopt it: an engine over
SGLang workers that every replica shares only takes the version number (the workers already serve it), an
engine of its own loads the checkpoint from the shared weights directory. A replica that starts late adopts
the record before it reports ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from treepo.service.runtime import EngineRuntime
    from treepo.service.weights_store import WeightsStore

logger = logging.getLogger(__name__)

LEASE_S = 30.0  # a pusher that dies frees the lock this long after its last renewal
LOCK_WAIT_S = 60.0  # a push waits this long for another replica's push, then answers 409 + Retry-After
POLL_S = 0.1  # how often a waiting push looks at the lock again

# KEYS: record, lock. ARGV: token, version, path, digest. 1 recorded, 0 lock lost, -1 version not above.
_RECORD = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if tonumber(ARGV[2]) <= current then return -1 end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'path', ARGV[3], 'digest', ARGV[4])
return 1
"""
# KEYS: lock. ARGV: token, lease ms (renew) or nothing (release).
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True, slots=True)
class FleetWeights:
    """What the fleet serves: `path` relative to the weights directory, `digest` its sha256."""

    version: int
    path: str
    digest: str


class FleetBusy(Exception):
    """Another replica's push holds the lock (or took it over): retry after a while."""


class Fleet:
    """The fleet's weights record and push lock under `{prefix}:fleet:`."""

    def __init__(self, redis: aioredis.Redis, prefix: str, *, lease_s: float = LEASE_S) -> None:
        self.redis = redis
        self.replica = uuid.uuid4().hex[:12]
        self.lease_s = lease_s
        self.lock_wait_s = LOCK_WAIT_S
        self.record_key = f"{prefix}:fleet:weights"
        self.lock_key = f"{prefix}:fleet:weights-lock"
        self._record = redis.register_script(_RECORD)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._token: str | None = None  # of the push this replica runs (pushes are serialised per replica)

    async def read(self) -> FleetWeights | None:
        raw = await self.redis.hgetall(self.record_key)
        if not raw:
            return None
        return FleetWeights(version=int(raw["version"]), path=raw["path"], digest=raw["digest"])

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the push lock (renewed meanwhile); FleetBusy if another replica holds it past `lock_wait_s`."""
        token = f"{self.replica}:{uuid.uuid4().hex}"
        lease_ms = int(self.lease_s * 1000)
        deadline = time.monotonic() + self.lock_wait_s
        while not await self.redis.set(self.lock_key, token, nx=True, px=lease_ms):
            if time.monotonic() >= deadline:
                raise FleetBusy(f"another replica has been pushing weights for over {self.lock_wait_s:.0f} s")
            await asyncio.sleep(POLL_S)
        self._token = token
        renewer = asyncio.create_task(self._keep(token, lease_ms), name="fleet-lock-renewal")
        try:
            yield
        finally:
            self._token = None
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self._release(keys=[self.lock_key], args=[token])
            except RedisError:  # the lease frees it
                logger.warning("could not release the fleet weights lock; it lapses in %.0f s", self.lease_s)

    async def record(self, weights: FleetWeights) -> None:
        """Record what this replica's push loaded (inside `locked`); FleetBusy if the lock was lost."""
        args = [self._token or "", weights.version, weights.path, weights.digest]
        if await self._record(keys=[self.record_key, self.lock_key], args=args) == 0:
            raise FleetBusy("the weights lock lapsed during the load and another replica took it")

    async def wait_for_others(self) -> None:
        """Return once no other replica is pushing (this replica's own push does not count)."""
        while True:
            holder = await self.redis.get(self.lock_key)
            if holder is None or holder.startswith(f"{self.replica}:"):
                return
            await asyncio.sleep(POLL_S)

    async def _keep(self, token: str, lease_ms: int) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._renew(keys=[self.lock_key], args=[token, lease_ms])
            except RedisError:
                logger.warning("could not renew the fleet weights lock", exc_info=True)


class FleetFollower:
    """Keeps this replica on the fleet's version: at start-up, every `poll_s`, and on demand."""

    def __init__(
        self, fleet: Fleet, runtime: EngineRuntime, store: WeightsStore, *, poll_s: float = 1.0
    ) -> None:
        self.fleet, self.runtime, self.store, self.poll_s = fleet, runtime, store, poll_s
        self.error: str | None = None  # the fleet's version could not be adopted (readyz says so)

    async def start(self) -> None:
        """Before the engine reports ready: share its workers' weights and adopt the fleet's version."""
        share = getattr(self.runtime.loaded.metered.inner, "share_weights", None)
        if share is not None:
            share(self._before_repush)
        try:
            await self.catch_up(wait=False)
        except RedisError:
            logger.warning(
                "could not read the fleet's weights at start-up; following them later", exc_info=True
            )

    async def catch_up(self, wait: bool = True) -> None:
        """Adopt the fleet's recorded version if it is newer; `wait` first for another replica's push."""
        if wait:
            await self.fleet.wait_for_others()
        record = await self.fleet.read()
        if record is None or record.version <= self.runtime.weights.policy_version:
            return
        try:
            await self.store.adopt(self.runtime, record)
        except Exception as exc:
            self.error = f"cannot serve the fleet's policy_version {record.version}: {exc}"
            raise
        self.error = None

    async def _before_repush(self) -> None:
        """A worker serves other weights than this replica's: adopt a newer fleet version first (bounded;
        without Redis the engine goes on with what it knows)."""
        try:
            await asyncio.wait_for(self.catch_up(), LOCK_WAIT_S)
        except (RedisError, TimeoutError):
            logger.warning("could not catch up with the fleet before re-pushing a worker", exc_info=True)

    async def run(self) -> None:
        """Poll the record for as long as the service runs; errors are logged and retried."""
        while True:
            await asyncio.sleep(self.poll_s)
            if self.runtime.state != "ready":
                continue
            try:
                await self.catch_up(wait=False)
            except Exception:
                logger.warning("could not adopt the fleet's weights; retrying", exc_info=True)
