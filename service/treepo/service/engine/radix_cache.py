"""A radix tree over token ids whose nodes own KV-cache slots: the prefix cache of the embedded engine.

Each edge holds a run of token ids (`key`) and the KV-pool slot of each of those tokens (`value`), both
tuples of ints (plain Python: a request's walk, insert and eviction run no tensor op).
A path root -> node spells a cached token sequence; its KV lives in the concatenated slots. Nodes in use by
a running batch are locked (`inc_lock_ref` locks the whole path to the root) and never evicted; unlocked
leaves are evicted least recently used first (leaves the caller holds for expected work last), and their
slots handed to `on_evict` (the pool's free list).
Eviction pops a heap of candidate leaves (pushed when a leaf appears or is unlocked; entries made stale by
a later access or lock are re-checked when popped), so it never scans the whole tree.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class TreeNode:
    """One edge of the radix tree: a run of tokens and their KV slots."""

    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(
        self, key: tuple[int, ...] = (), value: tuple[int, ...] = (), parent: TreeNode | None = None
    ):
        self.children: dict[int, TreeNode] = {}  # first token of the child's key -> child
        self.parent = parent
        self.key = key
        self.value = value  # the KV slot of each token of key
        self.lock_ref = 0
        self.last_access = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return f"TreeNode(len={len(self.key)}, lock_ref={self.lock_ref}, children={len(self.children)})"


@dataclass(slots=True)
class MatchResult:
    """The longest cached prefix of a key: its KV slots and the node where it ends (lock it while in use)."""

    indices: tuple[int, ...]  # KV slots of the matched prefix
    last_node: TreeNode

    @property
    def length(self) -> int:
        return len(self.indices)


class RadixCache:
    """Token-id radix tree with reference-counted nodes and LRU eviction (SGLang's vocabulary)."""

    def __init__(self, on_evict: Callable[[tuple[int, ...]], None] | None = None) -> None:
        self.on_evict = on_evict or (lambda slots: None)
        self._clock = itertools.count(1)
        self._tiebreak = itertools.count()
        self.reset()

    # Public API

    def reset(self) -> None:
        """Drop every node (without calling `on_evict`: the caller resets its pool too)."""
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0
        self._heap: list[tuple[int, int, TreeNode]] = []  # (last_access, tiebreak, candidate leaf)

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """Longest cached prefix of `key`; splits a node so the match ends on a node boundary."""
        now = next(self._clock)
        self.root.last_access = now
        node, _, pieces = self._walk(self.root, tuple(key), now)
        return MatchResult(indices=_join(pieces), last_node=node)

    def insert(self, key: Sequence[int], value: Sequence[int]) -> int:
        """Cache `key` with KV slots `value`; returns how many leading tokens were already cached.

        The slots `value[:returned]` are not taken by the tree: the caller still owns (and frees) them.
        """
        return self.insert_node(key, value)[0]

    def insert_node(self, key: Sequence[int], value: Sequence[int]) -> tuple[int, TreeNode]:
        """`insert`, also returning the node `key` ends at (lock it to keep the key cached)."""
        present, node, _ = self.extend(self.root, key, value)
        return present, node

    def extend(
        self, node: TreeNode, key: Sequence[int], value: Sequence[int]
    ) -> tuple[int, TreeNode, tuple[int, ...]]:
        """`insert` of `key` below `node` (a node in the tree spelling the tokens before `key`, e.g. one
        a running row has locked: no walk from the root). Returns how many leading tokens were already
        cached, the node `key` ends at, and the tree's slots of those cached tokens."""
        key = tuple(key)
        assert len(value) == len(key), f"{len(value)=} {len(key)=}"
        now = next(self._clock)
        node, pos, pieces = self._walk(node, key, now)
        if pos < len(key):
            leaf = TreeNode(key[pos:], tuple(value[pos:]), parent=node)
            leaf.last_access = now
            node.children[key[pos]] = leaf
            self._evictable += len(leaf.key)
            self._push(leaf)
            node = leaf
        return pos, node, _join(pieces)

    def touch(self, node: TreeNode) -> bool:
        """Mark the path to `node` used now, as `match_prefix` would; False if `node` left the tree."""
        if node.parent is None and node is not self.root:  # evicted (a tree loses leaves first, so an
            return False  # attached node's whole path, hence its slots, is cached)
        now = next(self._clock)
        while node is not None:
            node.last_access = now
            node = node.parent
        return True

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors from eviction (one count per user)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Release one `inc_lock_ref` of `node`."""
        while node is not self.root:
            assert node.lock_ref > 0, f"{node=} unlocked more often than locked"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
                if node.is_leaf:
                    self._push(node)
            node = node.parent

    def evict(self, num_tokens: int, hold: Callable[[TreeNode], int | None] | None = None) -> int:
        """Free >= `num_tokens` tokens of unlocked leaves, least recently used first; returns the count.

        Leaves `hold` gives a rank (the priority of work expected to continue them) go only when no other
        leaf is left, the highest rank (the newest work) first.
        """
        freed = 0
        held: dict[TreeNode, tuple[int, int, int]] = {}  # leaf set aside -> (rank, last_access, tiebreak)
        while freed < num_tokens:
            if self._heap:
                access, tiebreak, leaf = heapq.heappop(self._heap)
                if leaf.parent is None or not leaf.is_leaf or leaf.lock_ref > 0:
                    continue  # removed, grown or locked since it was pushed
                if access < leaf.last_access:
                    self._push(leaf)  # used since: back in line at its new time
                    continue
                if hold is not None and (rank := hold(leaf)) is not None:
                    held[leaf] = (rank, access, tiebreak)  # (a leaf can have several entries)
                    continue
            elif held:
                leaf = max(held, key=lambda node: (held[node][0], -held[node][1]))
                del held[leaf]
            else:
                break
            freed += self._remove_leaf(leaf)
            parent = leaf.parent
            leaf.parent = None
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0:
                self._push(parent)
        for leaf, (_, access, tiebreak) in held.items():
            heapq.heappush(self._heap, (access, tiebreak, leaf))
        if freed:
            logger.debug("evicted %d tokens", freed)
        return freed

    @property
    def evictable_size(self) -> int:
        """Tokens held by unlocked nodes."""
        return self._evictable

    @property
    def protected_size(self) -> int:
        """Tokens held by locked nodes."""
        return self._protected

    @property
    def total_size(self) -> int:
        return self._evictable + self._protected

    # Internal helpers

    def _walk(
        self, node: TreeNode, key: tuple[int, ...], now: int
    ) -> tuple[TreeNode, int, list[tuple[int, ...]]]:
        """Follow `key` down from `node` as far as it is cached, splitting the last edge where the key leaves
        it; returns the node reached, the tokens matched and the slots of each edge passed."""
        pos, pieces = 0, []
        while pos < len(key) and (child := node.children.get(key[pos])) is not None:
            shared = _shared_length(child.key, key, pos)
            if shared < len(child.key):
                child = self._split(child, shared)
            child.last_access = now
            pieces.append(child.value)
            pos += shared
            node = child
        return node, pos, pieces

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut `child`'s edge after `at` tokens; returns the new upper node (it inherits the locks)."""
        upper = TreeNode(child.key[:at], child.value[:at], parent=child.parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children[child.key[at]] = child
        child.parent.children[child.key[0]] = upper
        child.parent = upper
        child.key = child.key[at:]
        child.value = child.value[at:]
        return upper

    def _remove_leaf(self, leaf: TreeNode) -> int:
        assert leaf.is_leaf and leaf.lock_ref == 0, f"{leaf=}"
        del leaf.parent.children[leaf.key[0]]
        self._evictable -= len(leaf.key)
        self.on_evict(leaf.value)
        return len(leaf.key)

    def _push(self, leaf: TreeNode) -> None:
        heapq.heappush(self._heap, (leaf.last_access, next(self._tiebreak), leaf))
        if len(self._heap) > 4 * self.total_size + 64:  # amortised: drop entries of removed nodes
            live = {id(entry[2]): entry for entry in self._heap if entry[2].parent is not None}
            self._heap = list(live.values())  # one entry per node: at most total_size
            heapq.heapify(self._heap)


def _join(pieces: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The slots of consecutive edges as one tuple."""
    if len(pieces) > 1:
        return tuple(itertools.chain.from_iterable(pieces))
    return pieces[0] if pieces else ()


def _shared_length(edge: tuple[int, ...], key: tuple[int, ...], start: int) -> int:
    """How many tokens of `edge` match `key[start:]`."""
    if key[start : start + len(edge)] == edge:  # the common case, compared in C
        return len(edge)
    limit = min(len(edge), len(key) - start)
    n = 0
    while n < limit and edge[n] == key[start + n]:
        n += 1
    return n
