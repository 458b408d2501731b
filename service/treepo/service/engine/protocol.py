"""The one interface the tree sampler needs from an inference engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


@dataclass(slots=True)
class GenerateRequest:
    """Decode at most `max_new_tokens` after `input_ids` (prompt + path so far)."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides the engine's EOS ids; the stop token is kept in output_ids
    # Lower runs first (a hint; engines may ignore it). A tree's requests share its start order, so the
    # engine finishes the trees it started, whose prefixes are cached, before it starts new ones.
    priority: int = 0
    # The caller will probably continue this request's output (a tree segment before the depth limit): the
    # engine keeps it cached ahead of newer-priority work while this priority has requests in the engine.
    # A hint, as `priority`; engines may ignore it.
    keep_cached: bool = False
    # Several segments in one request (engines with `supports_segment_seeds`): output token k is drawn as
    # token k % segment_tokens of a request seeded segment_seeds[k // segment_tokens] that continues the
    # tokens before it, so the output equals that of one request per segment; `seed` is then unused.
    segment_seeds: tuple[int, ...] = ()
    segment_tokens: int = 0

    def __post_init__(self) -> None:
        assert self.input_ids, "a request needs at least one input token"
        assert self.max_new_tokens >= 1, f"{self.max_new_tokens=}"
        assert not self.segment_seeds or (
            self.segment_tokens >= 1 and len(self.segment_seeds) * self.segment_tokens >= self.max_new_tokens
        ), f"{self.segment_seeds=} {self.segment_tokens=} {self.max_new_tokens=}"


@dataclass(slots=True)
class GenerateOutput:
    output_ids: list[int]
    logprobs: list[float]  # log p of each sampled token under the (unmodified) model distribution
    finish_reason: Literal["stop", "length"]
    cached_tokens: int  # input tokens served from the prefix cache
    prefill_tokens: int  # input tokens the engine had to compute
    policy_version: int = 0  # weights version that produced the tokens
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """An inference engine with prefix caching that schedules its own batches.

    One `generate` call is one request; callers keep many in flight (`generate_all`) and the engine batches
    them continuously (the embedded engine's scheduler, SGLang's). Cancelling a call aborts its request, and
    an error fails that request only.
    """

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def policy_version(self) -> int: ...

    @property
    def max_context(self) -> int: ...

    async def generate(self, request: GenerateRequest) -> GenerateOutput: ...

    async def update_weights(self, path: str, version: int) -> None: ...

    async def health(self) -> bool: ...


async def generate_all(engine: Engine, requests: Iterable[GenerateRequest]) -> list[GenerateOutput]:
    """All `requests` in flight at once; outputs in request order (the first error cancels the rest)."""
    tasks = [asyncio.ensure_future(engine.generate(request)) for request in requests]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


class EngineError(RuntimeError):
    """The engine failed a call; the service maps it to a 5xx (and counts it by reason)."""

    reason = "engine_error"


class EngineUnavailable(EngineError):
    """The engine cannot be reached (connection refused, timeout, 503): retry later (HTTP 503)."""

    reason = "engine_unavailable"


class EngineRequestError(EngineError, ValueError):
    """The engine rejected a request as invalid (e.g. SGLang's HTTP 400): a caller error (HTTP 4xx)."""

    reason = "invalid"


class EngineWrapper:
    """Forwards the `Engine` protocol to `inner`; a wrapper (e.g. metering) overrides what it adds."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.inner.eos_token_ids

    @property
    def policy_version(self) -> int:
        return self.inner.policy_version

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    @property
    def supports_segment_seeds(self) -> bool:
        return bool(getattr(self.inner, "supports_segment_seeds", False))

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        return await self.inner.generate(request)

    async def update_weights(self, path: str, version: int) -> None:
        await self.inner.update_weights(path, version)

    async def health(self) -> bool:
        return await self.inner.health()
