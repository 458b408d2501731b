"""The SGLang workers' admin side: their limits, weight pushes, versions, health and restarts.

Admin calls go to every worker directly (`admin_urls`), never through sglang-router: the router forwards
generation but has no /update_weights_from_disk, /pause_generation or /continue_generation. Each worker
reports the weights it serves as `weight_version`: the version string of the last push, or its launch
value ("default") after a restart. A worker whose version is not the engine's current policy version was
restarted (or missed a push) and gets the current weights re-pushed before it counts as healthy again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from treepo.service.engine.protocol import EngineError, EngineUnavailable
from treepo.service.engine.sglang_wire import context_limit, json_or_text, raise_for_status

logger = logging.getLogger(__name__)

_LOADED_NOT_FLUSHED = "Weights were updated, but the cache was not flushed"  # SGLang 0.5.23's 400

Http = Callable[..., Awaitable[httpx.Response]]
"""(method, url, body=None, *, admin=False, timeout_s=None) -> response; EngineUnavailable if unreachable."""


class WeightUpdateError(EngineError):
    """At least one worker refused or failed the weight update (its message says why)."""

    reason = "weight_update"


class WorkersUnreachable(WeightUpdateError, EngineUnavailable):
    """A worker could not be reached during the update: a retry later may succeed (HTTP 503)."""

    reason = "engine_unavailable"


class WorkerAdmin:
    """Weights and health of a fixed set of SGLang workers."""

    def __init__(
        self, urls: list[str], http: Http, *, pause_for_update: bool = False, health_timeout_s: float = 5.0
    ) -> None:
        self.urls = urls
        self._http = http
        self.pause_for_update = pause_for_update
        self.health_timeout_s = health_timeout_s
        self.version = 0
        self.weights: str | None = None  # what the workers load for `version` (None: their launch weights)
        self.updating = False
        self.num_repushes = 0  # current weights re-pushed to a restarted worker (tests, logs)
        self._lock = asyncio.Lock()  # one push at a time: an update, or a restarted worker's re-push
        self._repushes: dict[str, asyncio.Task[None]] = {}
        self.reported: dict[str, str] = {}  # worker -> the weight_version it last reported
        self.catch_up: Callable[[], Awaitable[None]] | None = None  # see SGLangEngine.share_weights
        self.unhealthy: list[str] = []  # workers the last health check found down or on other weights

    def accepts(self, reported: str) -> bool:
        """Whether a worker reporting `reported` serves the current policy version.

        Before the first push (version 0) whatever the workers launched with is version 0.
        """
        return self.version == 0 or reported == str(self.version)

    def read_limits(self, model_context: int, wait_s: float, headers: dict[str, str]) -> int:
        """The smallest `context_limit` over the workers, waiting up to `wait_s` for them to answer."""
        limits = []
        deadline = time.monotonic() + wait_s
        with httpx.Client(timeout=10.0, headers=headers) as client:
            for url in self.urls:
                while True:
                    try:
                        response = client.get(url + "/get_server_info")
                        raise_for_status(response, url)
                        limits.append(context_limit(response.json(), model_context))
                        break
                    except (httpx.HTTPError, EngineUnavailable) as exc:
                        if time.monotonic() >= deadline:
                            raise EngineUnavailable(
                                f"SGLang worker {url} did not answer /get_server_info within {wait_s:.0f} s "
                                f"({type(exc).__name__}: {exc}); is it running?"
                            ) from exc
                        time.sleep(1.0)
        logger.info("SGLang workers serve paths of up to %d tokens (%s)", min(limits), self.urls)
        return min(limits)

    async def update(self, model_dir: str, version: int) -> None:
        """Load `model_dir` on every worker; WeightUpdateError naming each that failed."""
        async with self._lock:
            self.updating = True
            try:
                results = await asyncio.gather(
                    *(self._push(url, model_dir, version) for url in self.urls), return_exceptions=True
                )
            finally:
                self.updating = False
            failures = [f"{url}: {r}" for url, r in zip(self.urls, results, strict=True) if r is not None]
            if failures:  # the workers that loaded it are re-pushed the current version when next checked
                unreachable = any(isinstance(r, EngineUnavailable) for r in results)
                raise (WorkersUnreachable if unreachable else WeightUpdateError)(
                    f"weight update to version {version} failed on {len(failures)} of {len(self.urls)} "
                    "SGLang workers: " + "; ".join(failures)
                )
            self.version, self.weights = version, model_dir

    async def health(self) -> bool:
        """At least one worker answers and serves the current version; `unhealthy` lists the others (a
        restarted one is re-pushed meanwhile). Requests fail over to the healthy workers, and every replica
        shares every worker: requiring all of them would take every replica out of its load balancer
        when one worker dies, while the others can still answer.

        While an update loads weights the answer stays True: the workers are busy, not down (the update
        reports its own failures), so readiness does not flap with every push.
        """
        if self.updating:
            return True
        checks = await asyncio.gather(*(self._healthy(url) for url in self.urls), return_exceptions=True)
        self.unhealthy = [url for url, check in zip(self.urls, checks, strict=True) if check is not True]
        return not self.urls or len(self.unhealthy) < len(self.urls)

    async def resync(self, url: str | None) -> None:
        """Bring `url` (None: every worker) back to the current version before it is used again."""
        for target in [url] if url in self.urls else self.urls:
            await asyncio.shield(self._start_repush(target))

    async def flush(self) -> None:
        """Empty every worker's prefix cache (it refuses while requests run)."""
        for url in self.urls:
            raise_for_status(await self._http("POST", url + "/flush_cache", admin=True), url)

    async def aclose(self) -> None:
        for task in self._repushes.values():
            task.cancel()

    # Internal helpers

    async def _healthy(self, url: str) -> bool:
        if self.accepts(await self._reported(url)):
            return True
        self._start_repush(url)
        return False

    def _start_repush(self, url: str) -> asyncio.Task[None]:
        task = self._repushes.get(url)
        if task is None or task.done():
            task = self._repushes[url] = asyncio.ensure_future(self._repush(url))
            task.add_done_callback(_log_failure)
        return task

    async def _repush(self, url: str) -> None:
        async with self._lock:
            if self.catch_up is not None:  # the worker may serve what another replica pushed
                await self.catch_up()
            reported = await self._reported(url)
            if self.accepts(reported) or self.weights is None:
                return
            logger.warning(
                "SGLang worker %s serves weights %r, not policy version %d (restarted?): re-pushing %s",
                url, reported, self.version, self.weights,
            )  # fmt: skip
            await self._push(url, self.weights, self.version)
            self.num_repushes += 1

    async def _reported(self, url: str) -> str:
        response = await self._http("GET", url + "/get_model_info", timeout_s=self.health_timeout_s)
        raise_for_status(response, url)
        self.reported[url] = str(response.json().get("weight_version", ""))
        return self.reported[url]

    async def _push(self, url: str, model_dir: str, version: int) -> None:
        body = {"model_path": model_dir, "weight_version": str(version), "flush_cache": True}
        async with self._paused(url) if self.pause_for_update else contextlib.nullcontext():
            response = await self._post(url, "/update_weights_from_disk", body)
        if response.status_code not in (200, 400):
            raise_for_status(response, url)
        answer = json_or_text(response)
        if isinstance(answer, dict) and str(answer.get("message", "")).startswith(_LOADED_NOT_FLUSHED):
            await self._flush_after_load(url, version)  # the weights are in: the old ones' cache must go
            return
        if not (isinstance(answer, dict) and answer.get("success")):
            message = answer.get("message", answer) if isinstance(answer, dict) else answer
            raise WeightUpdateError(f"HTTP {response.status_code}: {message}")

    async def _flush_after_load(self, url: str, version: int) -> None:
        """Finish a load whose own flush found requests queued (another replica's, on a shared worker): the
        cache of the old weights is flushed, retried while they finish, then with generation paused (mode
        abort: their callers resubmit them), as SGLang's docs and slime do; then the worker is told the
        version (it records it only when the whole update succeeds)."""
        for delay_s in (0.05, 0.1, 0.2, 0.4):
            await asyncio.sleep(delay_s)
            if (await self._post(url, "/flush_cache", {})).status_code == 200:
                break
        else:
            logger.warning("SGLang worker %s busy after a weight load: pausing it to flush its cache", url)
            async with self._paused(url):
                raise_for_status(await self._post(url, "/flush_cache", {}), url)
        body = {"new_version": str(version), "abort_all_requests": False}
        raise_for_status(await self._post(url, "/update_weight_version", body), url)

    @contextlib.asynccontextmanager
    async def _paused(self, url: str) -> AsyncIterator[None]:
        """Generation paused on `url` (mode abort: running requests go back to their callers, who resubmit
        them), resumed afterwards whatever happened."""
        raise_for_status(await self._post(url, "/pause_generation", {"mode": "abort"}), url)
        try:
            yield
        finally:
            with contextlib.suppress(EngineError):
                await self._post(url, "/continue_generation", {})

    async def _post(self, url: str, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self._http("POST", url + path, body, admin=True)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("re-push to a restarted SGLang worker failed: %s", task.exception())
