"""`treepo serve --engine sglang` over the real server: whole trees, weight pushes through POST /weights."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file
from sglang_helpers import Service
from transformers import AutoModelForCausalLM

from treepo.trainer.weights import policy_tensors

TREE = {"width": 4, "branch": 2, "segment_tokens": 8, "max_depth": 3}


@pytest.fixture(scope="module")
def service(sglang, tmp_path_factory, redis_url_session):
    service = Service([sglang.url], tmp_path_factory.mktemp("serve"), redis_url_session)
    service.wait_ready()
    yield service
    service.stop()


def write_weights(service: Service, model_path, name: str, noise: float) -> str:
    """The tiny model plus seeded Gaussian noise of std `noise` on every tensor, saved the way `treepo train`
    pushes it (0: the original weights)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    save_file(policy_tensors(model), str(service.weights_dir / name), metadata={"format": "pt"})
    return name


def greedy(service: Service, text: str = "What is 12+7? ") -> dict:
    """A one-path greedy tree of `text`."""
    body = {
        "prompts": [{"text": text}],
        "tree": {"width": 1, "branch": 1, "segment_tokens": 24, "max_depth": 1},
        "sampling": {"temperature": 0.0},
    }
    response = service.http.post("/rollout_tree", json=body)
    assert response.status_code == 200, response.text
    (tree,) = response.json()["trees"]
    return tree


def test_a_tree_end_to_end(service) -> None:
    body = {"prompts": [{"text": "What is 12+7? "}, {"text": "What is 3*4? "}], "tree": TREE}
    response = service.http.post("/rollout_tree", json=body)
    assert response.status_code == 200, response.text
    version = service.http.get("/weights").json()["policy_version"]
    for tree in response.json()["trees"]:
        nodes = {node["id"]: node for node in tree["nodes"]}
        assert len(tree["leaves"]) == TREE["width"]
        assert tree["policy_version"] == version and all(
            n["policy_version"] == version for n in nodes.values()
        )
        for node in nodes.values():
            assert 1 <= len(node["token_ids"]) <= TREE["segment_tokens"]
            assert len(node["logprobs"]) == len(node["token_ids"])
            if node["id"] not in tree["leaves"]:  # a node that was continued ran its whole segment
                assert len(node["token_ids"]) == TREE["segment_tokens"] and node["finish_reason"] is None
        assert tree["stats"]["cached_tokens"] > 0  # siblings and next segments, as SGLang reports them
        assert tree["stats"]["engine_calls"] >= len(nodes)


def test_weight_push_changes_outputs_and_the_original_restores_them(service, model_path) -> None:
    version = service.http.get("/weights").json()["policy_version"]
    original = write_weights(service, model_path, "original.safetensors", 0.0)
    changed = write_weights(service, model_path, "perturbed.safetensors", 0.2)
    # the shared server may serve what an earlier test pushed: start from the shipped weights
    assert service.http.post("/weights", json={"path": original, "version": version + 1}).status_code == 200
    before = greedy(service)

    readiness: list[int] = []
    done = threading.Event()

    def poll_readyz() -> None:  # readiness must not flap while SGLang loads weights
        while not done.is_set():
            readiness.append(service.http.get("/readyz").status_code)

    poller = threading.Thread(target=poll_readyz)
    poller.start()
    try:
        pushed = service.http.post("/weights", json={"path": changed, "version": version + 2})
    finally:
        done.set()
        poller.join()
    assert pushed.status_code == 200, pushed.text
    assert set(readiness) <= {200}
    after = greedy(service)
    assert after["policy_version"] == version + 2
    assert after["nodes"][0]["token_ids"] != before["nodes"][0]["token_ids"]

    restored = service.http.post("/weights", json={"path": original, "version": version + 3})
    assert restored.status_code == 200, restored.text
    again = greedy(service)
    assert again["nodes"][0]["token_ids"] == before["nodes"][0]["token_ids"]
    assert again["nodes"][0]["logprobs"] == before["nodes"][0]["logprobs"]
