"""The service on the embedded engine with a real (tiny, random) Hugging Face model: text, chat, weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from api_helpers import Service
from safetensors.numpy import save_file

from treepo.client.schema import Tree
from treepo.service.tinymodel import build_model, build_tokenizer, save_model

TREE = {"width": 4, "branch": 2, "segment_tokens": 8, "max_depth": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_tokenizer(["12+30-7=35"])
    path = tmp_path_factory.mktemp("tiny-random")
    save_model(build_model(tokenizer, seed=0), tokenizer, path, {"note": "random init for tests"})
    return path


@pytest.mark.slow
def test_embedded_engine_end_to_end(make_service, model_dir: Path) -> None:
    """Text and chat prompts through the model's tokenizer, context and vocabulary checks, a weight update."""
    service: Service = make_service(engine="embedded", model_path=str(model_dir))
    body = {
        "prompts": [{"text": "12+30="}, {"messages": [{"role": "user", "content": "7-3="}]}],
        "tree": TREE,
        "sampling": {"seed": 0},
    }
    with service.client() as http:
        trees = [Tree.model_validate(t) for t in http.post("/rollout_tree", json=body).json()["trees"]]
        too_long = http.post("/rollout_tree", json={"prompts": [{"text": "1" * 5000}], "tree": TREE})
        bad_id = http.post("/rollout_tree", json={"prompts": [{"input_ids": [10**6]}], "tree": TREE})
    for tree in trees:
        assert len(tree.leaves) == 4 and tree.stats.decoded_tokens > 0
        assert all(len(n.logprobs or []) == len(n.token_ids) for n in tree.nodes)
    assert trees[0].prompt_text == "12+30=" and "7-3=" in trees[1].prompt_text
    assert too_long.status_code == 422 and "shorter than the model context" in str(too_long.json())
    assert bad_id.status_code == 422 and "outside the vocabulary" in str(bad_id.json())
    _check_weight_update(service, model_dir)


def _check_weight_update(service: Service, model_dir: Path) -> None:
    checkpoint = service.settings.weights_dir / "step-1"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with service.client() as http:
        info = http.post("/weights", json={"path": "step-1/model.safetensors", "version": 1})
        corrupt = service.settings.weights_dir / "corrupt.safetensors"
        corrupt.write_bytes(b"not a safetensors file")
        refused = http.post("/weights", json={"path": "corrupt.safetensors"})
        foreign = service.settings.weights_dir / "foreign.safetensors"  # well-formed, another architecture
        save_file({"other.weight": np.ones(3, dtype=np.float32)}, str(foreign))
        not_loaded = http.post("/weights", json={"path": "foreign.safetensors"})
        tree = http.post("/rollout_tree", json={"prompts": [{"text": "1+1="}], "tree": TREE}).json()["trees"][
            0
        ]
    assert info.status_code == 200, info.text
    assert refused.status_code == 422 and "not a safetensors file" in refused.json()["detail"]
    assert not_loaded.status_code == 422 and "policy_version stays 1" in not_loaded.json()["detail"]
    assert tree["policy_version"] == 1 and {n["policy_version"] for n in tree["nodes"]} == {1}
