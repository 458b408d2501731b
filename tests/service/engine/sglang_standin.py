"""A stand-in SGLang server for fault injection: the same JSON as `sglang.launch_server --skip-tokenizer-init`.

It answers every exchange recorded from a real SGLang 0.5.23 server (tests/sglang/fixtures, checked by
test_sglang_standin_wire.py) the same way: batch input -> list response; `meta_info` with the real keys;
the real limits (input < max_req_input_len = context - 6; input + max_new_tokens <= context, and
max_new_tokens cut to context - 2 - input); HTTP 400 `{"error": {"message"}}` for bad values and
`{"error": "unknown field ..."}` for unknown sampling fields; `/abort_request {"rid"}`; `/get_server_info`.
cached_tokens come from a token-id prefix memory filled when a request finishes (capped at input_len - 1).
Tokens come from a real tiny transformers model (`ModelTokens`) or from a deterministic script. Tests that
need real SGLang behaviour run against the real server (tests/sglang); this is for injecting faults.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

TokenStream = Callable[[list[int], dict[str, Any]], Iterator[tuple[int, float]]]
"""(input_ids, sampling_params) -> endless (token id, logprob) pairs."""

ADMIN_ROUTES = {
    "/update_weights_from_disk", "/flush_cache", "/pause_generation", "/continue_generation", "/abort_request",
    "/update_weight_version",
}  # fmt: skip
SAMPLING_FIELDS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params",
)  # fmt: skip
FLUSHED = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
    "requests, the operation will not be performed.)\n"
)
OPEN_ROUTES = {"/health", "/health_generate", "/metrics"}


class ModelTokens:
    """Tokens sampled from a local Hugging Face causal LM, reloaded by /update_weights_from_disk."""

    def __init__(self, model_path: str) -> None:
        self.load(model_path)

    def load(self, model_path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        self.model_path = model_path

    def __call__(self, input_ids: list[int], params: dict[str, Any]) -> Iterator[tuple[int, float]]:
        import torch

        seed = params.get("sampling_seed")
        generator = torch.Generator().manual_seed(
            hash((seed, tuple(input_ids))) & 0xFFFF_FFFF if seed is not None else random.getrandbits(32)
        )
        vocab = self.vocab_size  # real SGLang 0.5.23 accepts ids past the vocabulary (fixture): clamp them
        ids, past = torch.tensor([[min(t, vocab - 1) for t in input_ids]]), None
        cache_arg = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )
        with torch.no_grad():
            while True:
                out = self.model(input_ids=ids, use_cache=True, **{cache_arg: past})
                past = out["cache"] if "cache" in out else out["past_key_values"]
                token, logprob = _sample(out.logits[0, -1].float(), params, generator)
                yield token, logprob
                ids = torch.tensor([[token]])

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def _sample(logits: Any, params: dict[str, Any], generator: Any) -> tuple[int, float]:
    """SGLang order: temperature, top-k, top-p; the logprob is under the unmodified distribution."""
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    temperature = float(params.get("temperature", 1.0))
    if temperature < 1e-6:
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    probs = torch.softmax(logits / temperature, dim=-1)
    top_k = int(params.get("top_k", -1))
    if top_k > 0:
        probs[probs < torch.topk(probs, min(top_k, probs.numel())).values[-1]] = 0
    sorted_probs, order = torch.sort(probs, descending=True)
    outside = torch.cumsum(sorted_probs, 0) - sorted_probs > float(params.get("top_p", 1.0))
    probs[order[outside]] = 0
    token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
    return token, float(logprobs[token])


def script_tokens(script: Callable[[list[int], random.Random], list[int]]) -> TokenStream:
    """Wrap a scripted-engine script: deterministic per (seed, input_ids), logprob -1 - (t % 7) / 7."""

    def stream(input_ids: list[int], params: dict[str, Any]) -> Iterator[tuple[int, float]]:
        rng = random.Random(hash((params.get("sampling_seed"), tuple(input_ids))))
        for token in script(list(input_ids), rng):
            yield token, -1.0 - (token % 7) / 7

    return stream


class PrefixMemory:
    """Token-id trie of sequences whose KV the server holds (SGLang's radix tree, without eviction)."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}

    def match(self, input_ids: list[int]) -> int:
        node, depth = self.root, 0
        for token in input_ids[:-1]:  # SGLang recomputes at least one input token
            if token not in node:
                break
            node, depth = node[token], depth + 1
        return depth

    def insert(self, token_ids: list[int]) -> None:
        node = self.root
        for token in token_ids:
            node = node.setdefault(token, {})

    def clear(self) -> None:
        self.root = {}


@dataclass
class StandinState:
    """Server state; tests read and steer it directly (the server runs in a thread of the test process)."""

    tokens: TokenStream
    eos_token_ids: tuple[int, ...] = (0,)
    context_len: int = 512
    max_req_input_len: int | None = None  # None: context_len - 6, as SGLang computes it
    vocab_size: int | None = None  # set: ids past it are a 400 (fault injection; real SGLang accepts them)
    weight_version: str = "default"
    api_key: str | None = None
    admin_api_key: str | None = None
    token_delay_s: float = 0.0  # per decode step, so that /pause_generation can catch requests running
    abort_plan: list[int] = field(default_factory=list)  # next items abort after this many tokens
    fail_weight_update: str | None = None  # message of a refused /update_weights_from_disk
    busy_flushes: int = 0  # the next flushes find requests queued (SGLang 0.5.23 then answers 400)
    update_delay_s: float = 0.0  # how long a weight load takes
    warmup_logprob: bool = False  # answer max_new_tokens=0 with one logprob and no token (older versions)
    healthy: bool = True  # False: /health, /health_generate and /get_model_info answer 503
    paused: bool = False
    inflight: int = 0
    running: set[str] = field(default_factory=set)  # rids of running items
    aborted: set[str] = field(default_factory=set)  # running rids asked to abort
    abort_requests: list[dict[str, Any]] = field(default_factory=list)
    prefix: PrefixMemory = field(default_factory=PrefixMemory)
    generate_bodies: list[dict[str, Any]] = field(default_factory=list)
    weight_updates: list[dict[str, Any]] = field(default_factory=list)


class BadRequest(Exception):
    """HTTP 400 {"error": {"message": ...}} as in SGLang's _create_error_response ({"error": ...} if plain)."""

    def __init__(self, message: str, plain: bool = False) -> None:
        super().__init__(message)
        self.plain = plain


def create_app(state: StandinState) -> FastAPI:
    app = FastAPI(title="SGLang stand-in")

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        path = request.url.path
        admin = path in ADMIN_ROUTES and state.admin_api_key
        wanted = state.admin_api_key if admin else state.api_key
        if wanted and path not in OPEN_ROUTES and request.headers.get("authorization") != f"Bearer {wanted}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        error = str(exc) if exc.plain else {"message": str(exc)}
        return JSONResponse({"error": error}, status_code=400)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        state.generate_bodies.append(body)
        items, is_batch = _expand(body, state)
        while state.paused:
            await asyncio.sleep(0.005)
        state.inflight += 1
        try:
            answers = await _run_batch(state, items)
        finally:
            state.inflight -= 1
        return JSONResponse(answers if is_batch else answers[0])

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request) -> JSONResponse:
        body = await request.json()
        state.weight_updates.append(body)
        if "model_path" not in body:
            raise BadRequest("model_path is required")
        while state.inflight:  # SGLang's model-update lock waits for running requests
            await asyncio.sleep(0.005)
        try:
            if state.fail_weight_update:
                raise RuntimeError(state.fail_weight_update)
            if isinstance(state.tokens, ModelTokens):
                state.tokens.load(body["model_path"])
            await asyncio.sleep(state.update_delay_s)
        except Exception as exc:
            message = f"Failed to update weights: {exc}.\nRolling back to original weights."
            return JSONResponse({"success": False, "message": message, "num_paused_requests": 0}, 400)
        if body.get("flush_cache", True):
            if (
                state.busy_flushes
            ):  # SGLang 0.5.23's answer when the flush after a load finds requests queued:
                state.busy_flushes -= 1  # the weights are loaded, the reported weight_version is not changed
                message = (
                    "Weights were updated, but the cache was not flushed because requests are still running "
                    "or queued. Retract or finish them, then call /flush_cache."
                )
                return JSONResponse({"success": False, "message": message, "num_paused_requests": 0}, 400)
            state.prefix.clear()
        state.weight_version = str(body.get("weight_version", state.weight_version))
        answer = {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        return JSONResponse(answer)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> PlainTextResponse:
        if state.inflight or (state.busy_flushes and not state.paused):
            state.busy_flushes = max(0, state.busy_flushes - 1)
            return PlainTextResponse("Cache not flushed: requests are running.", status_code=400)
        state.prefix.clear()
        return PlainTextResponse(FLUSHED)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> PlainTextResponse:
        body = await request.json()
        state.abort_requests.append(body)
        if body.get("abort_all"):
            state.aborted |= state.running
        elif body.get("rid") in state.running:
            state.aborted.add(str(body["rid"]))
        return PlainTextResponse("")

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> JSONResponse:
        return JSONResponse(
            {
                "context_length": None,  # the launch argument: unset, the model config's length applies
                "max_req_input_len": _max_input(state),
                "max_total_num_tokens": 4096,
                "version": "0.5.23",
                "weight_version": state.weight_version,
            }
        )

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request) -> JSONResponse:
        body = await request.json()
        state.weight_version = str(body["new_version"])
        answer = {"success": True, "message": f"Weight version updated to {body['new_version']}"}
        return JSONResponse({**answer, "new_version": body["new_version"]})

    @app.post("/pause_generation")
    async def pause(request: Request) -> JSONResponse:
        state.paused = True
        return JSONResponse({"status": "paused"})

    @app.post("/continue_generation")
    async def resume() -> JSONResponse:
        state.paused = False
        return JSONResponse({"status": "resumed"})

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> JSONResponse:
        if not state.healthy:
            return JSONResponse({"error": "unhealthy"}, status_code=503)
        return JSONResponse(
            {"model_path": "standin", "is_generation": True, "weight_version": state.weight_version}
        )

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("", status_code=200 if state.healthy else 503)

    return app


