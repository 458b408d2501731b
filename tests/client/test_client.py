"""TreePOClient / AsyncTreePOClient against a real service (uvicorn thread, scripted engine, real Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from treepo.client import AsyncTreePOClient, RetryPolicy, TreePOClient, TreePOError
from treepo.client import constants as names
from treepo.client.schema import Prompt, RolloutAccepted, RolloutTreeResponse, Tree
from treepo.service.app import create_app
from treepo.service.codec import ByteCodec
from treepo.service.config import Settings
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import build_engine, printable_script
from treepo.service.server import BackgroundServer

TREE = {"width": 4, "branch": 2, "segment_tokens": 6, "max_depth": 3}
FAST_RETRY = RetryPolicy(max_attempts=10, base_delay_s=0.05, max_delay_s=2.0)


@pytest.fixture
def start(
    redis_url: str, key_prefix: str, free_port: int, tmp_path: Path
) -> Iterator[Callable[..., Settings]]:
    """start(**settings, engine_factory=...) -> the running service's settings; stopped after the test."""
    servers: list[BackgroundServer] = []

    def run(engine_factory: Any = build_engine, **overrides: Any) -> Settings:
        settings = Settings(
            engine="scripted",
            redis_url=redis_url,
            key_prefix=key_prefix,
            port=free_port,
            weights_dir=tmp_path,
            retry_after_s=1,
            **overrides,
        )
        servers.append(
            BackgroundServer(create_app(settings, engine_factory=engine_factory), port=free_port).start()
        )
        return settings

    yield run
    for server in servers:
        server.stop()


def _url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.port}"


def _ready(settings: Settings) -> TreePOClient:
    client = TreePOClient(_url(settings), retry=FAST_RETRY)
    deadline = time.monotonic() + 20
    while client.health()["status_code"] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return client


def test_three_delivery_modes_give_typed_results(start, redis_url: str) -> None:
    settings = start()
    with _ready(settings) as client:
        inline = client.rollout_tree(["1+2=", [50, 51], Prompt(text="4-1=", id="mine")], tree=TREE)
        accepted = client.rollout_tree(["9="], tree=TREE, delivery="queue")
        streamed = list(client.rollout_tree(["5=", "6="], tree=TREE, sampling={"seed": 1}, delivery="stream"))
        assert isinstance(inline, RolloutTreeResponse) and len(inline.trees) == 3
        assert inline.trees[2].prompt_id == "mine" and all(len(t.leaves) == 4 for t in inline.trees)
        assert isinstance(accepted, RolloutAccepted) and len(accepted.tree_ids) == 1
        assert len(streamed) == 2 and all(isinstance(t, Tree) for t in streamed)
        deadline = time.monotonic() + 10
        while True:  # the queued tree is readable once it landed in the stream
            try:
                queued = client.get_tree(accepted.tree_ids[0])
                break
            except TreePOError as exc:
                assert exc.status == 404 and time.monotonic() < deadline
                time.sleep(0.05)
        assert queued.prompt_text == "9="
        with pytest.raises(TreePOError) as missing:
            client.get_tree("unknown")
    assert missing.value.status == 404 and "unknown" in str(missing.value.detail)


def test_local_validation_before_sending(start) -> None:
    settings = start()
    with _ready(settings) as client:
        with pytest.raises(ValueError, match="width"):
            client.rollout_tree(["1"], tree={"width": 0})
        with pytest.raises(ValueError, match="exactly one"):
            client.update_weights()


def test_retries_503_while_the_engine_loads(start) -> None:
    def slow_factory(settings: Settings) -> tuple[ScriptedEngine, ByteCodec]:
        time.sleep(1.5)
        return ScriptedEngine(printable_script()), ByteCodec()

    settings = start(engine_factory=slow_factory)
    started = time.monotonic()
    with TreePOClient(_url(settings), retry=FAST_RETRY) as client:
        result = client.rollout_tree(["1+1="], tree=TREE)
    assert isinstance(result, RolloutTreeResponse) and len(result.trees) == 1
    assert time.monotonic() - started >= 1.0, "the first attempts were refused with 503 and retried"


