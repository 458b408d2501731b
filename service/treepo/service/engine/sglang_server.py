"""Launching a real `python -m sglang.launch_server` for the integration suite and `treepo bench sampling`.

SGLang lives in its own environment (`make sglang-env` -> .venv-sglang): it pins its own torch and
transformers. On a CPU machine it runs the CPU engine; the flags below are the ones measured to work there
(README, "Real SGLang"): float32 (else a float32 checkpoint is served in float16), a small KV budget (the
default reserves ~14 GB and spends ~50 s allocating it), sleep on idle (else the idle scheduler spins a core).
`SGLANG_RETURN_ORIGINAL_LOGPROB=1` makes SGLang report logprobs of the unmodified distribution, not the
temperature-scaled one: the policy-gradient ratio needs the former.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DEFAULT_PYTHON = Path(".venv-sglang/bin/python")
# Test support only (tests/sglang/support/sgl_kernel): satisfies SGLang's CPU-engine import of sgl_kernel
# on machines without the compiled kernel; see its docstring.
KERNEL_STANDIN = Path("tests/sglang/support")
SGLANG_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}


class SGLangLaunchError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def launch_flags(
    model_path: str | Path, port: int, *, max_total_tokens: int = 4096, device: str = "cpu"
) -> list[str]:
    """`sglang.launch_server` arguments for serving `model_path` to the service (token ids in and out)."""
    flags = [
        "--model-path", str(model_path), "--host", "127.0.0.1", "--port", str(port),
        "--skip-tokenizer-init", "--enable-metrics", "--max-total-tokens", str(max_total_tokens),
    ]  # fmt: skip
    if device == "cpu":
        flags += ["--device", "cpu", "--dtype", "float32", "--mem-fraction-static", "0.05"]
        flags += ["--sleep-on-idle", "--disable-overlap-schedule"]
    return flags


@dataclass
class SGLangServer:
    """One launched server process (its own process group, so stopping it stops all three of its processes)."""

    url: str
    process: subprocess.Popen
    log_path: Path
    command: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        """Poll `/health_generate` (a real one-token generation) until 200; SGLangLaunchError otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SGLangLaunchError(
                    f"SGLang exited with code {self.process.returncode} before it was ready "
                    f"({' '.join(self.command)}). Log tail:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/health_generate", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SGLangLaunchError(
            f"SGLang at {self.url} was not ready after {timeout_s:.0f} s. Log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the process group (~5 s), SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout_s)


def start_server(
    model_path: str | Path,
    port: int,
    log_path: str | Path,
    *,
    python: str | Path | None = None,
    max_total_tokens: int = 4096,
    extra_args: list[str] | tuple[str, ...] = (),
) -> SGLangServer:
    """Start (not wait for) an SGLang server from `python` (default .venv-sglang/bin/python).

    On Linux the server dies with the thread that started it: call this from the main thread, not from a
    short-lived worker thread.
    """
    python = Path(python or os.environ.get("SGLANG_PYTHON") or DEFAULT_PYTHON)
    if not python.exists():
        raise SGLangLaunchError(
            f"no SGLang environment at {python}: run `make sglang-env` (or set SGLANG_PYTHON to the python "
            "of an environment with sglang installed)"
        )
    env = {**os.environ, **SGLANG_ENV}
    if KERNEL_STANDIN.is_dir() and not _has_kernel(python):
        env["PYTHONPATH"] = os.pathsep.join(
            [str(KERNEL_STANDIN.resolve()), *filter(None, [env.get("PYTHONPATH")])]
        )
    command = [str(python), "-m", "sglang.launch_server"]
    command += launch_flags(model_path, port, max_total_tokens=max_total_tokens) + list(extra_args)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    return SGLangServer(f"http://127.0.0.1:{port}", process, log_path, command)


def die_with_parent() -> None:
    """Kill the server when its launcher dies (a test run killed on timeout leaves none behind): SGLang's own
    processes die with it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _has_kernel(python: Path) -> bool:
    """Whether the environment carries a real `sgl_kernel` (an AMX Xeon's CPU build or a GPU one)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('sgl_kernel') is None)"
    return subprocess.run([str(python), "-c", probe], check=False).returncode == 0
