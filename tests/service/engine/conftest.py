"""A tiny random Qwen2 saved to disk, so engine tests load a model by path like production does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

EOS = 1
VOCAB = 64


def save_tiny_qwen2(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Random-init Qwen2 (vocab 64) with a wide init so greedy argmaxes are far from ties."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=0, bos_token_id=2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different random weights (for update_weights)."""
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-b"), seed=1)


@pytest.fixture(scope="session")
def reference_model(tiny_model_path: Path):
    """The same checkpoint loaded plainly through transformers: the ground truth."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
