"""Inputs that used to answer 500 (NaN, lone surrogates, deep metadata) are 422; trees always serialise."""

from __future__ import annotations

import math

import pytest
from api_helpers import SMALL_TREE, Service

from treepo.client.schema import LOGPROB_FLOOR, MAX_METADATA_DEPTH, Node, Tree
from treepo.service.viewer import render_tree_page

PROMPT = {"text": "1+1="}


def _post_raw(service: Service, raw: str):
    with service.client() as http:
        return http.post("/rollout_tree", content=raw, headers={"content-type": "application/json"})


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["sampling.temperature", "sampling.top_p", "tree.split_temperature"])
def test_non_finite_floats_are_422(service: Service, field: str, value: str) -> None:
    section, name = field.split(".")
    raw = f'{{"prompts": [{{"text": "1+1="}}], "{section}": {{"{name}": {value}}}}}'
    answer = _post_raw(service, raw)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"][-1] == name


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompts": [{"text": "a\\ud800b"}]}',
        '{"prompts": [{"text": "x", "id": "\\udfff"}]}',
        '{"prompts": [{"text": "x", "metadata": {"k": "\\ud800"}}]}',
        '{"prompts": [{"messages": [{"role": "user", "content": "\\ud800"}]}]}',
        '{"prompts": [{"text": "x", "metadata": {"k": NaN}}]}',
    ],
)
def test_lone_surrogates_and_nan_metadata_are_422(service: Service, raw: str) -> None:
    answer = _post_raw(service, raw)
    assert answer.status_code == 422, answer.text
    answer.json()  # valid JSON even though the input was not


def test_deep_metadata_is_422(service: Service) -> None:
    for depth in (MAX_METADATA_DEPTH + 1, 300):
        raw = '{"prompts": [{"text": "x", "metadata": ' + '{"a": ' * depth + "1" + "}" * depth + "}]}"
        answer = _post_raw(service, raw)
        assert answer.status_code == 422, answer.text
        assert "nested deeper" in answer.text


def test_valid_metadata_still_passes(service: Service) -> None:
    body = {
        "prompts": [{**PROMPT, "metadata": {"answer": "2", "nested": {"a": [1, 2.5]}}}],
        "tree": SMALL_TREE,
    }
    with service.client() as http:
        answer = http.post("/rollout_tree", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["trees"][0]["metadata"]["nested"] == {"a": [1, 2.5]}


def test_minus_infinity_logprobs_are_floored_and_the_tree_parses() -> None:
    node = Node(id="n", parent=None, depth=1, token_ids=[1, 2, 3], logprobs=[-math.inf, math.nan, -0.5])
    assert node.logprobs == [LOGPROB_FLOOR, LOGPROB_FLOOR, -0.5]
    tree = Tree(tree_id="t", prompt_id="p", policy_version=0, nodes=[node], leaves=["n"])
    again = Tree.model_validate_json(tree.model_dump_json())
    assert again.nodes[0].logprobs == [LOGPROB_FLOOR, LOGPROB_FLOOR, -0.5]


def test_viewer_draws_a_tree_600_segments_deep() -> None:
    nodes = [
        Node(id=f"n{i}", parent=f"n{i - 1}" if i else None, depth=i + 1, token_ids=[1]) for i in range(600)
    ]
    tree = Tree(tree_id="deep", prompt_id="p", policy_version=0, nodes=nodes, leaves=["n599"])
    page = render_tree_page(tree)
    assert "n599" in page
