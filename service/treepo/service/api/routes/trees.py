"""GET /trees/{id} (recent trees kept in Redis with a TTL) and its HTML/SVG view."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from treepo.client.schema import ErrorBody, Tree
from treepo.service.api.deps import QueueDep
from treepo.service.api.errors import ApiError
from treepo.service.api.routes import json_error
from treepo.service.viewer import render_tree_page

router = APIRouter(prefix="/trees", tags=["trees"])
_NOT_FOUND: dict[int | str, dict] = {404: {"model": ErrorBody, "description": "unknown or expired tree id"}}
_VIEW_NOT_FOUND: dict[int | str, dict] = {404: json_error("unknown or expired tree id")}  # JSON, not HTML


async def _load(queue: QueueDep, tree_id: str) -> Tree:
    tree = await queue.get_tree(tree_id)
    if tree is None:
        raise ApiError(404, f"no tree {tree_id!r}: unknown, or older than the service's tree TTL")
    return tree


@router.get("/{tree_id}", response_model=Tree, responses=_NOT_FOUND)
async def get_tree(tree_id: str, queue: QueueDep) -> Tree:
    """A recently sampled tree, whatever its delivery."""
    return await _load(queue, tree_id)


@router.get("/{tree_id}/view", response_class=HTMLResponse, responses=_VIEW_NOT_FOUND)
async def view_tree(tree_id: str, queue: QueueDep) -> HTMLResponse:
    """An HTML page drawing the tree: segments, shared prefixes, finish reasons, and leaf rewards if known."""
    tree = await _load(queue, tree_id)
    return HTMLResponse(render_tree_page(tree, await queue.rewards(tree_id)))
