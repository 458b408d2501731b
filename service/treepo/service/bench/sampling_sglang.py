"""`treepo bench sampling --engine sglang`: the same tree-vs-sequential runs on a real SGLang server.

With `--sglang-url` it measures that server; without, it launches the pinned one from the environment
`make sglang-env` builds (.venv-sglang) on the benchmarked model, with `--max-total-tokens` as its KV
budget, and stops it afterwards. Each run starts from a flushed radix cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from treepo.service.engine.sglang import SGLangEngine
from treepo.service.engine.sglang_server import SGLangServer, start_server

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def sglang_engine(
    model_path: Path, url: str | None, max_total_tokens: int
) -> Iterator[tuple[SGLangEngine, dict[str, Any]]]:
    """An engine on `url`, or on a server launched here; plus what the README table reports about it."""
    server: SGLangServer | None = None
    with tempfile.TemporaryDirectory() as logs:
        try:
            if url is None:
                server = start_server(
                    model_path, _free_port(), Path(logs) / "sglang.log", max_total_tokens=max_total_tokens
                )
                logger.info("launched SGLang (%s); waiting for it", " ".join(server.command))
                server.wait_ready(timeout_s=600)
                url = server.url
            engine = SGLangEngine([url], model_path=model_path)
            engine.read_server_limits(wait_s=60)
            info = httpx.get(url + "/get_server_info", timeout=30).json()
            yield (
                engine,
                {
                    "sglang_url": url if server is None else "launched here",
                    "sglang_version": info.get("version"),
                    "sglang_kv_budget_tokens": info.get("max_total_num_tokens"),
                    "sglang_dtype": info.get("dtype"),
                    "sglang_device": info.get("device"),
                },
            )
        finally:
            if server is not None:
                server.stop()


def kv_bytes_per_token(model_path: Path, itemsize: int = 4) -> int:
    """K and V of every layer for one token (float32 unless told)."""
    config = json.loads((model_path / "config.json").read_text())
    config = config.get("text_config", config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * itemsize


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
