"""GET /trees/{id}/view: the page draws every segment; headless Chromium renders it to a non-trivial PNG."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from api_helpers import Service

from treepo.client import constants as names
from treepo.client.schema import Tree
from treepo.service.viewer import FINISH_COLOURS, render_tree_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BODY = {
    "prompts": [{"text": "12+30-7="}],
    "tree": {"width": 6, "branch": 2, "segment_tokens": 8, "max_depth": 3},
}


def _sample(service: Service) -> Tree:
    with service.client() as http:
        return Tree.model_validate(http.post("/rollout_tree", json=BODY).json()["trees"][0])


def test_view_draws_every_segment_with_rewards(service: Service) -> None:
    tree = _sample(service)
    rewarded = tree.leaves[0]
    service.redis.hset(names.rewards_key(tree.tree_id, service.settings.key_prefix), rewarded, "1.0")
    with service.client() as http:
        page = http.get(f"/trees/{tree.tree_id}/view")
        missing = http.get("/trees/none/view")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert html.count('<g class="node">') == len(tree.nodes) + 1  # + the prompt
    assert html.count("<path ") == len(tree.nodes)  # one edge per segment
    assert "12+30-7=" in html and "r=1" in html and html.count("<tr>") == len(tree.leaves) + 1
    assert missing.status_code == 404


def test_page_escapes_model_text() -> None:
    tree = Tree(
        tree_id="t",
        prompt_id="p",
        policy_version=0,
        prompt_text="<script>alert(1)</script>",
        nodes=[
            {
                "id": "1-0",
                "parent": None,
                "depth": 1,
                "token_ids": [1],
                "text": "</svg>&",
                "finish_reason": "eos",
            }
        ],
        leaves=["1-0"],
    )
    html = render_tree_page(tree)
    assert "<script>alert" not in html and "&lt;/svg&gt;&amp;" in html


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_headless_chromium_screenshot_shows_the_tree(service: Service, tmp_path: Path) -> None:
    from PIL import Image

    tree = _sample(service)
    shot = tmp_path / "tree.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
               f"{service.url}/trees/{tree.tree_id}/view"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=90)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "a blank page has a handful of colours; the tree has text, edges, boxes"
    non_white = sum(count for count, rgb in colours if rgb != (255, 255, 255))
    assert non_white > 0.03 * image.size[0] * image.size[1]
    leaf_borders = {tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in FINISH_COLOURS.values()}
    assert any(rgb in leaf_borders for _, rgb in colours), "no leaf border colour on the screenshot"
