"""Real SGLang servers for the integration suite (`make test-sglang`): never skipped, loud when they fail.

One server (the shipped tiny model) lives for the whole session; a test that needs a second one, or kills
one, starts its own with `launch`. If SGLang cannot start, the test fails with the tail of its log.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sglang_helpers import free_port

from treepo.service.engine.sglang_server import SGLangLaunchError, SGLangServer, start_server
from treepo.service.tinymodel import default_model_path

READY_TIMEOUT_S = 240.0  # ~20 s on a quiet 2-core machine, ~90 s on a busy one

Launch = Callable[..., SGLangServer]


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def launch(tmp_path_factory, model_path) -> Iterator[Launch]:
    """launch(port=None, model=None, wait=True) -> a started (and ready) server, stopped at session end."""
    servers: list[SGLangServer] = []
    logs = tmp_path_factory.mktemp("sglang-logs")

    def _launch(port: int | None = None, model: Path | None = None, wait: bool = True) -> SGLangServer:
        port = port or free_port()
        try:
            server = start_server(model or model_path, port, logs / f"sglang-{port}-{len(servers)}.log")
        except SGLangLaunchError as exc:  # no SGLang environment: the message says how to make one
            pytest.fail(str(exc), pytrace=False)
        servers.append(server)
        if wait:
            ready(server)
        return server

    yield _launch
    for server in servers:
        server.stop()


def ready(server: SGLangServer) -> None:
    """Wait for `server`; a server that cannot start fails the test with its log (never a skip)."""
    try:
        server.wait_ready(READY_TIMEOUT_S)
    except SGLangLaunchError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def sglang(launch) -> SGLangServer:
    """The shared server: tiny model, float32, 4096 KV tokens. Tests must not assume its weight_version."""
    return launch()


@pytest.fixture(scope="session")
def redis_url_session() -> str:
    return os.environ.get("TREEPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