def _expand(body: dict[str, Any], state: StandinState) -> tuple[list[tuple[list[int], dict]], bool]:
    """(input_ids, sampling_params) per item, with SGLang's checks; raises BadRequest."""
    if body.get("text") is not None:
        raise BadRequest("The server runs with skip_tokenizer_init=True: send input_ids, not text.")
    input_ids = body.get("input_ids")
    if not input_ids:
        raise BadRequest("Either text, input_ids or input_embeds should be provided.")
    is_batch = isinstance(input_ids[0], list)
    batch = input_ids if is_batch else [input_ids]
    params = body.get("sampling_params") or {}
    params = params if isinstance(params, list) else [params] * len(batch)
    if len(params) != len(batch):
        raise BadRequest(f"sampling_params has {len(params)} items for a batch of {len(batch)}")
    if body.get("return_logprob") and body.get("logprob_start_len", -1) >= 0:
        raise BadRequest("this stand-in only models logprob_start_len=-1 (output logprobs)")
    for ids, param in zip(batch, params, strict=True):
        _check_item(ids, param, state)
    rid = body.get("rid")
    rids = (
        rid
        if isinstance(rid, list)
        else [rid if not is_batch or rid is None else f"{rid}_{i}" for i in range(len(batch))]
    )
    return [
        (ids, {**param, "_rid": rid}) for ids, param, rid in zip(batch, params, rids, strict=True)
    ], is_batch


