"""The tree under construction: node records, live paths, leaves and the per-tree counters."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from treepo.client.schema import FinishReason, Node, SamplingParams, Tree, TreeStats
from treepo.service.engine.protocol import GenerateOutput, GenerateRequest
from treepo.service.sampler.budget import PathScore
from treepo.service.sampler.rules import StopRules, first_stop_index


def derive_seed(base_seed: int, label: str) -> int:
    """A request seed from (tree seed, path label): siblings differ, reruns repeat."""
    digest = hashlib.blake2b(f"{base_seed}:{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2  # 62 bits: fits every engine's int64 seed


def make_request(
    sampling: SamplingParams,
    input_ids: list[int],
    max_new_tokens: int,
    base_seed: int,
    label: str,
    priority: int = 0,
    segment_seeds: tuple[int, ...] = (),
    segment_tokens: int = 0,
    keep_cached: bool = False,
) -> GenerateRequest:
    """One engine request of a tree or of the sequential baseline, seeded from (tree seed, path label)."""
    return GenerateRequest(
        input_ids=input_ids,
        max_new_tokens=max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=derive_seed(base_seed, label),
        stop_token_ids=tuple(sampling.stop_token_ids),
        priority=priority,
        keep_cached=keep_cached,
        segment_seeds=segment_seeds,
        segment_tokens=segment_tokens,
    )


Outcome = tuple[list[int], list[float], str, FinishReason | None]  # a segment: tokens, logprobs, text, reason


@dataclass(slots=True)
class NodeRecord:
    id: str
    parent: str | None
    depth: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    policy_version: int
    finish_reason: FinishReason | None = None


@dataclass(slots=True)
class Path:
    """A live trajectory: the node it hangs from (None = the prompt) and what it has decoded so far."""

    node_id: str | None
    depth: int
    response_ids: list[int] = field(default_factory=list)
    path_logprob: float = 0.0
    last_mean_logprob: float = 0.0

    def score(self) -> PathScore:
        return PathScore(self.last_mean_logprob, self.path_logprob, len(self.response_ids))


@dataclass(slots=True)
class Counts:
    """The per-tree counters, kept as plain ints while the tree grows (a pydantic model's attribute
    assignment runs Python per write: three writes per segment); `TreeStats` is built once at the end."""

    decoded_tokens: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    num_fallbacks: int = 0

    def add(self, decoded: int, output: GenerateOutput) -> None:
        self.decoded_tokens += decoded
        self.prefill_tokens += output.prefill_tokens
        self.cached_tokens += output.cached_tokens


@dataclass(slots=True)
class TreeBuilder:
    """Grows nodes from engine outputs and classifies each new segment with the stop rules."""

    prompt_ids: list[int]
    rules: StopRules
    decode: Callable[[list[int]], str]
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    children: dict[str | None, list[str]] = field(default_factory=dict)
    leaves: list[str] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    num_requests: int = 0  # engine requests sent for this tree
    priority: int = 0  # of its engine requests: the tree's start order (older trees first)
    started: float = field(default_factory=time.perf_counter)

    @property
    def num_leaves(self) -> int:
        return len(self.leaves)

    def grow(
        self, path: Path, label: str, output: GenerateOutput, outcome: Outcome | None = None
    ) -> tuple[Path, FinishReason | None]:
        """Add the node `label` under `path` from an engine output (and its `outcome`, if already known);
        return the new path and its finish reason."""
        tokens, logprobs, text, reason = outcome or self.outcome(path, output)
        depth = path.depth + 1
        self._add(NodeRecord(label, path.node_id, depth, tokens, logprobs, text, output.policy_version))
        self.counts.add(len(tokens), output)
        child = Path(
            node_id=label,
            depth=depth,
            response_ids=path.response_ids + tokens,
            path_logprob=path.path_logprob + sum(logprobs),
            last_mean_logprob=sum(logprobs) / len(logprobs) if logprobs else 0.0,
        )
        if reason is not None:
            self.nodes[label].finish_reason = reason
            self.leaves.append(label)
        return child, reason

    def outcome(self, path: Path, output: GenerateOutput) -> Outcome:
        """The segment `output` adds to `path` (clipped), its text and its finish reason (None: it lives on)."""
        tokens, logprobs = self.clip(path, output)
        text = self.decode(tokens)
        reason = self.rules.classify(tokens, text, len(path.response_ids) + len(tokens), path.depth + 1)
        return tokens, logprobs, text, reason

    def clip(self, path: Path, output: GenerateOutput) -> tuple[list[int], list[float]]:
        """Cut the segment after its first stop token and at the length limit (as the release)."""
        tokens = list(output.output_ids)
        stop = first_stop_index(tokens, self.rules.stop_ids)
        end = min(
            len(tokens) if stop is None else stop + 1, self.rules.max_new_tokens - len(path.response_ids)
        )
        return tokens[:end], list(output.logprobs[:end])

    def add_chain(self, index: int, output: GenerateOutput, chunk: int, reason: FinishReason) -> None:
        """One whole trajectory (sequential baseline) as a chain of `chunk`-token nodes "<j>-<index>"."""
        tokens, logprobs = self.clip(Path(None, 0), output)
        self.counts.add(len(tokens), output)
        parent: str | None = None
        for depth, start in enumerate(range(0, max(len(tokens), 1), chunk), start=1):
            part = tokens[start : start + chunk]
            node = NodeRecord(f"{depth}-{index}", parent, depth, part, logprobs[start : start + chunk],
                              self.decode(part), output.policy_version)  # fmt: skip
            self._add(node)
            parent = node.id
        assert parent is not None
        self.nodes[parent].finish_reason = reason
        self.leaves.append(parent)

    def _add(self, node: NodeRecord) -> None:
        assert node.id not in self.nodes, f"duplicate node id {node.id=}"
        self.nodes[node.id] = node
        self.children.setdefault(node.parent, []).append(node.id)

    # Fallback support

    def path_nodes(self, node_id: str | None) -> list[NodeRecord]:
        """Nodes from the root's child down to `node_id`."""
        path: list[NodeRecord] = []
        while node_id is not None:
            path.append(self.nodes[node_id])
            node_id = path[-1].parent
        return path[::-1]

    def path_to(self, node_id: str | None) -> Path:
        """A live path that continues after node `node_id` (None = from the prompt)."""
        nodes = self.path_nodes(node_id)
        last = nodes[-1].logprobs if nodes else []
        return Path(
            node_id=node_id,
            depth=len(nodes),
            response_ids=[t for node in nodes for t in node.token_ids],
            path_logprob=sum(lp for node in nodes for lp in node.logprobs),
            last_mean_logprob=sum(last) / len(last) if last else 0.0,
        )

    def split(self, node_id: str, offset: int) -> str:
        """Split a node at `offset` tokens; returns the head, which keeps the id.

        A new tail node "<id>.<offset>" takes the rest, the old children and the finish reason; the tail's
        subtree moves one level down.
        """
        head = self.nodes[node_id]
        assert 0 < offset < len(head.token_ids), f"{offset=} {len(head.token_ids)=}"
        tail = NodeRecord(
            id=f"{node_id}.{offset}",
            parent=node_id,
            depth=head.depth + 1,
            token_ids=head.token_ids[offset:],
            logprobs=head.logprobs[offset:],
            text=self.decode(head.token_ids[offset:]),
            policy_version=head.policy_version,
            finish_reason=head.finish_reason,
        )
        head.token_ids, head.logprobs = head.token_ids[:offset], head.logprobs[:offset]
        head.text, head.finish_reason = self.decode(head.token_ids), None
        moved = self.children.pop(node_id, [])
        self._add(tail)
        self.children[tail.id] = moved
        for child in moved:
            self.nodes[child].parent = tail.id
        self._deepen(moved)
        if tail.finish_reason is not None:
            self.leaves[self.leaves.index(node_id)] = tail.id
        return node_id

    def _deepen(self, node_ids: list[str]) -> None:
        stack = list(node_ids)
        while stack:
            node = self.nodes[stack.pop()]
            node.depth += 1
            stack.extend(self.children.get(node.id, []))

    # Output

    def to_tree(
        self,
        *,
        tree_id: str,
        prompt_id: str,
        policy_version: int,
        metadata: dict,
        prompt_text: str,
        return_logprobs: bool,
    ) -> Tree:
        """The wire `Tree`, with the stats filled in."""
        stats = TreeStats(
            num_nodes=len(self.nodes),
            num_leaves=len(self.leaves),
            decoded_tokens=self.counts.decoded_tokens,
            independent_tokens=sum(len(n.token_ids) for leaf in self.leaves for n in self.path_nodes(leaf)),
            prefill_tokens=self.counts.prefill_tokens,
            cached_tokens=self.counts.cached_tokens,
            engine_calls=self.num_requests,
            num_fallbacks=self.counts.num_fallbacks,
            finish_reasons=dict(Counter(self.nodes[leaf].finish_reason or "" for leaf in self.leaves)),
            wall_s=time.perf_counter() - self.started,
        )
        nodes = [
            Node(
                id=n.id,
                parent=n.parent,
                depth=n.depth,
                token_ids=n.token_ids,
                logprobs=n.logprobs if return_logprobs else None,
                text=n.text,
                finish_reason=n.finish_reason,
                policy_version=n.policy_version,
            )
            for n in sorted(self.nodes.values(), key=lambda n: n.depth)  # parents before children
        ]
        return Tree(
            tree_id=tree_id,
            prompt_id=prompt_id,
            policy_version=policy_version,
            metadata=metadata,
            prompt_token_ids=list(self.prompt_ids),
            prompt_text=prompt_text,
            nodes=nodes,
            leaves=list(self.leaves),
            stats=stats,
        )
