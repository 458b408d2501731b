"""The pushed weight file names tied embeddings the way SGLang loads them (defect: lm_head-only files)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from treepo.service.tinymodel import default_model_path
from treepo.trainer.weights import policy_tensors


def test_tied_model_is_written_under_the_embedding_name(tmp_path) -> None:
    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    assert model.config.tie_word_embeddings
    tensors = policy_tensors(model)
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reloaded = load_file(str(tmp_path / "model.safetensors"))
    state = model.state_dict()
    assert set(reloaded) == set(state) - {"lm_head.weight"}
    assert all(torch.equal(reloaded[name], state[name]) for name in reloaded)


def test_untied_model_keeps_both_matrices() -> None:
    config = Qwen2Config(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    assert set(policy_tensors(model)) == set(model.state_dict())
