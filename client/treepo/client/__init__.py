"""treepo-client: the wire schema and HTTP clients of the TreePO rollout service."""

from treepo.client.client import AsyncTreePOClient, RetryPolicy, TreePOClient, TreePOError
from treepo.client.schema import (
    ChatMessage,
    Node,
    Prompt,
    RolloutAccepted,
    RolloutTreeRequest,
    RolloutTreeResponse,
    SamplingParams,
    Tree,
    TreeParams,
    TreeStats,
    WeightsInfo,
)

__all__ = [
    "AsyncTreePOClient",
    "ChatMessage",
    "Node",
    "Prompt",
    "RetryPolicy",
    "RolloutAccepted",
    "RolloutTreeRequest",
    "RolloutTreeResponse",
    "SamplingParams",
    "Tree",
    "TreePOClient",
    "TreePOError",
    "TreeParams",
    "TreeStats",
    "WeightsInfo",
]
