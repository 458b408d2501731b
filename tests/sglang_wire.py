"""Recorded exchanges with a real SGLang server (tests/sglang/fixtures) and their replay.

`tests/sglang/test_wire.py` replays every scenario against the real server and checks that it still
answers as recorded (`TREEPO_RECORD_SGLANG=1` re-records them); `tests/service/engine/test_sglang_standin_wire.py`
replays them against the stand-in, which must answer the same. "The same" is `summary()`: status, the
response's key structure, finish reasons, token counts and the error shape, not the sampled token values.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import httpx

FIXTURES = Path(__file__).parent / "sglang" / "fixtures"
PROMPT = [56, 73, 66, 85, 222, 74, 84, 222, 18, 19, 12, 24, 32, 222]  # "What is 12+7? " (tiny model)
ABORT_RID = "treepo-fixture-abort"
MODEL = "{MODEL}"  # replaced by the served model's directory at replay


def _generate(input_ids: Any, params: Any, **extra: Any) -> dict[str, Any]:
    body = {
        "input_ids": input_ids,
        "sampling_params": params,
        "return_logprob": True,
        "logprob_start_len": -1,
    }
    return {"method": "POST", "path": "/generate", "body": {**body, **extra}}


SCENARIOS: dict[str, dict[str, Any]] = {
    "generate_logprobs": _generate(PROMPT, {"max_new_tokens": 4, "temperature": 1.0, "stop_token_ids": [0]}),
    "generate_batch": _generate(
        [PROMPT, PROMPT[:-1]], [{"max_new_tokens": 3, "temperature": 0.7}, {"max_new_tokens": 2, "top_k": 5}]
    ),
    "generate_stop_eos": _generate(PROMPT, {"max_new_tokens": 64, "temperature": 0.0}),
    "generate_warmup": _generate(PROMPT, {"max_new_tokens": 0}),
    "generate_seeded": _generate(PROMPT, {"max_new_tokens": 2, "sampling_seed": 2**31 - 1}),
    # input + max_new_tokens up to the context (512): max_new_tokens is cut to context - 2 - input (no error)
    "generate_context_cut": _generate([5] * 500, {"max_new_tokens": 12, "ignore_eos": True}),
    "error_context_exceeded": _generate([5] * 500, {"max_new_tokens": 20, "ignore_eos": True}),
    "error_input_too_long": _generate([5] * 506, {"max_new_tokens": 1}),  # max_req_input_len = 506
    "error_unknown_sampling_field": _generate(PROMPT, {"max_new_tokens": 1, "seed": 3}),
    "error_top_p_zero": _generate(PROMPT, {"max_new_tokens": 1, "top_p": 0.0}),
    "generate_token_out_of_vocab": _generate([5, 300], {"max_new_tokens": 1}),  # accepted (vocab is 258)
    "abort": {
        **_generate(PROMPT, {"max_new_tokens": 480, "ignore_eos": True}, rid=ABORT_RID),
        "abort": {"method": "POST", "path": "/abort_request", "body": {"rid": ABORT_RID}},
    },
    "update_weights": {
        "method": "POST",
        "path": "/update_weights_from_disk",
        "body": {"model_path": MODEL, "weight_version": "7", "flush_cache": True},
    },
    "update_weights_missing_path": {
        "method": "POST",
        "path": "/update_weights_from_disk",
        "body": {"model_path": "/nonexistent/treepo-model", "weight_version": "8"},
    },
    "flush_cache": {"method": "POST", "path": "/flush_cache", "body": None},
    "health": {"method": "GET", "path": "/health", "body": None},
    "health_generate": {"method": "GET", "path": "/health_generate", "body": None},
    "server_info": {"method": "GET", "path": "/get_server_info", "body": None},
}
# /get_server_info returns every server argument; the service reads only these.
SERVER_INFO_KEYS = (
    "context_length",
    "max_req_input_len",
    "max_total_num_tokens",
    "version",
    "weight_version",
)


def run(base_url: str, name: str, model_path: str | Path) -> dict[str, Any]:
    """Send scenario `name` to `base_url`; the exchange as it is stored in a fixture."""
    spec = json.loads(json.dumps(SCENARIOS[name]).replace(MODEL, str(model_path)))
    with httpx.Client(base_url=base_url, timeout=120) as client:
        if "abort" in spec:
            response = _send_and_abort(client, spec)
        else:
            response = client.request(spec["method"], spec["path"], json=spec["body"])
    body: Any = response.text
    with contextlib.suppress(ValueError):
        body = response.json()
    if name == "server_info":
        body = {key: body.get(key) for key in SERVER_INFO_KEYS}
    spec["body"] = json.loads(json.dumps(spec["body"]).replace(str(model_path), MODEL))
    return {"request": spec, "status": response.status_code, "response": body}


def _send_and_abort(client: httpx.Client, spec: dict[str, Any]) -> httpx.Response:
    """The long request in a thread; /abort_request repeated until it returns (it may not be queued yet)."""
    answer: list[httpx.Response] = []
    done = threading.Event()

    def send() -> None:
        try:
            answer.append(client.request(spec["method"], spec["path"], json=spec["body"]))
        finally:
            done.set()

    thread = threading.Thread(target=send)
    thread.start()
    while not done.wait(0.02):
        abort = spec["abort"]
        client.request(abort["method"], abort["path"], json=abort["body"]).raise_for_status()
    thread.join()
    return answer[0]


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def save(name: str, exchange: dict[str, Any]) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / f"{name}.json").write_text(json.dumps(exchange, indent=1, sort_keys=True) + "\n")


def summary(exchange: dict[str, Any]) -> dict[str, Any]:
    """What the stand-in must reproduce and the real server must keep answering."""
    body = exchange["response"]
    items = body if isinstance(body, list) else [body]
    out: dict[str, Any] = {"status": exchange["status"], "shape": _shape(body)}
    if all(isinstance(item, dict) and "meta_info" in item for item in items):
        out["items"] = [_item(item) for item in items]
    elif isinstance(body, dict) and "success" in body:
        out["success"] = body["success"]
    return out


def _item(item: dict[str, Any]) -> dict[str, Any]:
    meta = item["meta_info"]
    reason = dict(meta["finish_reason"])
    reason.pop("message", None)
    if reason["type"] == "abort":  # how far it got before the abort landed varies
        return {"finish_reason": reason, "ids_equal_logprob_ids": _ids_match(item)}
    return {
        "finish_reason": reason,
        "output_tokens": len(item["output_ids"]),
        "completion_tokens": meta["completion_tokens"],
        "prompt_tokens": meta["prompt_tokens"],
        "ids_equal_logprob_ids": _ids_match(item),
    }


def _ids_match(item: dict[str, Any]) -> bool:
    return item["output_ids"] == [entry[1] for entry in item["meta_info"]["output_token_logprobs"]]


_VARIABLE = {"cached_tokens_details", "dp_rank", "matched"}  # null or not depending on the run
# request timing stats: present or not depending on --enable-metrics and the request's path
_TIMING = ("_ts", "_latency", "_throughput", "_time", "_wait")


def _shape(value: Any, key: str = "") -> Any:
    if key in _VARIABLE:
        return "any"
    if isinstance(value, dict):
        return {k: _shape(v, k) for k, v in sorted(value.items()) if not k.endswith(_TIMING)}
    if isinstance(value, list):
        return [_shape(value[0], key)] if value else []
    if isinstance(value, bool) or value is None:
        return repr(value) if value is None else "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "str"
