"""Inference engines behind the `Engine` protocol."""

from treepo.service.engine.protocol import Engine, GenerateOutput, GenerateRequest

__all__ = ["Engine", "GenerateOutput", "GenerateRequest"]
