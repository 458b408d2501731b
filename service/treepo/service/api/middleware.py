"""Pure ASGI middleware (streaming-safe): request metrics, bearer auth, request size limits."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from treepo.service.metrics import ServiceMetrics

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def route_template(routes: list[BaseRoute], scope: Scope) -> str:
    """The matched route's path template (bounded label values), or 'unmatched'."""
    partial = "unmatched"
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path", "unmatched")
        if match is Match.PARTIAL and partial == "unmatched":  # e.g. wrong method: 405 on a known path
            partial = getattr(route, "path", "unmatched")
    return partial


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts every request by route template, method and status, and times it to the last body byte."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: list[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_template(self.routes, scope)
        status = 500  # if the app dies before answering
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http_duration.labels(route=route).observe(time.perf_counter() - started)
            self.metrics.http_requests.labels(route=route, method=scope["method"], status=str(status)).inc()


class AuthMiddleware:
    """With a token set, every path but the probes and /metrics needs `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str | None, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.expected is None or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        self.metrics.rejected.labels(reason="unauthorized").inc()
        detail = "missing or wrong bearer token: send 'Authorization: Bearer <TREEPO_API_TOKEN>'"
        await send_json(send, 401, detail, {"WWW-Authenticate": "Bearer"})


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length up front or by counting a chunked body. `path_limits`
    override the limit per path; `upload_limits` apply instead to multipart bodies of their paths (a weights
    upload may be gigabytes, a JSON body on the same route only a few bytes)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        metrics: ServiceMetrics,
        path_limits: dict[str, int] | None = None,
        upload_limits: dict[str, int] | None = None,
    ) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics
        self.path_limits, self.upload_limits = path_limits or {}, upload_limits or {}

    def limit(self, scope: Scope, headers: dict[bytes, bytes]) -> int:
        path = scope["path"]
        if path in self.upload_limits and headers.get(b"content-type", b"").startswith(
            b"multipart/form-data"
        ):
            return self.upload_limits[path]
        return self.path_limits.get(path, self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        limit = self.limit(scope, headers)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reject(send, limit)
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, limit)

    async def _reject(self, send: Send, limit: int) -> None:
        self.metrics.rejected.labels(reason="too_large").inc()
        detail = f"request body is larger than {limit} bytes; split it into smaller requests"
        await send_json(send, 413, detail)


class CancelOnDisconnectMiddleware:
    """Cancels the work of a request on `paths` when its client disconnects before the answer is complete:
    an abandoned inline rollout must not keep the engine busy for minutes. Work cancelled by a stopping server
    answers 503 + Retry-After. After the body has been read, this middleware is the only reader of `receive`
    (later readers get the disconnect from it)."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], retry_after_s: int) -> None:
        self.app, self.paths, self.retry_after_s = app, paths, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        body_read, gone = asyncio.Event(), asyncio.Event()
        started = finished = False

        async def app_receive() -> Message:
            if body_read.is_set():
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal started, finished
            started = started or message["type"] == "http.response.start"
            finished = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        work = asyncio.ensure_future(self.app(scope, app_receive, app_send))

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not finished:
                work.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await work
        except asyncio.CancelledError:
            if not started and gone.is_set():  # for the metrics: 499 = client closed request (never seen)
                await send_json(send, 499, "the client disconnected; its work was cancelled")
            elif not started:  # the server is stopping (its grace period is over)
                detail = (
                    "the service is stopping; retry after the Retry-After delay (another replica answers)"
                )
                await send_json(send, 503, detail, {"Retry-After": str(self.retry_after_s)})
            if not gone.is_set() or _being_cancelled():
                raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _TooLarge(BaseException):  # not Exception: body parsers must not swallow it into a 400
    """The body went over the limit while being read."""
