"""Every Redis key and stream name of the system, under one colon namespace (default prefix `treepo`)."""

from __future__ import annotations

DEFAULT_PREFIX = "treepo"
DEFAULT_GROUP = "trainer"  # the trainer's consumer group; the service's queue depth counts it
TREE_FIELD = "tree"  # stream entry field holding Tree.model_dump_json()
FAILURE_FIELD = "failure"  # failures-stream entry field holding a JSON error record


def trees_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Completed trees, one XADD per tree."""
    return f"{prefix}:trees"


def failures_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Error records for accepted trees that could not be sampled: nothing accepted vanishes."""
    return f"{prefix}:failures"


def tree_key(tree_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """A recent tree kept for GET /trees/{id} (with a TTL)."""
    return f"{prefix}:tree:{tree_id}"


def idempotency_key(key: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:idem:{key}"


def trained_ledger(group: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Set of tree ids a consumer group has trained on: redelivery never trains a tree twice."""
    return f"{prefix}:trained:{group}"


def rewards_key(tree_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Leaf rewards the trainer reports back, so the tree viewer can colour leaves."""
    return f"{prefix}:rewards:{tree_id}"
