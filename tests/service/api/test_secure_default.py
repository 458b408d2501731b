"""`treepo serve` refuses a non-loopback bind without a token unless --insecure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from treepo.service.serve import bind_refusal, is_loopback

TREEPO = Path(sys.executable).with_name("treepo")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    assert is_loopback(host)
    assert bind_refusal(host, has_token=False, insecure=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_open_bind_needs_a_token_or_insecure(host: str) -> None:
    refusal = bind_refusal(host, has_token=False, insecure=False)
    assert refusal and "TREEPO_API_TOKEN" in refusal and "--insecure" in refusal
    assert bind_refusal(host, has_token=True, insecure=False) is None
    assert bind_refusal(host, has_token=False, insecure=True) is None


def test_serve_exits_with_the_fix_before_binding() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TREEPO_API_TOKEN"}
    done = subprocess.run(
        [str(TREEPO), "serve", "--engine", "scripted", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "TREEPO_API_TOKEN" in done.stderr and "--insecure" in done.stderr
