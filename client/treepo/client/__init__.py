"""treepo-client: the wire schema and HTTP clients of the TreePO rollout service."""

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
    "ChatMessage",
    "Node",
    "Prompt",
    "RolloutAccepted",
    "RolloutTreeRequest",
    "RolloutTreeResponse",
    "SamplingParams",
    "Tree",
    "TreeParams",
    "TreeStats",
    "WeightsInfo",
]
