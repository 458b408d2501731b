"""Every refusal the API gives, as exceptions mapped to status codes with clear messages and metrics."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from treepo.service.engine.protocol import EngineUnavailable
from treepo.service.rollout import RolloutInputError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal with a status, a message saying how to fix it, and an optional metric reason."""

    def __init__(
        self, status: int, detail: str, *, reason: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.reason, self.retry_after_s = status, detail, reason, retry_after_s


def install_error_handlers(app: FastAPI) -> None:
    """Map validation, rollout-input, engine, Redis and API errors to 4xx/503 responses (never a 500)."""

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        _count(request, "invalid")
        assert isinstance(exc, RequestValidationError), f"{exc=}"
        return JSONResponse({"detail": [_safe_error(e) for e in exc.errors()]}, status_code=422)

    async def on_rollout_input(request: Request, exc: Exception) -> JSONResponse:
        _count(request, "invalid")
        assert isinstance(exc, RolloutInputError), f"{exc=}"
        return JSONResponse({"detail": exc.errors}, status_code=422)

    async def on_unavailable(request: Request, exc: Exception) -> JSONResponse:
        _count(request, "engine_unavailable")
        retry = request.app.state.settings.retry_after_s
        detail = redact_paths(str(exc))
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(retry)})

    async def on_redis_error(request: Request, exc: Exception) -> JSONResponse:
        logger.warning("Redis call failed during %s: %r", request.url.path, exc)
        _count(request, "redis_unavailable")
        retry = request.app.state.settings.retry_after_s
        detail = "Redis is unreachable or refused the write; nothing was accepted, retry later"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(retry)})

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError), f"{exc=}"
        if exc.reason:
            _count(request, exc.reason)
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        detail = redact_paths(exc.detail) if isinstance(exc.detail, str) else exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status, headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(RolloutInputError, on_rollout_input)
    app.add_exception_handler(EngineUnavailable, on_unavailable)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RedisError, on_redis_error)


def _count(request: Request, reason: str) -> None:
    request.app.state.metrics.rejected.labels(reason=reason).inc()


def _safe_error(error: dict[str, Any]) -> dict[str, Any]:
    """A validation error whose echoed input is valid UTF-8 JSON (NaN, lone surrogates, deep nesting would
    otherwise turn the 422 into a 500): such an input is replaced by a short ASCII repr."""
    error = dict(error)
    error.pop("url", None)
    try:
        json.dumps(jsonable_encoder(error), allow_nan=False, ensure_ascii=False).encode("utf-8")
        return jsonable_encoder(error)
    except (ValueError, RecursionError, UnicodeEncodeError):
        try:
            error["input"] = ascii(error.get("input"))[:200]
        except RecursionError:
            error["input"] = "<nested too deep to echo>"
        error.pop("ctx", None)
        return jsonable_encoder(error)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~])/([^\s'\"/:]+)((?:/[^\s'\"/:]*)*)")


def redact_paths(text: str) -> str:
    """`text` with every absolute path of this host cut to its last component: messages leave the server,
    its directory layout does not. Only paths whose top directory exists here (/data, /home...) are touched,
    so API routes such as /trees/{id} stay readable."""

    def cut(match: re.Match[str]) -> str:
        top, rest = match.group(1), match.group(2)
        if not Path("/", top).exists():
            return match.group(0)
        return (rest.rstrip("/").rsplit("/", 1)[-1] if rest.strip("/") else top) or top

    return _ABSOLUTE_PATH.sub(cut, text)
