"""Builds the configured engine and its codec: the one place that knows every engine kind."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from treepo.service.codec import ByteCodec, Codec, HFCodec
from treepo.service.config import Settings
from treepo.service.engine.protocol import Engine
from treepo.service.engine.scripted import ScriptedEngine

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], tuple[Engine, Codec]]
_PRINTABLE = [ord(c) + 1 for c in "abcdefghijklmnopqrstuvwxyz0123456789 +-=."]  # ByteCodec ids


def printable_script(eos_probability: float = 0.01) -> Callable[[list[int], random.Random], list[int]]:
    """Scripted output over printable characters with an occasional EOS (id 0): readable, varied trees."""

    def script(input_ids: list[int], rng: random.Random) -> list[int]:
        return [0 if rng.random() < eos_probability else rng.choice(_PRINTABLE) for _ in range(4096)]

    return script


def build_engine(settings: Settings) -> tuple[Engine, Codec]:
    """The engine named by `settings.engine` and the codec of its model (blocking: loads weights)."""
    builders: dict[str, EngineFactory] = {
        "scripted": _scripted,
        "embedded": _embedded,
        "sglang": _sglang,
    }
    logger.info("building the %s engine", settings.engine)
    return builders[settings.engine](settings)


def _scripted(settings: Settings) -> tuple[Engine, Codec]:
    engine = ScriptedEngine(
        printable_script(),
        eos_token_id=0,
        max_context=settings.max_context or 4096,
        latency_s=settings.scripted_latency_s,
    )
    return engine, ByteCodec()


def _embedded(settings: Settings) -> tuple[Engine, Codec]:
    import torch

    from treepo.service.engine.embedded import EmbeddedEngine

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    path = settings.resolved_model_path()
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    engine = EmbeddedEngine(
        path,
        device=settings.device,
        dtype=dtype,
        max_kv_tokens=settings.max_kv_tokens,
        max_running_rows=settings.max_running_rows,
    )
    return engine, HFCodec(path)


def _sglang(settings: Settings) -> tuple[Engine, Codec]:
    """SGLang runs with --skip-tokenizer-init: the service tokenizes with the same model's local files."""
    from treepo.service.engine.sglang import SGLangEngine

    path = settings.resolved_model_path()
    engine = SGLangEngine(
        settings.sglang_urls,
        admin_urls=settings.sglang_admin_urls or None,
        model_path=path,
        max_context=settings.max_context,
    )
    engine.read_server_limits(wait_s=settings.sglang_wait_s)  # the workers' real limits (loading meanwhile)
    return engine, HFCodec(path)
