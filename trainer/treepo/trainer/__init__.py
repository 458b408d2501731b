"""treepo-trainer: TreePO training from trajectory trees pulled off the Redis stream."""
