"""What both HTTP clients share: errors, the retry policy, request building and response parsing."""

from __future__ import annotations

import json
from collections.abc import Sequence
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
)

PromptLike = Prompt | str | list[int] | dict[str, Any]
RETRY_STATUSES = frozenset({429, 503})


def retryable(response: httpx.Response) -> bool:
    """429 (stream full), 503 (engine or Redis unavailable), and 409 with Retry-After (the same
    Idempotency-Key is still running elsewhere; a weights-version 409 has no Retry-After and is final)."""
    code = response.status_code
    return code in RETRY_STATUSES or (code == 409 and "Retry-After" in response.headers)


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


def headers_for(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except (json.JSONDecodeError, AttributeError):
        detail = response.text
    raise TreePOError(response.status_code, detail)


def parse_line(line: str) -> Tree:
    payload = json.loads(line)
    if "error" in payload:
        raise TreePOError(500, payload["error"])
    return Tree.model_validate(payload)


def rollout_result(response: httpx.Response) -> RolloutTreeResponse | RolloutAccepted:
    raise_for(response)
    if response.status_code == 202:
        return RolloutAccepted.model_validate_json(response.content)
    return RolloutTreeResponse.model_validate_json(response.content)


def weights_payload(
    path: str | None, file: str | Path | BinaryIO | None, version: int | None
) -> dict[str, Any]:
    if (path is None) == (file is None):
        raise ValueError("give exactly one of path= (a checkpoint under the service's weights dir) or file=")
    if path is not None:
        return {"json": {"path": path, "version": version}}
    data = {"version": str(version)} if version is not None else {}
    handle = open(file, "rb") if isinstance(file, str | Path) else file  # noqa: SIM115 (closed by the caller)
    return {"files": {"file": ("weights.safetensors", handle, "application/octet-stream")}, "data": data}


def rewind(kwargs: dict[str, Any]) -> None:
    """An upload is re-sent from its start on a retry."""
    for _, handle, _ in kwargs.get("files", {}).values():
        handle.seek(0)
