"""sample_next: greedy, filters, seeded reproducibility, and logprobs of the unmodified distribution."""

from __future__ import annotations

import pytest
import torch

from treepo.service.engine.token_sampling import SamplingBatch, sample_next

VOCAB = 6
LOGITS = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0001]))


def batch_of(n: int, *, temperature=1.0, top_p=1.0, top_k=-1, seeds=None) -> SamplingBatch:
    return SamplingBatch.build(
        [temperature] * n,
        [top_p] * n,
        [top_k] * n,
        seeds or list(range(n)),
        max_steps=20,
        vocab_size=VOCAB,
        device=torch.device("cpu"),
    )


def draw(n: int, **kwargs) -> torch.Tensor:
    tokens, _ = sample_next(LOGITS.expand(n, VOCAB).clone(), batch_of(n, **kwargs))
    return tokens


class TestSampleNext:
    def test_greedy_is_argmax(self):
        assert draw(5, temperature=0.0).tolist() == [0] * 5

    @pytest.mark.parametrize(
        ("kwargs", "allowed"),
        [
            ({"top_k": 1}, {0}),
            ({"top_k": 2}, {0, 1}),
            ({"top_p": 0.5}, {0, 1}),  # 0.4 < 0.5, so the second token is still needed
            ({"top_p": 0.3}, {0}),
            ({"top_p": 0.9, "top_k": 2}, {0, 1}),
            ({}, set(range(VOCAB))),
        ],
    )
    def test_filters_restrict_the_support(self, kwargs, allowed):
        tokens = set(draw(2000, **kwargs).tolist())
        assert tokens <= allowed
        assert {t for t in allowed if LOGITS[t].exp() >= 0.05} <= tokens  # the likely ones all appear

    def test_frequencies_follow_the_distribution(self):
        counts = torch.bincount(draw(4000), minlength=VOCAB).float() / 4000
        torch.testing.assert_close(counts[:5], LOGITS.exp()[:5], atol=0.03, rtol=0)

    def test_low_temperature_sharpens(self):
        assert (draw(500, temperature=0.05) == 0).float().mean() > 0.95

    def test_same_seed_same_tokens_whatever_the_batch(self):
        for seed in range(20):
            alone = sample_next(LOGITS[None].clone(), batch_of(1, seeds=[seed]))[0]
            mixed = sample_next(LOGITS.expand(3, VOCAB).clone(), batch_of(3, seeds=[7, seed, 9]))[0]
            assert mixed[1].item() == alone.item()
        a = batch_of(1, seeds=[5])
        b = batch_of(1, seeds=[5])
        seq_a = [sample_next(LOGITS[None].clone(), a)[0].item() for _ in range(20)]
        seq_b = [sample_next(LOGITS[None].clone(), b)[0].item() for _ in range(20)]
        assert seq_a == seq_b and len(set(seq_a)) > 1

    def test_logprobs_are_of_the_unmodified_distribution(self):
        tokens, logprobs = sample_next(
            LOGITS.expand(50, VOCAB).clone(), batch_of(50, temperature=0.3, top_k=2)
        )
        torch.testing.assert_close(logprobs, torch.log_softmax(LOGITS, -1)[tokens])

    def test_select_keeps_rows_and_their_uniforms(self):
        batch = batch_of(3, temperature=0.5, seeds=[1, 2, 3])
        picked = batch.select(torch.tensor([2, 0]))
        assert picked.temperature.tolist() == [0.5, 0.5]
        assert torch.equal(picked.uniforms, batch.uniforms[[2, 0]])

    def test_greedy_rows_stay_greedy_in_a_sampled_batch(self):
        batch = SamplingBatch.build(
            [0.0, 1.0],
            [1.0, 1.0],
            [-1, -1],
            [1, 2],
            max_steps=50,
            vocab_size=VOCAB,
            device=torch.device("cpu"),
        )
        greedy_row = [sample_next(LOGITS.expand(2, VOCAB).clone(), batch)[0][0].item() for _ in range(50)]
        assert greedy_row == [0] * 50
