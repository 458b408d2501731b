"""POST /rollout_tree in its three delivery modes, idempotency, GET /trees/{id}; real HTTP + Redis."""

from __future__ import annotations

import time

from api_helpers import SMALL_TREE, Service

from treepo.client import constants as names
from treepo.client.schema import RolloutAccepted, RolloutTreeResponse, Tree


def _body(delivery: str = "inline", **extra: object) -> dict:
    prompts = [
        {"text": "12+7=", "id": "p0", "metadata": {"answer": 19}},
        {"input_ids": [50, 44, 51]},
        {"messages": [{"role": "user", "content": "3-1="}]},
    ]
    return {"prompts": prompts, "tree": SMALL_TREE, "sampling": {"seed": 3}, "delivery": delivery, **extra}


def _check_tree(tree: Tree, width: int = 4) -> None:
    assert len(tree.leaves) == width
    nodes = tree.node_map()
    assert all(node.parent is None or node.parent in nodes for node in tree.nodes)
    assert all(nodes[leaf].finish_reason is not None for leaf in tree.leaves)
    assert tree.stats.num_leaves == width and tree.stats.decoded_tokens > 0


def _wait_stream(service: Service, count: int, timeout_s: float = 20) -> list:
    stream = names.trees_stream(service.settings.key_prefix)
    deadline = time.monotonic() + timeout_s
    while service.redis.xlen(stream) < count:
        assert time.monotonic() < deadline, f"only {service.redis.xlen(stream)} of {count} trees arrived"
        time.sleep(0.05)
    return service.redis.xrange(stream)


def test_inline_returns_one_tree_per_prompt_in_order(service: Service) -> None:
    with service.client() as http:
        answer = http.post("/rollout_tree", json=_body())
    assert answer.status_code == 200, answer.text
    trees = RolloutTreeResponse.model_validate_json(answer.content).trees
    assert len(trees) == 3
    for tree in trees:
        _check_tree(tree)
    assert trees[0].prompt_id == "p0" and trees[0].metadata == {"answer": 19}
    assert trees[0].prompt_text == "12+7=" and trees[1].prompt_token_ids == [50, 44, 51]
    assert trees[2].prompt_text.startswith("<user>3-1=")
    assert len({tree.tree_id for tree in trees}) == 3


def test_same_seed_gives_same_trees(service: Service) -> None:
    with service.client() as http:
        first = http.post("/rollout_tree", json=_body()).json()["trees"]
        second = http.post("/rollout_tree", json=_body()).json()["trees"]
    assert [t["nodes"] for t in first] == [t["nodes"] for t in second]


def test_return_logprobs_false_drops_them(service: Service) -> None:
    with service.client() as http:
        trees = http.post("/rollout_tree", json=_body(return_logprobs=False)).json()["trees"]
    assert all(node["logprobs"] is None for tree in trees for node in tree["nodes"])


def test_stream_delivers_ndjson_lines(service: Service) -> None:
    with service.client() as http, http.stream("POST", "/rollout_tree", json=_body("stream")) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        trees = [Tree.model_validate_json(line) for line in answer.iter_lines() if line]
    assert sorted(t.prompt_id for t in trees)[-1] == "p0" and len(trees) == 3
    for tree in trees:
        _check_tree(tree)


def test_queue_accepts_and_every_tree_lands_in_the_stream(service: Service) -> None:
    with service.client() as http:
        answer = http.post("/rollout_tree", json=_body("queue"))
    assert answer.status_code == 202, answer.text
    accepted = RolloutAccepted.model_validate_json(answer.content)
    assert accepted.stream == names.trees_stream(service.settings.key_prefix)
    entries = _wait_stream(service, 3)
    trees = [Tree.model_validate_json(fields[names.TREE_FIELD]) for _, fields in entries]
    assert sorted(t.tree_id for t in trees) == sorted(accepted.tree_ids)
    for tree in trees:
        _check_tree(tree)
    with service.client() as http:  # each is also kept for GET /trees/{id}
        kept = Tree.model_validate_json(http.get(f"/trees/{trees[0].tree_id}").content)
    assert kept == trees[0]
    ttl = service.redis.ttl(names.tree_key(trees[0].tree_id, service.settings.key_prefix))
    assert 0 < ttl <= service.settings.tree_ttl_s


def test_idempotent_queue_request_enqueues_once(service: Service) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    with service.client() as http:
        first = http.post("/rollout_tree", json=_body("queue"), headers=headers)
        again = http.post("/rollout_tree", json=_body("queue"), headers=headers)
        assert first.status_code == again.status_code == 202
        assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
        _wait_stream(service, 3)
        time.sleep(0.3)
        assert service.redis.xlen(names.trees_stream(service.settings.key_prefix)) == 3
        changed = http.post("/rollout_tree", json=_body("queue", return_logprobs=False), headers=headers)
    assert changed.status_code == 422 and "different request body" in changed.json()["detail"]


def test_idempotent_inline_request_replays_the_trees(service: Service) -> None:
    headers = {"Idempotency-Key": "inline-1"}
    with service.client() as http:
        first = http.post("/rollout_tree", json=_body(), headers=headers)
        again = http.post("/rollout_tree", json=_body(), headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert len(service.engine.requests) > 0
    calls = len(service.engine.requests)
    with service.client() as http:
        http.post("/rollout_tree", json=_body(), headers=headers)
    assert len(service.engine.requests) == calls, "a replay must not sample again"


def test_get_tree_and_unknown_tree(service: Service) -> None:
    with service.client() as http:
        tree = http.post("/rollout_tree", json=_body()).json()["trees"][0]
        assert http.get(f"/trees/{tree['tree_id']}").json() == tree
        missing = http.get("/trees/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]


def test_requests_of_several_trees_are_in_flight_together(make_service) -> None:
    """Concurrent prompts reach the engine together: every path's segment is its own request in flight."""
    service = make_service(scripted_latency_s=0.01)
    with service.client() as http:
        body = {"prompts": [{"text": f"{i}+1="} for i in range(6)], "tree": SMALL_TREE}
        assert http.post("/rollout_tree", json=body).status_code == 200
    assert service.engine.peak_in_flight >= 6 * SMALL_TREE["branch"]
