"""Helpers of the real-SGLang suite: free ports and a `treepo serve --engine sglang` subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from treepo.service.engine.sglang_server import die_with_parent

TREEPO = str(Path(sys.executable).parent / "treepo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """A `treepo serve --engine sglang` subprocess over the given SGLang URLs."""

    def __init__(self, sglang_urls: list[str], workdir: Path, redis_url: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.weights_dir = workdir / "weights"
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"serve-{self.port}.log"
        command = [TREEPO, "serve", "--engine", "sglang", "--port", str(self.port), "--log-level", "info"]
        for url in sglang_urls:
            command += ["--sglang-url", url]
        variables = {
            **os.environ,
            "REDIS_URL": redis_url,
            "TREEPO_KEY_PREFIX": f"treepo-sglang-{uuid.uuid4().hex[:10]}",
            "TREEPO_WEIGHTS_DIR": str(self.weights_dir),
            **env,
        }
        variables.pop("TREEPO_API_TOKEN", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=variables, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        self.http = httpx.Client(base_url=self.url, timeout=300)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"treepo serve exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"treepo serve not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
