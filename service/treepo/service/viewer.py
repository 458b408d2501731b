"""GET /trees/{id}/view: a self-contained HTML page with an inline SVG drawing of one tree.

Segments are boxes laid out left to right by depth (the prompt on the left); siblings share the box of their
common prefix; leaves show their finish reason and, once the trainer reported it, their reward.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from html import escape

from treepo.client.schema import Node, Tree

BOX_W, BOX_H, COL_GAP, ROW_H, PAD = 240, 74, 56, 92, 20
CHARS_PER_LINE, MAX_LINES = 34, 4
FINISH_COLOURS = {
    "answer": "#2e7d32",
    "eos": "#1565c0",
    "max_tokens": "#ef6c00",
    "max_depth": "#6a1b9a",
    "repetition": "#c62828",
}
ROOT = "__prompt__"


@dataclass(slots=True)
class _Box:
    node_id: str
    x: float
    y: float
    num_leaves: int


def render_tree_page(tree: Tree, rewards: dict[str, float] | None = None) -> str:
    """The whole page: a header with the tree's stats, the SVG drawing, and a table of trajectories."""
    rewards = rewards or {}
    svg = render_tree_svg(tree, rewards)
    rows = "".join(_trajectory_row(tree, leaf, rewards) for leaf in tree.leaves)
    stats = tree.stats
    summary = (
        f"{stats.num_leaves} trajectories · {stats.num_nodes} segments · "
        f"{stats.decoded_tokens} tokens decoded "
        f"(independent sampling: {stats.independent_tokens}) · {stats.engine_calls} engine calls · "
        f"{stats.wall_s:.2f} s"
    )
    return _PAGE.format(
        title=escape(f"tree {tree.tree_id}"),
        tree_id=escape(tree.tree_id),
        prompt_id=escape(tree.prompt_id),
        version=tree.policy_version,
        summary=escape(summary),
        legend=_legend(),
        svg=svg,
        rows=rows,
    )


def render_tree_svg(tree: Tree, rewards: dict[str, float]) -> str:
    """Inline SVG: one box per segment, edges from each parent to its children."""
    boxes, children = _layout(tree)
    nodes = tree.node_map()
    width = max(b.x for b in boxes.values()) + BOX_W + 2 * PAD
    height = max(b.y for b in boxes.values()) + BOX_H + 2 * PAD
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="tree {escape(tree.tree_id)}">'
    ]
    for parent_id, kids in children.items():
        for kid in kids:
            parts.append(_edge(boxes[parent_id], boxes[kid]))
    parts.append(
        _box(
            boxes[ROOT],
            "prompt",
            tree.prompt_text or f"{len(tree.prompt_token_ids)} prompt tokens",
            "#455a64",
            "#eceff1",
        )
    )
    for node_id, box in boxes.items():
        if node_id != ROOT:
            parts.append(_node_box(nodes[node_id], box, tree.policy_version, rewards.get(node_id)))
    parts.append("</svg>")
    return "\n".join(parts)


def _layout(tree: Tree) -> tuple[dict[str, _Box], dict[str, list[str]]]:
    """x by depth; leaves on consecutive rows in depth-first order; a parent centred on its children."""
    children: dict[str, list[str]] = {ROOT: []}
    for node in tree.nodes:
        children.setdefault(node.parent or ROOT, []).append(node.id)
    boxes: dict[str, _Box] = {}
    next_row = 0
    # Iterative post-order (a recursive walk hits Python's recursion limit on trees ~500 segments deep).
    stack: list[tuple[str, int, bool]] = [(ROOT, 0, False)]
    while stack:
        node_id, depth, expanded = stack.pop()
        kids = children.get(node_id, [])
        if kids and not expanded:
            stack.append((node_id, depth, True))
            stack.extend((kid, depth + 1, False) for kid in reversed(kids))
            continue
        x = PAD + depth * (BOX_W + COL_GAP)
        if kids:
            first, last = boxes[kids[0]], boxes[kids[-1]]
            boxes[node_id] = _Box(node_id, x, (first.y + last.y) / 2, sum(boxes[k].num_leaves for k in kids))
        else:
            boxes[node_id] = _Box(node_id, x, PAD + next_row * ROW_H, 1)
            next_row += 1
    return boxes, children


