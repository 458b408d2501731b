"""Run an ASGI app under uvicorn in a background thread: for tests, benchmarks and in-process demos."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn whose stop (SIGTERM) gives open requests and the app's own shutdown one grace period together:
    requests still open when it ends are cancelled, and the app reads `app.state.shutdown_deadline` to drain
    only for what is left (without it uvicorn waits for every open request, however long)."""

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        config.timeout_graceful_shutdown = grace_s  # seconds; uvicorn passes it to asyncio.timeout
        super().__init__(config)
        self.grace_s = grace_s

    async def shutdown(self, sockets: list | None = None) -> None:
        state = getattr(self.config.app, "state", None)
        if state is not None:
            state.shutdown_deadline = time.monotonic() + self.grace_s
        await super().shutdown(sockets)


class BackgroundServer:
    """`with BackgroundServer(app, port=...) as server: httpx.get(server.url + "/healthz")`."""

    def __init__(
        self, app: ASGIApp, *, host: str = "127.0.0.1", port: int, log_level: str = "warning"
    ) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{port}", daemon=True)
        self.url = f"http://{host}:{port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start serving; raises RuntimeError if uvicorn is not listening within `timeout_s`."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url} (port taken? see the log)")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop: the lifespan shutdown (queue jobs drain) runs before this returns."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("uvicorn on %s did not stop within %.0f s", self.url, timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