def test_gives_up_on_429_after_the_bounded_attempts_honouring_retry_after(start, redis_url: str) -> None:
    import redis

    settings = start(max_queue_depth=1)
    with redis.Redis.from_url(redis_url) as r:
        r.xadd(names.trees_stream(settings.key_prefix), {names.TREE_FIELD: "{}"})
    with _ready(settings) as ready:
        ready.close()
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=5.0)
    started = time.monotonic()
    with TreePOClient(_url(settings), retry=policy) as client, pytest.raises(TreePOError) as refused:
        client.rollout_tree(["1"], tree=TREE, delivery="queue")
    assert refused.value.status == 429 and "unconsumed" in refused.value.detail
    assert time.monotonic() - started >= 0.9, "waited the server's Retry-After: 1, not the 0.01 s backoff"
    with TreePOClient(_url(settings)) as client:
        metrics = client._http.get("/metrics").text
    assert 'route="/rollout_tree",status="429"} 2.0' in metrics


def test_weights_by_path_and_upload(start, tmp_path: Path) -> None:
    settings = start()
    save_file({"w": np.ones(4, dtype=np.float32)}, str(tmp_path / "ckpt.safetensors"))
    upload = tmp_path / "upload.safetensors"
    save_file({"w": np.full(4, 2.0, dtype=np.float32)}, str(upload))
    with _ready(settings) as client:
        assert client.weights().policy_version == 0
        assert client.update_weights(path="ckpt.safetensors").policy_version == 1
        info = client.update_weights(file=upload, version=5)
        assert info.policy_version == 5 and (tmp_path / info.path).read_bytes() == upload.read_bytes()
        with open(upload, "rb") as handle:
            assert client.update_weights(file=handle).policy_version == 6
        with pytest.raises(TreePOError) as outside:
            client.update_weights(path="/etc/hostname")
        assert client.weights().policy_version == 6
    assert outside.value.status == 403


def test_token_and_idempotency_key(start) -> None:
    settings = start(api_token="tok")
    with TreePOClient(_url(settings), token="tok", retry=FAST_RETRY) as client:
        first = client.rollout_tree(["3"], tree=TREE, delivery="queue", idempotency_key="job-1")
        again = client.rollout_tree(["3"], tree=TREE, delivery="queue", idempotency_key="job-1")
    assert first == again
    with TreePOClient(_url(settings), retry=FAST_RETRY) as anonymous, pytest.raises(TreePOError) as refused:
        anonymous.weights()
    assert refused.value.status == 401


async def test_async_client(start) -> None:
    settings = start()
    _ready(settings).close()
    async with AsyncTreePOClient(_url(settings), retry=FAST_RETRY) as client:
        inline = await client.rollout_tree(["1", "2"], tree=TREE)
        stream = await client.rollout_tree(["3", "4", "5"], tree=TREE, delivery="stream")
        streamed = [tree async for tree in stream]
        health = await client.health()
        weights = await client.weights()
    assert isinstance(inline, RolloutTreeResponse) and len(inline.trees) == 2
    assert sorted(t.prompt_text for t in streamed) == ["3", "4", "5"]
    assert health["ready"] is True and weights.policy_version == 0


def test_retry_policy_checks_and_delays() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4)
    assert [policy.delay(a, None) for a in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.delay(0, "3") == 3 and policy.delay(0, "100") == 4
    assert policy.delay(1, "Wed, 21 Oct 2015 07:28:00 GMT") == 1.0


def test_retries_409_while_the_same_idempotency_key_runs(start, key_prefix: str) -> None:
    """A retry that arrives while the first attempt still samples waits for it and gets its answer."""
    import threading

    import redis

    slow = ScriptedEngine(printable_script(eos_probability=0.0), latency_s=0.3)
    settings = start(engine_factory=lambda s: (slow, ByteCodec()))
    _ready(settings).close()
    first: list[RolloutTreeResponse] = []

    def run_first() -> None:
        with TreePOClient(_url(settings), retry=FAST_RETRY) as client:
            first.append(client.rollout_tree(["7"], tree=TREE, idempotency_key="twice"))

    thread = threading.Thread(target=run_first)
    thread.start()
    watcher = redis.Redis.from_url(settings.redis_url)
    key = names.idempotency_key("twice", key_prefix)
    deadline = time.monotonic() + 10
    while not watcher.exists(key):
        assert time.monotonic() < deadline, "the first request never claimed its key"
        time.sleep(0.01)
    watcher.close()
    with TreePOClient(_url(settings), retry=FAST_RETRY) as client:
        second = client.rollout_tree(["7"], tree=TREE, idempotency_key="twice")
    thread.join()
    assert first and second == first[0]
