"""treepo-service: TreePO tree sampling as a service."""
