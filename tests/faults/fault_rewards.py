"""The fault tests' reward plugin (`fault_rewards:coin_reward`, imported by `treepo train` subprocesses)."""

from __future__ import annotations

import zlib


def coin_reward(response_text: str, metadata: dict) -> float:
    """A deterministic +-1 reward of the scripted engine's random text (leaves of a tree differ)."""
    return 1.0 if zlib.crc32(response_text.encode()) % 2 else -1.0
