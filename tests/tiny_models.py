"""A tiny random Qwen2 over the scripted service's byte vocabulary, for trainer and fault tests."""

from __future__ import annotations

from pathlib import Path


def byte_model(path: Path) -> Path:
    """Save a 1-layer random Qwen2 (257 ids: the byte codec's) in `path`; seeded, so tests repeat."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path