def _max_input(state: StandinState) -> int:
    return state.max_req_input_len if state.max_req_input_len is not None else state.context_len - 6


def _check_item(ids: list[int], params: dict[str, Any], state: StandinState) -> None:
    unknown = sorted(set(params) - set(SAMPLING_FIELDS))
    if unknown:
        expected = ", ".join(f"`{name}`" for name in SAMPLING_FIELDS)
        raise BadRequest(f"unknown field `{unknown[0]}`, expected one of {expected}", plain=True)
    if not ids or any(not isinstance(t, int) or t < 0 for t in ids):
        raise BadRequest("input_ids must be a non-empty list of non-negative token ids")
    if state.vocab_size is not None and max(ids) >= state.vocab_size:
        raise BadRequest(f"The input_ids {max(ids)} exceeds the vocabulary size {state.vocab_size}.")
    if params.get("stop"):
        raise BadRequest("stop strings need a tokenizer; with skip_tokenizer_init use stop_token_ids")
    max_new = params.get("max_new_tokens", 128)
    checks = [
        (max_new >= 0, f"max_new_tokens must be at least 0, got {max_new}."),
        (params.get("temperature", 1.0) >= 0, "temperature must be non-negative"),
        (0 < params.get("top_p", 1.0) <= 1, f"top_p must be in (0, 1], got {params.get('top_p')}."),
        (params.get("top_k", -1) == -1 or params.get("top_k", -1) >= 1, "top_k must be -1 or >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadRequest(message)
    if len(ids) >= _max_input(state):
        raise BadRequest(
            f"Input length ({len(ids)} tokens) exceeds the maximum allowed length ({_max_input(state)} "
            "tokens). Use a shorter input or enable --allow-auto-truncate."
        )
    if len(ids) + max_new > state.context_len:
        raise BadRequest(
            f"Requested token count exceeds the model's maximum context length of {state.context_len} "
            f"tokens. You requested a total of {len(ids) + max_new} tokens: {len(ids)} tokens from the "
            f"input messages and {max_new} tokens for the completion. Please reduce the number of tokens in "
            "the input messages or the completion to fit within the limit."
        )


async def _run_batch(state: StandinState, items: list[tuple[list[int], dict]]) -> list[dict[str, Any]]:
    """Decode all items step by step; prefix hits are looked up before any item of the batch finishes."""
    started = time.monotonic()
    cached = [state.prefix.match(ids) for ids, _ in items]
    streams = [state.tokens(ids, params) for ids, params in items]
    outputs: list[list[tuple[int, float]]] = [[] for _ in items]
    finish: list[dict[str, Any] | None] = [None] * len(items)
    abort_at = [state.abort_plan.pop(0) if state.abort_plan else math.inf for _ in items]
    rids = [params["_rid"] or uuid.uuid4().hex for _, params in items]
    state.running.update(rids)
    for index, (ids, params) in enumerate(items):
        # SGLang's scheduler cuts max_new_tokens so that input + output stays under context - 1
        limit = min(params.get("max_new_tokens", 128), state.context_len - 2 - len(ids))
        items[index] = (ids, {**params, "max_new_tokens": limit})
        if limit == 0:
            finish[index] = {"type": "length", "length": 0}
    while any(reason is None for reason in finish):
        for index, (_, params) in enumerate(items):
            if finish[index] is None and rids[index] in state.aborted:
                finish[index] = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
            elif finish[index] is None:
                finish[index] = _step(state, params, streams[index], outputs[index], abort_at[index])
        if state.token_delay_s:
            await asyncio.sleep(state.token_delay_s)
        if state.paused:  # pause_generation(mode=abort) returns running requests as aborted
            finish = [
                reason or {"type": "abort", "message": "Abort by pause_generation."} for reason in finish
            ]
    state.running.difference_update(rids)
    state.aborted.difference_update(rids)
    answers = []
    for (ids, params), out, reason, hit, rid in zip(items, outputs, finish, cached, rids, strict=True):
        tokens = [t for t, _ in out]
        state.prefix.insert(ids + tokens[:-1] if tokens else ids)  # the last token's KV is never computed
        meta = {
            "id": rid,
            "finish_reason": reason,
            "prompt_tokens": len(ids),
            "weight_version": state.weight_version,
            "num_retractions": 0,
            "input_token_logprobs": [],
            "output_token_logprobs": [[lp, t, None] for t, lp in out],
            "output_token_logprobs_length": len(out),
            "reasoning_tokens": 0,
            "completion_tokens": len(tokens),
            "cached_tokens": hit,
            "weight_versions": [{"version": state.weight_version, "start": 0, "end": len(tokens)}],
            "cached_tokens_details": {"device": hit, "host": 0} if hit else None,
            "dp_rank": None,
            "e2e_latency": time.monotonic() - started,
            "response_sent_to_client_ts": time.time(),
        }
        if state.warmup_logprob and params.get("max_new_tokens") == 0:
            meta["output_token_logprobs"] = [[-0.5, 7, None]]
        answers.append({"output_ids": tokens, "meta_info": meta})
    return answers


def _step(state: StandinState, params: dict, stream: Iterator, out: list, abort_at: float) -> dict | None:
    """Decode one token; the finish reason once the item is done."""
    if len(out) >= abort_at:
        return {"type": "abort", "message": "Abort in waiting queue", "status_code": None}
    token, logprob = next(stream)
    out.append((token, logprob))
    stops = set(params.get("stop_token_ids") or ())
    if not params.get("ignore_eos"):
        stops |= set(state.eos_token_ids)
    if token in stops:
        return {"type": "stop", "matched": token}
    if len(out) >= params.get("max_new_tokens", 128):
        return {"type": "length", "length": len(out)}
    return None


@contextmanager
def serve(state: StandinState, port: int) -> Iterator[str]:
    """Run the stand-in under a real uvicorn in a thread; yields its base URL."""
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"SGLang stand-in did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
