"""The loaded engine and everything tied to it: readiness, atomic weight swaps, engine-call metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from treepo.client.schema import WeightsInfo
from treepo.service.codec import Codec
from treepo.service.config import Settings
from treepo.service.engine.protocol import (
    Engine,
    EngineError,
    EngineUnavailable,
    EngineWrapper,
    GenerateOutput,
    GenerateRequest,
)
from treepo.service.factory import EngineFactory, build_engine
from treepo.service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from treepo.service.sampler import TreeSampler

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed"]


class VersionConflict(ValueError):
    """A weight update whose version is not above the current one."""


class SwapGate:
    """Readers (engine calls) share; a writer (weight swap) waits for them to drain and blocks new ones."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._active = 0
        self.is_swapping = False

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self.is_swapping)
            self._active += 1
        try:
            yield
        finally:
            async with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self.is_swapping)
            self.is_swapping = True
            await self._cond.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            async with self._cond:
                self.is_swapping = False
                self._cond.notify_all()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no swap is running; False if one still is after `timeout_s`."""
        async with self._cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cond.wait_for(lambda: not self.is_swapping), timeout_s)
            return not self.is_swapping


def engine_error_reason(exc: BaseException) -> str:
    """The `treepo_engine_errors_total` label of an engine exception."""
    if isinstance(exc, EngineUnavailable):
        return "unavailable"
    if isinstance(exc, EngineError) and exc.reason == "invalid":
        return "invalid"
    return "error"


class MeteredEngine(EngineWrapper):
    """The engine every sampler shares: each request counted, and held off while weights swap."""

    def __init__(self, inner: Engine, gate: SwapGate, metrics: ServiceMetrics) -> None:
        super().__init__(inner)
        self._gate = gate
        self._metrics = metrics

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        async with self._gate.shared():
            self._metrics.engine_in_flight.inc()
            try:
                output = await self.inner.generate(request)
            except Exception as exc:
                self._metrics.engine_errors.labels(reason=engine_error_reason(exc)).inc()
                raise
            finally:
                self._metrics.engine_in_flight.dec()
        self._metrics.observe_engine_call(output.prefill_tokens, output.cached_tokens)
        return output


@dataclass(slots=True)
class Loaded:
    """What exists once the engine is up."""

    metered: MeteredEngine  # the engine every sampler shares
    codec: Codec
    sampler: TreeSampler


class EngineRuntime:
    """Loads the engine in the background (readyz says so meanwhile) and swaps its weights atomically."""

    def __init__(
        self, settings: Settings, metrics: ServiceMetrics, factory: EngineFactory = build_engine
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.gate = SwapGate()
        self.state: State = "loading"
        self.error: str | None = None
        self.weights = WeightsInfo(policy_version=0)
        self._factory = factory
        self._loaded: Loaded | None = None
        self._update_lock = asyncio.Lock()

    async def load(self, before_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Build the engine off the event loop, then run `before_ready` (the fleet's version); never raises
        (the failure is reported by readyz)."""
        from treepo.service.sampler import TreeSampler

        try:
            inner, codec = await asyncio.to_thread(self._factory, self.settings)
        except Exception as exc:  # any loading failure: reported, not crashed on
            logger.exception("engine failed to load")
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            self.metrics.engine_errors.labels(reason="unavailable").inc()
            return
        metered = MeteredEngine(inner, self.gate, self.metrics)
        sampler = TreeSampler(metered, codec.decode)
        self._loaded = Loaded(metered=metered, codec=codec, sampler=sampler)
        self.weights = WeightsInfo(policy_version=inner.policy_version)
        self.metrics.policy_version.set(inner.policy_version)
        if before_ready is not None:
            try:
                await before_ready()
            except Exception:  # reported by readyz through the fleet follower; the engine itself is up
                logger.exception("could not adopt the fleet's weights at start-up")
        self.state = "ready"
        logger.info("engine ready (max_context=%d)", inner.max_context)

    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            raise EngineUnavailable(self.unavailable_reason())
        return self._loaded

    def unavailable_reason(self) -> str:
        if self.state == "failed":
            return f"the engine failed to load ({self.error}); fix the configuration and restart"
        return "the engine is still loading; retry after the Retry-After delay"

    async def acquire(self) -> Loaded:
        """The engine for a new request, waiting briefly for a weight swap; EngineUnavailable if not."""
        loaded = self.loaded
        if not await self.gate.wait_idle(self.settings.swap_wait_s):
            raise EngineUnavailable("the engine is swapping weights; retry after the Retry-After delay")
        return loaded

    async def update_weights(self, path: str, version: int) -> WeightsInfo:
        """Swap weights between engine batches: in-flight trees go on, later nodes carry the new version."""
        loaded = self.loaded
        async with self._update_lock:
            if version <= self.weights.policy_version:
                raise VersionConflict(
                    f"version must be greater than the current policy_version {self.weights.policy_version} "
                    f"(got {version}); omit it to use {self.weights.policy_version + 1}"
                )
            started = time.perf_counter()
            try:
                async with self.gate.exclusive():
                    await loaded.metered.update_weights(path, version)
            except Exception:
                self.metrics.weight_update_failures.inc()
                self.metrics.engine_errors.labels(reason="weights").inc()
                raise
            self.metrics.weight_update_duration.observe(time.perf_counter() - started)
            self.weights = WeightsInfo(policy_version=version, path=path, loaded_at=time.time())
            self.metrics.policy_version.set(version)
            logger.info("weights %s loaded as policy_version %d", path, version)
            return self.weights

    @property
    def shares_weights(self) -> bool:
        """The engine's workers are shared with other replicas (SGLang): a version one replica pushed is
        served by all, so the others adopt it without loading."""
        return hasattr(self.loaded.metered.inner, "adopt_weights")

    @property
    def workers_down(self) -> list[str] | None:
        """The engine's workers that failed its last health check; None for engines without workers."""
        inner = self._loaded.metered.inner if self._loaded else None
        return getattr(inner, "unhealthy_workers", None)

    def adopt(self, path: str, version: int) -> WeightsInfo:
        """Serve `version`, which another replica loaded on the shared workers (see `shares_weights`)."""
        self.loaded.metered.inner.adopt_weights(path, version)  # type: ignore[attr-defined]
        self.weights = WeightsInfo(policy_version=version, path=path, loaded_at=time.time())
        self.metrics.policy_version.set(version)
        logger.info("policy_version %d (%s) adopted from the fleet", version, path)
        return self.weights

    async def health(self) -> bool:
        if self._loaded is None:
            return False
        try:
            return bool(await self._loaded.metered.health())
        except Exception:
            logger.warning("engine health check failed", exc_info=True)
            return False
        finally:  # SGLang workers: what each serves, as its health check found it
            for worker, version in getattr(self._loaded.metered.inner, "worker_versions", {}).items():
                self.metrics.engine_worker_weight_version.labels(worker=worker).set(version)

    async def close(self) -> None:
        inner = self._loaded.metered.inner if self._loaded else None
        closer = getattr(inner, "aclose", None) or getattr(inner, "close", None)
        if closer is not None:
            result = closer()
            if asyncio.iscoroutine(result):
                await result
