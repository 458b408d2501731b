"""docker-compose.yml opens no unauthenticated service: it refuses to start without TREEPO_API_TOKEN and hands
the token to every service replica and to the trainer."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml
from deploy_tools import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
REQUIRED = "${TREEPO_API_TOKEN:?"


def test_every_service_replica_and_the_trainer_require_the_token() -> None:
    services = COMPOSE["services"]
    for name in ("service", "service-gpu"):
        assert services[name]["environment"]["TREEPO_API_TOKEN"].startswith(REQUIRED), name
    command = services["trainer"]["command"]
    assert command[command.index("--api-token") + 1].startswith(REQUIRED)


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_compose_config_fails_without_a_token(token: str | None) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "TREEPO_API_TOKEN"}
    if token:
        env["TREEPO_API_TOKEN"] = token
    args = [compose, "-f", "docker-compose.yml", "--profile", "gpu", "config"]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if token is None:
        assert result.returncode != 0 and "set TREEPO_API_TOKEN" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        rendered = yaml.safe_load(result.stdout)["services"]
        assert rendered["service"]["environment"]["TREEPO_API_TOKEN"] == token
        assert rendered["service-gpu"]["environment"]["TREEPO_API_TOKEN"] == token
