"""The TreePO tree sampler (TREEPO.md §1): pure logic over the Engine protocol, no HTTP or Redis inside."""

from treepo.service.sampler.tree import TreeSampler

__all__ = ["TreeSampler"]