def _node_box(node: Node, box: _Box, tree_version: int, reward: float | None) -> str:
    if node.finish_reason is None:
        label = f"{node.id} · {len(node.token_ids)} tok"
        if box.num_leaves > 1:
            label += f" · shared by {box.num_leaves}"
        stroke, fill = "#90a4ae", "#ffffff"
    else:
        label = f"{node.id} · {len(node.token_ids)} tok · {node.finish_reason}"
        stroke = FINISH_COLOURS.get(node.finish_reason, "#607d8b")
        fill = "#ffffff" if reward is None else "#dff5e3" if reward > 0 else "#fbe0e2"
        if reward is not None:
            label += f" · r={reward:g}"
    if node.policy_version != tree_version:
        label += f" · v{node.policy_version}"
    return _box(box, label, node.text or "(no text)", stroke, fill)


def _box(box: _Box, label: str, text: str, stroke: str, fill: str) -> str:
    lines = _wrap(text)
    tspans = "".join(
        f'<tspan x="{box.x + 8:.0f}" y="{box.y + 32 + 13 * i:.0f}">{escape(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    return (
        f'<g class="node"><title>{escape(label)}\n{escape(text)}</title>'
        f'<rect x="{box.x:.0f}" y="{box.y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}" '
        f'stroke="{stroke}" stroke-width="2"/>'
        f'<text x="{box.x + 8:.0f}" y="{box.y + 16:.0f}" class="label" fill="{stroke}">{escape(label)}</text>'
        f'<text class="seg">{tspans}</text></g>'
    )


def _edge(parent: _Box, child: _Box) -> str:
    x1, y1 = parent.x + BOX_W, parent.y + BOX_H / 2
    x2, y2 = child.x, child.y + BOX_H / 2
    mid = (x1 + x2) / 2
    return (
        f'<path d="M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} {x2:.0f},{y2:.0f}" '
        'fill="none" stroke="#b0bec5" stroke-width="2"/>'
    )


def _wrap(text: str) -> list[str]:
    visible = text.replace("\n", "⏎ ")
    lines = textwrap.wrap(visible, CHARS_PER_LINE, replace_whitespace=False, drop_whitespace=False) or [""]
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES]
        lines[-1] = lines[-1][: CHARS_PER_LINE - 1] + "…"
    return lines


def _trajectory_row(tree: Tree, leaf_id: str, rewards: dict[str, float]) -> str:
    path = tree.path(leaf_id)
    text = "".join(node.text for node in path)
    finish = path[-1].finish_reason or ""
    reward = rewards.get(leaf_id)
    reward_cell = "" if reward is None else f"{reward:g}"
    colour = FINISH_COLOURS.get(finish, "#607d8b")
    return (
        f'<tr><td>{escape(leaf_id)}</td><td style="color:{colour}">{escape(finish)}</td>'
        f"<td>{escape(reward_cell)}</td><td>{sum(len(n.token_ids) for n in path)}</td>"
        f"<td><pre>{escape(text)}</pre></td></tr>"
    )


def _legend() -> str:
    return " ".join(
        f'<span class="chip" style="border-color:{colour};color:{colour}">{escape(reason)}</span>'
        for reason, colour in FINISH_COLOURS.items()
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #263238; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }}
.meta {{ color: #546e7a; font-size: 13px; margin-bottom: 8px; }}
.chip {{ border: 1.5px solid; border-radius: 10px; padding: 1px 8px; font-size: 12px; }}
.drawing {{ overflow: auto; border: 1px solid #cfd8dc; margin: 10px 0; }}
svg .label {{ font: 600 11px system-ui, sans-serif; }}
svg .seg {{ font: 11px ui-monospace, monospace; fill: #263238; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border-bottom: 1px solid #eceff1; padding: 4px 8px; text-align: left; vertical-align: top; }}
pre {{ margin: 0; white-space: pre-wrap; font-size: 12px; }}
</style></head>
<body>
<h1>TreePO tree {tree_id}</h1>
<div class="meta">prompt {prompt_id} · policy_version {version} · {summary}</div>
<div class="meta">leaf border = finish reason: {legend} · leaf fill: green reward &gt; 0, red otherwise</div>
<div class="drawing">{svg}</div>
<h2 style="font-size:15px">Trajectories</h2>
<table><tr><th>leaf</th><th>finish</th><th>reward</th><th>tokens</th><th>response</th></tr>{rows}</table>
</body></html>
"""
