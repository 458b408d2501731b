"""SGLang backend: the `Engine` protocol as an async HTTP client of SGLang's native API.

Talks to `python -m sglang.launch_server --skip-tokenizer-init` workers: one `POST /generate` with token ids
per request, many in flight (SGLang batches them continuously; a cancelled call is aborted on the server).
Generation goes to `base_urls` (the workers, routed by prefix, or one sglang-router URL); weights, cache
flushes, versions and health go to `admin_urls` (the workers themselves, see sglang_admin.py). The wire
format, checked against a real server, is in sglang_wire.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
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
from treepo.service.engine.sglang_admin import WeightUpdateError, WorkerAdmin
from treepo.service.engine.sglang_wire import (
    PendingRequest,
    Piece,
    check_urls,
    parse_item,
    parse_warmup,
    raise_for_status,
    read_model_limits,
    sglang_model_dir,
    warmup_item,
)

__all__ = ["SGLangEngine", "WeightUpdateError"]

logger = logging.getLogger(__name__)

Routing = Literal["prefix", "round_robin"]
_KNOWN_CACHED_LIMIT = 65_536  # sequences remembered per worker as "in its radix cache" (a hint only)
_DOWN_S = 5.0  # an unreachable worker is routed around this long before it is tried again


@dataclass(slots=True)
class _Warmup:
    done: asyncio.Future[None]
    followers: int = 0


class SGLangEngine:
    """Implements the `Engine` protocol over SGLang workers.

    Args:
        base_urls: where generation goes: the workers (prefix-routed), or one sglang-router URL.
        admin_urls: the workers themselves, for weights, flushes, versions and health (the router has no
            weight routes); None = `base_urls` (no router).
        eos_token_ids: the model's EOS ids; None reads them from `model_path`'s generation_config.json.
        model_path: a local copy of the served model (only its config files are read).
        max_context: an upper bound on prompt + path tokens; None = the model config's context.
            `read_server_limits()` lowers it to what the workers accept.
        timeout_s: per HTTP call (a /generate call lasts as long as its segment).
        api_key / admin_api_key: SGLang's --api-key / --admin-api-key (Bearer tokens).
        prefill_first: send an input that several requests share (sent in the same event-loop tick) once,
            with max_new_tokens=0, before the fan-out: SGLang inserts KV into its radix tree only when a
            request finishes, so copies sent in the same instant would all prefill it.
        routing: "prefix" keeps requests whose first `affinity_tokens` tokens agree on one worker (a tree
            stays on the worker that holds its KV); "round_robin" spreads requests evenly.
        max_in_flight: /generate calls open at once (more wait here); SGLang queues what it cannot run.
        pause_for_update: pause generation (abort in-flight requests, resubmitted here) around a weight
            update instead of letting SGLang wait for them to drain.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        admin_urls: str | Sequence[str] | None = None,
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
        max_in_flight: int = 1024,
        pause_for_update: bool = False,
        health_timeout_s: float = 5.0,
    ) -> None:
        self.base_urls = check_urls(base_urls)
        self.admin_urls = check_urls(admin_urls) if admin_urls is not None else list(self.base_urls)
        self.model_path = Path(model_path) if model_path is not None else None
        if eos_token_ids is None or max_context is None:
            config_eos, config_context = read_model_limits(model_path)
            eos_token_ids = config_eos if eos_token_ids is None else eos_token_ids
            max_context = config_context if max_context is None else max_context
        if not eos_token_ids or min(eos_token_ids) < 0:
            raise ValueError(f"eos_token_ids must be non-negative token ids (got {eos_token_ids!r})")
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2 tokens (got {max_context})")
        if timeout_s <= 0 or max_abort_retries < 0 or affinity_tokens < 1 or max_in_flight < 1:
            raise ValueError(
                "need timeout_s > 0, max_abort_retries >= 0, affinity_tokens >= 1, max_in_flight >= 1 "
                f"(got {timeout_s=}, {max_abort_retries=}, {affinity_tokens=}, {max_in_flight=})"
            )
        if routing not in ("prefix", "round_robin"):
            raise ValueError(f"Unknown routing {routing!r}; expected one of prefix, round_robin")
        self._eos = tuple(int(t) for t in eos_token_ids)
        self._max_context = int(max_context)
        self.prefill_first = prefill_first
        self.routing: Routing = routing
        self.affinity_tokens = affinity_tokens
        self.max_abort_retries = max_abort_retries
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        admin = admin_api_key or api_key
        self._admin_headers = {"Authorization": f"Bearer {admin}"} if admin else {}
        self._timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        # idle connections expire before SGLang's uvicorn closes them (SGLANG_TIMEOUT_KEEP_ALIVE, 5 s)
        self._limits = httpx.Limits(
            max_connections=max_in_flight + 32, max_keepalive_connections=64, keepalive_expiry=2.0
        )
        self._slots = asyncio.Semaphore(max_in_flight)
        self._client: httpx.AsyncClient | None = None
        self.admin = WorkerAdmin(
            self.admin_urls,
            self._request,
            pause_for_update=pause_for_update,
            health_timeout_s=health_timeout_s,
        )
        self._next_worker = 0
        self._known_cached: list[OrderedDict[int, None]] = [OrderedDict() for _ in self.base_urls]
        self._down_until = [0.0 for _ in self.base_urls]
        self._warming: dict[tuple[int, tuple[int, ...]], _Warmup] = {}
        self._aborts: set[asyncio.Task[None]] = set()
        self.in_flight = 0  # /generate calls open now
        self.num_warmup_requests = 0  # prefill-only requests sent (tests, benchmarks)
        self.num_aborted = 0  # cancelled calls aborted on the server

    # Public API

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def policy_version(self) -> int:
        return self.admin.version

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def unhealthy_workers(self) -> list[str]:
        """Workers the last health check found down or serving other weights (readyz names them)."""
        return list(self.admin.unhealthy)

    @property
    def worker_versions(self) -> dict[str, int]:
        """The weights version each worker last reported (0: its launch weights, "default")."""
        return {url: int(v) if v.isdigit() else 0 for url, v in self.admin.reported.items()}

    def read_server_limits(self, wait_s: float = 0.0) -> None:
        """Lower `max_context` to what every worker accepts (its /get_server_info), so paths end before
        SGLang would reject them; waits up to `wait_s` for workers that are still starting. Blocking."""
        limit = self.admin.read_limits(self._max_context, wait_s, self._admin_headers)
        self._max_context = min(self._max_context, limit)

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        """One request on the worker its prefix routes to; copies sent together share one warm-up."""
        if request.segment_seeds:
            raise EngineRequestError("SGLang samples a request with one seed: send one request per segment")
        self._check_fits(request)
        worker = self._route(request)
        warmup = await self._warm(worker, request) if self.prefill_first else None
        budget = min(request.max_new_tokens, self._max_context - len(request.input_ids))
        pending = PendingRequest(request, budget)
        for _ in range(self.max_abort_retries + 1):
            if pending.num_aborts:
                logger.warning("resubmitting an aborted SGLang request with its tokens so far")
            worker, payload = await self._post_failover(worker, pending.next_item())
            piece = parse_item(payload)
            if not self.admin.accepts(piece.weight_version):  # a restarted worker: its tokens are dropped
                await self.admin.resync(self.base_urls[worker])
                pending.num_aborts += 1
                continue
            pending.absorb(piece, self.admin.version)
            if pending.finish is not None:
                return self._finish(worker, pending, warmup)
        raise EngineError(
            f"SGLang worker {self.base_urls[worker]} aborted a request (or served other weights) "
            f"{self.max_abort_retries + 1} times in a row; raise max_abort_retries or see the worker log"
        )

    async def update_weights(self, path: str, version: int) -> None:
        """Load `path` on every worker (which must see it at the same path); flushes their caches.

        `path` is a Hugging Face model directory, or one .safetensors file (what `treepo train` pushes):
        SGLang loads directories, so the file gets one beside it (see `sglang_model_dir`).
        """
        model_dir = sglang_model_dir(Path(path), self.model_path)
        try:
            await self.admin.update(model_dir, version)
        finally:
            for known in self._known_cached:
                known.clear()
        logger.info("SGLang workers now serve %s as policy version %d", path, version)

    def adopt_weights(self, path: str, version: int) -> None:
        """Serve `version`, which another service replica already loaded on these (shared) workers: no second
        load; a worker found on other weights later is re-pushed `path` as usual."""
        self.admin.version, self.admin.weights = version, sglang_model_dir(Path(path), self.model_path)
        for known in self._known_cached:
            known.clear()
        logger.info("SGLang workers serve %s as policy version %d (pushed by another replica)", path, version)

    def share_weights(self, catch_up: Callable[[], Awaitable[None]]) -> None:
        """Other service replicas push weights to these workers too: before a worker found serving other
        weights is re-pushed, `catch_up()` adopts the fleet's version (another replica may have pushed it)."""
        self.admin.catch_up = catch_up

    async def health(self) -> bool:
        """A worker serves the current weights (see WorkerAdmin.health) and every router answers /health."""
        routers = [url for url in self.base_urls if url not in self.admin_urls]
        checks = await asyncio.gather(
            self.admin.health(),
            *(
                self._request("GET", url + "/health", timeout_s=self.admin.health_timeout_s)
                for url in routers
            ),
            return_exceptions=True,
        )
        workers, *answers = checks
        return workers is True and all(
            isinstance(r, httpx.Response) and r.status_code == 200 for r in answers
        )

    async def flush_cache(self) -> None:
        """Empty every worker's prefix cache (benchmarks start each run cold)."""
        await self.admin.flush()
        for known in self._known_cached:
            known.clear()

    async def aclose(self) -> None:
        await self.admin.aclose()
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
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
            return self._reachable(self._next_worker)
        return self._reachable(hash(tuple(request.input_ids[: self.affinity_tokens])) % len(self.base_urls))

    def _reachable(self, worker: int) -> int:
        """`worker`, or the next one not recently found unreachable (all down: `worker`)."""
        now = time.monotonic()
        for step in range(len(self.base_urls)):
            candidate = (worker + step) % len(self.base_urls)
            if self._down_until[candidate] <= now:
                return candidate
        return worker

    async def _post_failover(self, worker: int, item: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST `item` to `worker`; if it is unreachable (down, or killed mid-request), to the next workers in
        turn: the request re-runs there from its tokens so far. EngineUnavailable once every worker failed."""
        last = len(self.base_urls) - 1
        for step in range(last + 1):
            candidate = (worker + step) % len(self.base_urls)
            try:
                return candidate, await self._post_generate(candidate, item)
            except EngineUnavailable as exc:
                self._down_until[candidate] = time.monotonic() + _DOWN_S
                if step == last:
                    raise
                logger.warning("%s; re-running the request on another worker", exc)
        raise AssertionError("the last worker's answer or error ends the loop")

    async def _warm(self, worker: int, request: GenerateRequest) -> Piece | None:
        """Prefill an input once when copies of it arrive together; the leader's answer books the cost.

        A warm-up answers with no tokens (some versions add one logprob); a failed one costs only the
        cache hit: the requests themselves go on.
        """
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
            return parse_warmup(await self._post_generate(worker, warmup_item(list(key[1]), self._eos)))
        except EngineError as exc:
            logger.warning("SGLang warm-up of %d tokens failed (%s); decoding without it", len(key[1]), exc)
            return None
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
            policy_version=min(pending.versions, default=self.admin.version),  # oldest weights that took part
            extra=extra,
        )

    def _remember(self, worker: int, sequence: list[int]) -> None:
        known = self._known_cached[worker]
        known[hash(tuple(sequence))] = None
        known.move_to_end(hash(tuple(sequence)))
        while len(known) > _KNOWN_CACHED_LIMIT:
            known.popitem(last=False)

    async def _post_generate(self, worker: int, item: dict[str, Any]) -> dict[str, Any]:
        """One /generate call; cancelling it aborts the request on the worker (POST /abort_request)."""
        url = self.base_urls[worker]
        rid = uuid.uuid4().hex
        body = {
            **item,
            "rid": rid,
            "return_logprob": True,
            "logprob_start_len": -1,  # output logprobs only: >= 0 would cap the prefix-cache match
            "stream": False,
        }
        async with self._slots:
            self.in_flight += 1
            try:
                response = await self._request("POST", url + "/generate", body)
            except asyncio.CancelledError:
                self._abort(url, rid)
                raise
            finally:
                self.in_flight -= 1
        raise_for_status(response, url)
        payload = response.json()
        if not isinstance(payload, dict) or "meta_info" not in payload:
            raise EngineError(f"SGLang worker {url} answered /generate with {payload!r:.200}")
        return payload

    def _abort(self, url: str, rid: str) -> None:
        """Fire-and-forget abort of `rid` (SGLang also aborts on disconnect, but not while it queues)."""
        self.num_aborted += 1
        task = asyncio.ensure_future(self._request("POST", url + "/abort_request", {"rid": rid}, admin=True))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        task.add_done_callback(
            lambda t: t.cancelled() or t.exception()
        )  # retrieved: a lost abort is harmless

    async def _request(
        self, method: str, url: str, body: Any = None, *, admin: bool = False, timeout_s: float | None = None
    ) -> httpx.Response:
        """One HTTP call; transport failures become `EngineUnavailable`.

        A pooled connection the server closed meanwhile fails with a read/protocol error: the call is
        retried once on a fresh connection (a dead server then fails to connect).
        """
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, limits=self._limits)
        headers = self._admin_headers if admin else self._headers
        timeout = httpx.Timeout(timeout_s) if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        request = self._client.build_request(method, url, json=body, headers=headers, timeout=timeout)
        try:
            try:
                return await self._client.send(request)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                return await self._client.send(request)  # once more, on a fresh connection
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"SGLang worker {url} unreachable: {type(exc).__name__}: {exc}") from exc
        except AttributeError as exc:  # a socket closed under the transport (a worker killed mid-request):
            # anyio/httpcore can then fail reading the socket's address instead of raising a TransportError
            raise EngineUnavailable(f"SGLang worker {url} unreachable: connection lost ({exc})") from exc
