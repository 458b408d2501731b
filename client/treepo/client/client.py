"""HTTP clients of the TreePO rollout service (httpx + pydantic only): `TreePOClient` and `AsyncTreePOClient`.

Both retry 429 (stream full), 503 (engine loading or swapping weights, Redis unreachable) and 409 with
`Retry-After` (the same Idempotency-Key still running) with exponential backoff, honouring `Retry-After`, a
bounded number of times; other errors raise `TreePOError` with the server's message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from treepo.client._http import (
    PromptLike,
    RetryPolicy,
    TreePOError,
    build_request,
    headers_for,
    parse_line,
    raise_for,
    retryable,
    rewind,
    rollout_result,
    weights_payload,
)
from treepo.client.schema import (
    Delivery,
    RolloutAccepted,
    RolloutTreeResponse,
    SamplingParams,
    Tree,
    TreeParams,
    WeightsInfo,
)

__all__ = ["AsyncTreePOClient", "RetryPolicy", "TreePOClient", "TreePOError"]


class TreePOClient:
    """Blocking client; `rollout_tree(..., delivery="stream")` yields trees as they complete."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=base_url, headers=headers_for(token), timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> TreePOClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def rollout_tree(
        self,
        prompts: Sequence[PromptLike],
        *,
        tree: TreeParams | dict[str, Any] | None = None,
        sampling: SamplingParams | dict[str, Any] | None = None,
        delivery: Delivery = "inline",
        return_logprobs: bool = True,
        idempotency_key: str | None = None,
    ) -> RolloutTreeResponse | RolloutAccepted | Iterator[Tree]:
        """Trees (inline), the accepted tree ids (queue), or an iterator of trees (stream).

        Retries reuse one Idempotency-Key (a fresh one unless given), so nothing is enqueued twice."""
        request = build_request(prompts, tree, sampling, delivery, return_logprobs)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        body = request.model_dump(mode="json")
        if delivery == "stream":
            return self._stream(body, headers)
        return rollout_result(self._send("POST", "/rollout_tree", json=body, headers=headers))

    def update_weights(
        self,
        *,
        path: str | None = None,
        file: str | Path | BinaryIO | None = None,
        version: int | None = None,
    ) -> WeightsInfo:
        """Load a checkpoint (a path under the service's weights dir, or a file to upload)."""
        payload = weights_payload(path, file, version)
        try:
            response = self._send("POST", "/weights", **payload)
        finally:
            if "files" in payload and not hasattr(file, "read"):
                payload["files"]["file"][1].close()
        raise_for(response)
        return WeightsInfo.model_validate_json(response.content)

    def weights(self) -> WeightsInfo:
        response = self._send("GET", "/weights")
        raise_for(response)
        return WeightsInfo.model_validate_json(response.content)

    def get_tree(self, tree_id: str) -> Tree:
        response = self._send("GET", f"/trees/{tree_id}")
        raise_for(response)
        return Tree.model_validate_json(response.content)

    def health(self) -> dict[str, Any]:
        """/readyz's answer (engine and Redis state), whether ready or not."""
        response = self._http.get("/readyz")
        return {"status_code": response.status_code, **response.json()}

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retry.max_attempts):
            last = attempt == self.retry.max_attempts - 1
            rewind(kwargs)
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(self.retry.delay(attempt, None))
                continue
            if not retryable(response) or last:
                return response
            time.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
        raise AssertionError("unreachable")

    def _stream(self, body: dict[str, Any], headers: dict[str, str]) -> Iterator[Tree]:
        for attempt in range(self.retry.max_attempts):
            with self._http.stream("POST", "/rollout_tree", json=body, headers=headers) as response:
                if retryable(response) and attempt < self.retry.max_attempts - 1:
                    time.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
                    continue
                if response.status_code >= 400:
                    response.read()
                    raise_for(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield parse_line(line)
                return


class AsyncTreePOClient:
    """The asyncio twin of `TreePOClient` (same methods, awaitable; stream mode is an async iterator)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers_for(token), timeout=timeout_s, transport=transport
        )

    async def __aenter__(self) -> AsyncTreePOClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def rollout_tree(
        self,
        prompts: Sequence[PromptLike],
        *,
        tree: TreeParams | dict[str, Any] | None = None,
        sampling: SamplingParams | dict[str, Any] | None = None,
        delivery: Delivery = "inline",
        return_logprobs: bool = True,
        idempotency_key: str | None = None,
    ) -> RolloutTreeResponse | RolloutAccepted | AsyncIterator[Tree]:
        """See `TreePOClient.rollout_tree`; stream mode returns an async iterator."""
        request = build_request(prompts, tree, sampling, delivery, return_logprobs)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        body = request.model_dump(mode="json")
        if delivery == "stream":
            return self._stream(body, headers)
        return rollout_result(await self._send("POST", "/rollout_tree", json=body, headers=headers))

    async def update_weights(
        self,
        *,
        path: str | None = None,
        file: str | Path | BinaryIO | None = None,
        version: int | None = None,
    ) -> WeightsInfo:
        payload = weights_payload(path, file, version)
        try:
            response = await self._send("POST", "/weights", **payload)
        finally:
            if "files" in payload and not hasattr(file, "read"):
                payload["files"]["file"][1].close()
        raise_for(response)
        return WeightsInfo.model_validate_json(response.content)

    async def weights(self) -> WeightsInfo:
        response = await self._send("GET", "/weights")
        raise_for(response)
        return WeightsInfo.model_validate_json(response.content)

    async def get_tree(self, tree_id: str) -> Tree:
        response = await self._send("GET", f"/trees/{tree_id}")
        raise_for(response)
        return Tree.model_validate_json(response.content)

    async def health(self) -> dict[str, Any]:
        response = await self._http.get("/readyz")
        return {"status_code": response.status_code, **response.json()}

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retry.max_attempts):
            last = attempt == self.retry.max_attempts - 1
            rewind(kwargs)
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                await asyncio.sleep(self.retry.delay(attempt, None))
                continue
            if not retryable(response) or last:
                return response
            await asyncio.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
        raise AssertionError("unreachable")

    async def _stream(self, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[Tree]:
        for attempt in range(self.retry.max_attempts):
            async with self._http.stream("POST", "/rollout_tree", json=body, headers=headers) as response:
                if retryable(response) and attempt < self.retry.max_attempts - 1:
                    await asyncio.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
                    continue
                if response.status_code >= 400:
                    await response.aread()
                    raise_for(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield parse_line(line)
                return
