"""Policy: per-token log-probs of right-padded (prompt, response) batches equal a per-row forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from treepo.trainer.policy import Policy


def tiny_policy(seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return Policy(Qwen2ForCausalLM(config).eval(), pad_token_id=0)


def reference_logprobs(policy: Policy, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = policy.model(input_ids=ids).logits[0]  # (L, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return torch.stack([logprobs[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)])


def test_matches_unpadded_forward_per_row() -> None:
    policy = tiny_policy()
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    responses = [[14, 15], [16, 17, 18, 19], [20]]
    with torch.no_grad():
        logprobs, mask = policy.per_token_logprobs(prompts, responses)
    assert logprobs.shape == mask.shape == (3, 4)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        expected = reference_logprobs(policy, prompt, response)
        torch.testing.assert_close(logprobs[i, : len(response)], expected, atol=1e-5, rtol=1e-5)
        assert torch.all(logprobs[i, len(response) :] == 0)


def test_gradient_ascent_raises_response_logprobs() -> None:
    policy = tiny_policy(1)
    prompts, responses = [[3, 4], [5, 6, 7]], [[8, 9, 10], [11, 12]]
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)
    before, mask = policy.per_token_logprobs(prompts, responses)
    (-(before * mask).sum() / mask.sum()).backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = policy.per_token_logprobs(prompts, responses)
    assert (after * mask).sum() > (before.detach() * mask).sum()


@pytest.mark.parametrize(
    ("prompts", "responses", "message"),
    [([[1]], [[2], [3]], "as many prompts"), ([], [], "as many prompts"), ([[]], [[2]], "empty prompt")],
)
def test_bad_batches_raise_clear_errors(prompts, responses, message) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_policy().per_token_logprobs(prompts, responses)
