"""SGLang backend: the `Engine` protocol as an async HTTP client of SGLang's native API.

Talks to one or more `python -m sglang.launch_server --skip-tokenizer-init` workers (or an sglang-router):
one `POST /generate` with token ids per request, many in flight (SGLang batches them continuously),
`POST /update_weights_from_disk` on every worker (the router has no weight API), `GET /health`. Wire facts:
shared/SGLANG.md §1-§5.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from treepo.service.engine.protocol import (
    EngineError,
    EngineRequestError,
    EngineUnavailable,
    GenerateOutput,
    GenerateRequest,
)
from treepo.service.engine.sglang_wire import (
    PendingRequest,
    Piece,
    check_urls,
    json_or_text,
    parse_item,
    raise_for_status,
    read_model_limits,
    sglang_model_dir,
    warmup_item,
)

logger = logging.getLogger(__name__)

Routing = Literal["prefix", "round_robin"]
_KNOWN_CACHED_LIMIT = 65_536  # sequences remembered per worker as "in its radix cache" (a hint only)


@dataclass(slots=True)
class _Warmup:
    done: asyncio.Future[None]
    followers: int = 0


class WeightUpdateError(EngineError):
    """At least one worker refused or failed the weight update (its message says why)."""

    reason = "weight_update"


class SGLangEngine:
    """Implements the `Engine` protocol over SGLang workers.

    Args:
        base_urls: worker (or sglang-router) base URLs, e.g. "http://127.0.0.1:30000".
        eos_token_ids: the model's EOS ids; None reads them from `model_path`'s generation_config.json.
        model_path: a local copy of the served model (only its config files are read).
        max_context: the served context length; None reads max_position_embeddings from `model_path`.
        timeout_s: per HTTP call (a /generate call lasts as long as its longest segment).
        api_key / admin_api_key: SGLang's --api-key / --admin-api-key (Bearer tokens).
        prefill_first: send an input that several requests share (sent in the same event-loop tick) once,
            with max_new_tokens=0, before the fan-out: SGLang inserts KV into its radix tree only when a
            request finishes, so copies sent in the same instant would all prefill it.
        routing: "prefix" keeps requests whose first `affinity_tokens` tokens agree on one worker (a tree
            stays on the worker that holds its KV); "round_robin" spreads requests evenly.
        pause_for_update: pause generation (abort in-flight requests, resubmitted here) around a weight
            update instead of letting SGLang wait for them to drain.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        eos_token_ids: Sequence[int] | None = None,
        model_path: str | Path | None = None,
        max_context: int | None = None,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        prefill_first: bool = True,
        routing: Routing = "prefix",
        affinity_tokens: int = 256,
        max_abort_retries: int = 3,
        pause_for_update: bool = False,
        use_health_generate: bool = False,
    ) -> None:
        self.base_urls = check_urls(base_urls)
        self.model_path = Path(model_path) if model_path is not None else None
        if eos_token_ids is None or max_context is None:
            config_eos, config_context = read_model_limits(model_path)
            eos_token_ids = config_eos if eos_token_ids is None else eos_token_ids
            max_context = config_context if max_context is None else max_context
        if not eos_token_ids or min(eos_token_ids) < 0:
            raise ValueError(f"eos_token_ids must be non-negative token ids (got {eos_token_ids!r})")
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2 tokens (got {max_context})")
        if timeout_s <= 0 or max_abort_retries < 0 or affinity_tokens < 1:
            raise ValueError(
                f"need timeout_s > 0, max_abort_retries >= 0, affinity_tokens >= 1 "
                f"(got {timeout_s=}, {max_abort_retries=}, {affinity_tokens=})"
            )
        if routing not in ("prefix", "round_robin"):
            raise ValueError(f"Unknown routing {routing!r}; expected one of prefix, round_robin")
        self._eos = tuple(int(t) for t in eos_token_ids)
        self._max_context = int(max_context)
        self._version = 0
        self.prefill_first = prefill_first
        self.routing: Routing = routing
        self.affinity_tokens = affinity_tokens
        self.max_abort_retries = max_abort_retries
        self.pause_for_update = pause_for_update
        self._health_path = "/health_generate" if use_health_generate else "/health"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        admin = admin_api_key or api_key
        self._admin_headers = {"Authorization": f"Bearer {admin}"} if admin else {}
        self._timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        self._client: httpx.AsyncClient | None = None
        self._next_worker = 0
        self._known_cached: list[OrderedDict[int, None]] = [OrderedDict() for _ in self.base_urls]
        self.num_warmup_requests = 0  # prefill-only requests sent (for tests and benchmarks)
        self._warming: dict[tuple[int, tuple[int, ...]], _Warmup] = {}

    # Public API

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def max_context(self) -> int:
        return self._max_context

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        """One request on the worker its prefix routes to; copies sent together share one warm-up."""
        self._check_fits(request)
        worker = self._route(request)
        warmup = await self._warm(worker, request) if self.prefill_first else None
        return await self._generate_on(worker, request, warmup)

    async def update_weights(self, path: str, version: int) -> None:
        """Load `path` on every worker (which must see it at the same path); flushes their caches.

        `path` is a Hugging Face model directory, or one .safetensors file (what `treepo train` pushes):
        SGLang loads directories, so the file gets one beside it (see `sglang_model_dir`).
        """
        model_dir = sglang_model_dir(Path(path), self.model_path)
        results = await asyncio.gather(
            *(self._update_worker(worker, model_dir, version) for worker in range(len(self.base_urls))),
            return_exceptions=True,
        )
        for known in self._known_cached:
            known.clear()
        failures = [f"{url}: {r}" for url, r in zip(self.base_urls, results, strict=True) if r is not None]
        if failures:
            raise WeightUpdateError(
                f"weight update to version {version} failed on {len(failures)} of {len(self.base_urls)} "
                f"SGLang workers: " + "; ".join(failures)
            )
        self._version = version
        logger.info("SGLang workers now serve %s as policy version %d", path, version)

    async def health(self) -> bool:
        """True when every worker answers its health route with 200."""
        checks = await asyncio.gather(
            *(self._request("GET", w, self._health_path) for w in range(len(self.base_urls))),
            return_exceptions=True,
        )
        return all(isinstance(r, httpx.Response) and r.status_code == 200 for r in checks)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> SGLangEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # Internal helpers

    def _check_fits(self, request: GenerateRequest) -> None:
        if len(request.input_ids) >= self._max_context:
            raise EngineRequestError(
                f"input of {len(request.input_ids)} tokens leaves no room in the {self._max_context}-token "
                "context; shorten the prompt or lower max_depth/segment_tokens"
            )

    def _route(self, request: GenerateRequest) -> int:
        if len(self.base_urls) == 1:
            return 0
        if self.routing == "round_robin":
            self._next_worker = (self._next_worker + 1) % len(self.base_urls)
            return self._next_worker
        return hash(tuple(request.input_ids[: self.affinity_tokens])) % len(self.base_urls)

    async def _generate_on(
        self, worker: int, request: GenerateRequest, warmup: Piece | None
    ) -> GenerateOutput:
        pending = PendingRequest(
            request, min(request.max_new_tokens, self._max_context - len(request.input_ids))
        )
        for _ in range(self.max_abort_retries + 1):
            if pending.num_aborts:
                logger.warning("resubmitting an aborted SGLang request with its tokens so far")
            [item] = await self._post_generate(worker, [pending.next_item()])
            pending.absorb(parse_item(item))
            if pending.finish is not None:
                return self._finish(worker, pending, warmup)
        raise EngineError(
            f"SGLang worker {self.base_urls[worker]} aborted a request "
            f"{self.max_abort_retries + 1} times in a row; raise max_abort_retries or see the worker log"
        )

    async def _warm(self, worker: int, request: GenerateRequest) -> Piece | None:
        """Prefill an input once when copies of it arrive together; the leader's answer books the cost."""
        key = (worker, tuple(request.input_ids))
        if hash(key[1]) in self._known_cached[worker]:
            return None
        entry = self._warming.get(key)
        if entry is not None:  # a copy leads the warm-up: wait for it, then decode from the cached prefix
            entry.followers += 1
            await asyncio.shield(entry.done)
            return None
        entry = self._warming[key] = _Warmup(asyncio.get_running_loop().create_future())
        try:
            await asyncio.sleep(0)  # copies submitted in the same tick join here
            if not entry.followers:
                return None
            self.num_warmup_requests += 1
            [item] = await self._post_generate(worker, [warmup_item(list(key[1]), self._eos)])
            return parse_item(item)
        finally:
            del self._warming[key]
            entry.done.set_result(None)

    def _finish(self, worker: int, pending: PendingRequest, warmup: Piece | None) -> GenerateOutput:
        extra: dict[str, Any] = {"worker": self.base_urls[worker]}
        prefill, cached = pending.prefill_tokens, pending.cached_tokens
        if warmup is not None:  # the shared prefill is paid once: booked on the first copy
            prefill += warmup.prompt_tokens - warmup.cached_tokens
            cached += warmup.cached_tokens
            extra["warmup_prefill_tokens"] = warmup.prompt_tokens - warmup.cached_tokens
        if pending.num_aborts:
            extra["num_aborts"] = pending.num_aborts
        self._remember(worker, pending.request.input_ids + pending.output_ids)
        assert pending.finish is not None, f"{pending=}"
        return GenerateOutput(
            output_ids=pending.output_ids,
            logprobs=pending.logprobs,
            finish_reason=pending.finish,
            cached_tokens=cached,
            prefill_tokens=prefill,
            policy_version=min(pending.versions, default=self._version),  # oldest weights that took part
            extra=extra,
        )

    def _remember(self, worker: int, sequence: list[int]) -> None:
        known = self._known_cached[worker]
        known[hash(tuple(sequence))] = None
        known.move_to_end(hash(tuple(sequence)))
        while len(known) > _KNOWN_CACHED_LIMIT:
            known.popitem(last=False)

    async def _post_generate(self, worker: int, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        body = {
            "input_ids": [item["input_ids"] for item in items],
            "sampling_params": [item["sampling_params"] for item in items],
            "return_logprob": True,
            "logprob_start_len": -1,  # output logprobs only: >= 0 would cap the prefix-cache match (§4)
            "stream": False,
        }
        response = await self._request("POST", worker, "/generate", body)
        raise_for_status(response, self.base_urls[worker])
        payload = response.json()
        if isinstance(payload, dict):
            payload = [payload]
        if not isinstance(payload, list) or len(payload) != len(items):
            raise EngineError(
                f"SGLang worker {self.base_urls[worker]} answered {len(items)} items with {payload!r:.200}"
            )
        return payload

    async def _update_worker(self, worker: int, path: str, version: int) -> None:
        if self.pause_for_update:
            raise_for_status(await self._admin_post(worker, "/pause_generation", {"mode": "abort"}), "")
        try:
            body = {"model_path": path, "weight_version": str(version), "flush_cache": True}
            response = await self._admin_post(worker, "/update_weights_from_disk", body)
        finally:
            if self.pause_for_update:
                await self._admin_post(worker, "/continue_generation", {})
        if response.status_code not in (200, 400):
            raise_for_status(response, self.base_urls[worker])
        answer = json_or_text(response)
        if not (isinstance(answer, dict) and answer.get("success")):
            message = answer.get("message", answer) if isinstance(answer, dict) else answer
            raise WeightUpdateError(f"HTTP {response.status_code}: {message}")

    async def _admin_post(self, worker: int, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self._request("POST", worker, path, body, headers=self._admin_headers)

    async def _request(
        self, method: str, worker: int, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """One HTTP call; transport failures become `EngineUnavailable`."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        url = self.base_urls[worker] + path
        try:
            return await self._client.request(method, url, json=body, headers=headers or self._headers)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"SGLang worker {url} unreachable: {type(exc).__name__}: {exc}") from exc
