"""POST/GET /weights: version bumps, paths confined to the weights dir, uploads, atomic swaps."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
from api_helpers import SMALL_TREE, Service, factory_of
from safetensors.numpy import save, save_file

from treepo.client.schema import Tree, WeightsInfo
from treepo.service.engine.protocol import EngineUnavailable
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import printable_script


class SlowSwapEngine(ScriptedEngine):
    """Scripted generation with a weight load that takes `swap_s` (a big checkpoint)."""

    def __init__(self, swap_s: float, latency_s: float = 0.0) -> None:
        super().__init__(printable_script(eos_probability=0.0), latency_s=latency_s)
        self.swap_s = swap_s

    async def update_weights(self, path: str, version: int) -> None:
        await asyncio.sleep(self.swap_s)
        await super().update_weights(path, version)


class UnreachableEngine(ScriptedEngine):
    """Generation works, but the weight load cannot reach the backend (a worker down)."""

    async def update_weights(self, path: str, version: int) -> None:
        raise EngineUnavailable("SGLang worker http://w:30000 unreachable")


def _checkpoint(service: Service, name: str = "step-1.safetensors", value: float = 0.5) -> Path:
    path = service.settings.weights_dir / name
    save_file({"w": np.full((4, 3), value, dtype=np.float32)}, str(path))
    return path


def safetensors_bytes(value: float = 0.5) -> bytes:
    return save({"w": np.full((4, 3), value, dtype=np.float32), "step": np.arange(3)})


def test_update_by_path_bumps_the_version(service: Service) -> None:
    _checkpoint(service)
    with service.client() as http:
        assert http.get("/weights").json()["policy_version"] == 0
        implicit = WeightsInfo.model_validate(
            http.post("/weights", json={"path": "step-1.safetensors"}).json()
        )
        explicit = http.post("/weights", json={"path": "step-1.safetensors", "version": 7}).json()
        current = http.get("/weights").json()
        tree = http.post("/rollout_tree", json={"prompts": [{"text": "1+"}], "tree": SMALL_TREE}).json()[
            "trees"
        ][0]
        metrics = http.get("/metrics").text
    assert implicit.policy_version == 1 and implicit.path == "step-1.safetensors"
    assert explicit["policy_version"] == current["policy_version"] == 7
    assert service.engine.weights_path == str(service.settings.weights_dir.resolve() / "step-1.safetensors")
    assert tree["policy_version"] == 7 and {n["policy_version"] for n in tree["nodes"]} == {7}
    assert "treepo_policy_version 7.0" in metrics
    assert "treepo_weight_update_duration_seconds_count 2.0" in metrics


def test_paths_outside_the_weights_dir_are_refused(service: Service, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    with service.client() as http:
        for path in ("../outside.safetensors", str(outside), "/etc/passwd"):
            answer = http.post("/weights", json={"path": path})
            assert answer.status_code == 403, answer.text
            assert "outside the weights directory" in answer.json()["detail"]
        missing = http.post("/weights", json={"path": "nope.safetensors"})
        assert missing.status_code == 422 and "no checkpoint" in missing.json()["detail"]
        assert http.get("/weights").json()["policy_version"] == 0
    assert service.engine.weights_path is None


def test_bad_versions_and_bodies(service: Service) -> None:
    _checkpoint(service)
    with service.client() as http:
        assert http.post("/weights", json={"path": "step-1.safetensors", "version": 3}).status_code == 200
        stale = http.post("/weights", json={"path": "step-1.safetensors", "version": 2})
        bad = http.post("/weights", json={"path": "step-1.safetensors", "version": "three"})
        empty = http.post("/weights", content=b"", headers={"content-type": "application/json"})
    assert stale.status_code == 409 and "greater than the current policy_version 3" in stale.json()["detail"]
    assert bad.status_code == 422 and "version" in bad.json()["detail"]
    assert empty.status_code == 422


def test_multipart_upload(service: Service) -> None:
    content = safetensors_bytes()
    with service.client() as http:
        answer = http.post("/weights", files={"file": ("w.safetensors", content)}, data={"version": "2"})
        no_file = http.post("/weights", data={"version": "3"}, files={"other": ("x", b"1")})
    assert answer.status_code == 200, answer.text
    info = WeightsInfo.model_validate(answer.json())
    assert info.policy_version == 2 and info.path.startswith("uploads/")
    assert (service.settings.weights_dir / info.path).read_bytes() == content
    assert service.engine.weights_path == str((service.settings.weights_dir / info.path).resolve())
    assert no_file.status_code == 422 and "'file'" in no_file.json()["detail"]


def test_new_requests_get_503_during_a_long_swap(make_service) -> None:
    service = make_service(engine_factory=factory_of(lambda: SlowSwapEngine(swap_s=1.5)), swap_wait_s=0.2)
    _checkpoint(service)
    results: dict[str, int] = {}

    def swap() -> None:
        with service.client() as http:
            results["swap"] = http.post("/weights", json={"path": "step-1.safetensors"}).status_code

    thread = threading.Thread(target=swap)
    thread.start()
    with service.client() as http:
        while not http.get("/readyz").json()["swapping_weights"]:
            pass
        answer = http.post("/rollout_tree", json={"prompts": [{"text": "1"}], "tree": SMALL_TREE})
    thread.join()
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert "swapping weights" in answer.json()["detail"] and results["swap"] == 200


def test_a_tree_sampled_across_an_update_records_each_segments_version(make_service) -> None:
    engine_factory = factory_of(lambda: SlowSwapEngine(swap_s=0.0, latency_s=0.05))
    service = make_service(engine_factory=engine_factory)
    _checkpoint(service)
    tree_box: list[Tree] = []
    body = {
        "prompts": [{"text": "7"}],
        "tree": {"width": 2, "branch": 2, "segment_tokens": 2, "max_depth": 12},
    }

    def sample() -> None:
        with service.client() as http:
            tree_box.append(Tree.model_validate(http.post("/rollout_tree", json=body).json()["trees"][0]))

    thread = threading.Thread(target=sample)
    thread.start()
    with service.client() as http:
        while not service.engine.requests:
            pass
        assert http.post("/weights", json={"path": "step-1.safetensors"}).status_code == 200
    thread.join()
    (tree,) = tree_box
    versions = [node.policy_version for node in sorted(tree.nodes, key=lambda n: n.depth)]
    assert tree.policy_version == 0 and versions[0] == 0 and versions[-1] == 1
    assert versions == sorted(versions)


def test_an_unreachable_engine_is_503_with_retry_after_and_the_version_stays(make_service) -> None:
    service = make_service(engine_factory=factory_of(UnreachableEngine))
    _checkpoint(service)
    with service.client() as http:
        refused = http.post("/weights", json={"path": "step-1.safetensors"})
        current = http.get("/weights").json()
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert "could not be reached" in refused.json()["detail"] and current["policy_version"] == 0
