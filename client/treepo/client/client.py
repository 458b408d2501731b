"""HTTP clients of the TreePO rollout service (httpx + pydantic only): `TreePOClient` and `AsyncTreePOClient`.

Both retry 429 (stream full) and 503 (engine loading or swapping weights) with exponential backoff, honouring
`Retry-After`, a bounded number of times; other errors raise `TreePOError` with the server's message.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from treepo.client.schema import (
    Delivery,
    Prompt,
    RolloutAccepted,
    RolloutTreeRequest,
    RolloutTreeResponse,
    SamplingParams,
    Tree,
    TreeParams,
    WeightsInfo,
)

PromptLike = Prompt | str | list[int] | dict[str, Any]
RETRY_STATUSES = frozenset({429, 503})


class TreePOError(RuntimeError):
    """The service refused or failed a request; `status` and `detail` are the server's answer."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """Backoff for 429/503 (and connection errors): base * 2**attempt, capped, or the server's Retry-After."""

    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError(f"need max_attempts >= 1 and 0 <= base_delay_s <= max_delay_s (got {self})")

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_delay_s)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.base_delay_s * 2**attempt, self.max_delay_s)


def build_request(
    prompts: Sequence[PromptLike],
    tree: TreeParams | dict[str, Any] | None,
    sampling: SamplingParams | dict[str, Any] | None,
    delivery: Delivery,
    return_logprobs: bool,
) -> RolloutTreeRequest:
    """Validate locally (same schema as the server); a str is a text prompt, a list of ints input_ids."""
    return RolloutTreeRequest(
        prompts=[_prompt(p) for p in prompts],
        tree=TreeParams.model_validate(tree or {}),
        sampling=SamplingParams.model_validate(sampling or {}),
        delivery=delivery,
        return_logprobs=return_logprobs,
    )


def _prompt(prompt: PromptLike) -> Prompt:
    if isinstance(prompt, Prompt):
        return prompt
    if isinstance(prompt, str):
        return Prompt(text=prompt)
    if isinstance(prompt, list):
        return Prompt(input_ids=prompt)
    return Prompt.model_validate(prompt)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except (json.JSONDecodeError, AttributeError):
        detail = response.text
    raise TreePOError(response.status_code, detail)


def _parse_line(line: str) -> Tree:
    payload = json.loads(line)
    if "error" in payload:
        raise TreePOError(500, payload["error"])
    return Tree.model_validate(payload)


def _rollout_result(response: httpx.Response) -> RolloutTreeResponse | RolloutAccepted:
    _raise_for(response)
    if response.status_code == 202:
        return RolloutAccepted.model_validate_json(response.content)
    return RolloutTreeResponse.model_validate_json(response.content)


def _weights_payload(
    path: str | None, file: str | Path | BinaryIO | None, version: int | None
) -> dict[str, Any]:
    if (path is None) == (file is None):
        raise ValueError("give exactly one of path= (a checkpoint under the service's weights dir) or file=")
    if path is not None:
        return {"json": {"path": path, "version": version}}
    data = {"version": str(version)} if version is not None else {}
    handle = open(file, "rb") if isinstance(file, str | Path) else file  # noqa: SIM115 (closed by the caller)
    return {"files": {"file": ("weights.safetensors", handle, "application/octet-stream")}, "data": data}


def _rewind(kwargs: dict[str, Any]) -> None:
    """An upload is re-sent from its start on a retry."""
    for _, handle, _ in kwargs.get("files", {}).values():
        handle.seek(0)


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
            base_url=base_url, headers=_headers(token), timeout=timeout_s, transport=transport
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
        return _rollout_result(self._send("POST", "/rollout_tree", json=body, headers=headers))

    def update_weights(
        self,
        *,
        path: str | None = None,
        file: str | Path | BinaryIO | None = None,
        version: int | None = None,
    ) -> WeightsInfo:
        """Load a checkpoint (a path under the service's weights dir, or a file to upload)."""
        payload = _weights_payload(path, file, version)
        try:
            response = self._send("POST", "/weights", **payload)
        finally:
            if "files" in payload and not hasattr(file, "read"):
                payload["files"]["file"][1].close()
        _raise_for(response)
        return WeightsInfo.model_validate_json(response.content)

    def weights(self) -> WeightsInfo:
        response = self._send("GET", "/weights")
        _raise_for(response)
        return WeightsInfo.model_validate_json(response.content)

    def get_tree(self, tree_id: str) -> Tree:
        response = self._send("GET", f"/trees/{tree_id}")
        _raise_for(response)
        return Tree.model_validate_json(response.content)

    def health(self) -> dict[str, Any]:
        """/readyz's answer (engine and Redis state), whether ready or not."""
        response = self._http.get("/readyz")
        return {"status_code": response.status_code, **response.json()}

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retry.max_attempts):
            last = attempt == self.retry.max_attempts - 1
            _rewind(kwargs)
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(self.retry.delay(attempt, None))
                continue
            if response.status_code not in RETRY_STATUSES or last:
                return response
            time.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
        raise AssertionError("unreachable")

    def _stream(self, body: dict[str, Any], headers: dict[str, str]) -> Iterator[Tree]:
        for attempt in range(self.retry.max_attempts):
            with self._http.stream("POST", "/rollout_tree", json=body, headers=headers) as response:
                if response.status_code in RETRY_STATUSES and attempt < self.retry.max_attempts - 1:
                    time.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
                    continue
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield _parse_line(line)
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
            base_url=base_url, headers=_headers(token), timeout=timeout_s, transport=transport
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
        return _rollout_result(await self._send("POST", "/rollout_tree", json=body, headers=headers))

    async def update_weights(
        self,
        *,
        path: str | None = None,
        file: str | Path | BinaryIO | None = None,
        version: int | None = None,
    ) -> WeightsInfo:
        payload = _weights_payload(path, file, version)
        try:
            response = await self._send("POST", "/weights", **payload)
        finally:
            if "files" in payload and not hasattr(file, "read"):
                payload["files"]["file"][1].close()
        _raise_for(response)
        return WeightsInfo.model_validate_json(response.content)

    async def weights(self) -> WeightsInfo:
        response = await self._send("GET", "/weights")
        _raise_for(response)
        return WeightsInfo.model_validate_json(response.content)

    async def get_tree(self, tree_id: str) -> Tree:
        response = await self._send("GET", f"/trees/{tree_id}")
        _raise_for(response)
        return Tree.model_validate_json(response.content)

    async def health(self) -> dict[str, Any]:
        response = await self._http.get("/readyz")
        return {"status_code": response.status_code, **response.json()}

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retry.max_attempts):
            last = attempt == self.retry.max_attempts - 1
            _rewind(kwargs)
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                await asyncio.sleep(self.retry.delay(attempt, None))
                continue
            if response.status_code not in RETRY_STATUSES or last:
                return response
            await asyncio.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
        raise AssertionError("unreachable")

    async def _stream(self, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[Tree]:
        for attempt in range(self.retry.max_attempts):
            async with self._http.stream("POST", "/rollout_tree", json=body, headers=headers) as response:
                if response.status_code in RETRY_STATUSES and attempt < self.retry.max_attempts - 1:
                    await asyncio.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
                    continue
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield _parse_line(line)
                return
