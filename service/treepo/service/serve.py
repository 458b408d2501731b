"""`treepo serve`: run the rollout service under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Annotated

import typer

from treepo.service.config import EngineKind

logger = logging.getLogger(__name__)
ENGINE_KINDS = ("embedded", "sglang", "scripted")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address [env TREEPO_HOST; default 127.0.0.1].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port [env TREEPO_PORT; default 8000].")] = None,
    engine: Annotated[
        str | None, typer.Option(help="embedded | sglang | scripted [env TREEPO_ENGINE; default embedded].")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Local HF model dir [env TREEPO_MODEL_PATH; default the shipped tiny model]."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Embedded engine device: cpu, cuda... [default cpu].")
    ] = None,
    max_kv_tokens: Annotated[
        int | None,
        typer.Option(
            min=64, help="Embedded engine KV budget in tokens [env TREEPO_MAX_KV_TOKENS; default 65536]."
        ),
    ] = None,
    max_running_rows: Annotated[
        int | None,
        typer.Option(
            min=1, help="Embedded engine rows decoding at once [env TREEPO_MAX_RUNNING_ROWS; default 256]."
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="Embedded engine dtype: auto | float32 | bfloat16 | float16 [env TREEPO_DTYPE]."),
    ] = None,
    sglang_url: Annotated[
        list[str] | None, typer.Option(help="SGLang worker/router URL (repeatable) [env TREEPO_SGLANG_URLS].")
    ] = None,
    weights_dir: Annotated[
        Path | None, typer.Option(help="POST /weights paths must lie under it [env TREEPO_WEIGHTS_DIR].")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL [env REDIS_URL / TREEPO_REDIS_URL].")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error.")] = "info",
    insecure: Annotated[
        bool,
        typer.Option(
            help="Allow a non-loopback bind without TREEPO_API_TOKEN (anyone who can reach it can use it)."
        ),
    ] = False,
) -> None:
    """Start the TreePO rollout service (FastAPI + uvicorn); other settings: TREEPO_* variables."""
    import uvicorn
    from pydantic import ValidationError

    from treepo.service.app import create_app
    from treepo.service.config import Settings
    from treepo.service.server import GracefulServer

    if engine is not None and engine not in ENGINE_KINDS:
        raise typer.BadParameter(f"unknown engine {engine!r}; expected one of {', '.join(ENGINE_KINDS)}")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    overrides = {
        "host": host,
        "port": port,
        "engine": engine,
        "model_path": model,
        "device": device,
        "max_kv_tokens": max_kv_tokens,
        "max_running_rows": max_running_rows,
        "dtype": dtype,
        "sglang_urls": sglang_url,
        "weights_dir": weights_dir,
        "redis_url": redis_url,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    _check_model(settings.engine, model)
    refusal = bind_refusal(settings.host, settings.api_token is not None, insecure)
    if refusal:
        raise typer.BadParameter(refusal, param_hint="--host")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level=log_level.lower()
    )
    GracefulServer(config, grace_s=settings.shutdown_grace_s).run()


def _check_model(engine: EngineKind, model: str | None) -> None:
    if model is not None and engine != "scripted" and not Path(model).is_dir():
        raise typer.BadParameter(f"--model {model!r} is not a directory; give a local Hugging Face model dir")


def bind_refusal(host: str, has_token: bool, insecure: bool) -> str | None:
    """Why `host` may not be bound (None if it may): the service is open to anyone who reaches it, so a
    non-loopback address needs a token, or an explicit --insecure."""
    if has_token or insecure or is_loopback(host):
        return None
    return (
        f"refusing to serve on {host!r} without a token: anyone who can reach it could sample and replace the "
        "weights. Set TREEPO_API_TOKEN=<secret> (clients send 'Authorization: Bearer <secret>'), bind "
        "--host 127.0.0.1, or pass --insecure on a trusted network"
    )


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to them (e.g. localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
