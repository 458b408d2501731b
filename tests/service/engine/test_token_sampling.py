"""sample_next: greedy, filters, seeded reproducibility, and logprobs of the unmodified distribution."""

from __future__ import annotations

import pytest
import torch

from treepo.service.engine.token_sampling import SamplingBatch, as_int64, counter_uniforms, sample_next

VOCAB = 6
LOGITS = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0001]))


def batch_of(n: int, *, temperature=1.0, top_p=1.0, top_k=-1) -> SamplingBatch:
    return SamplingBatch.from_rows(
        [temperature] * n, [top_p] * n, [top_k] * n, vocab_size=VOCAB, device=torch.device("cpu")
    )


def ints(values) -> torch.Tensor:
    return torch.tensor([as_int64(v) for v in values], dtype=torch.int64)


def first(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)  # every row draws its first token


def draw(n: int, **kwargs) -> torch.Tensor:
    tokens, _ = sample_next(LOGITS.expand(n, VOCAB).clone(), batch_of(n, **kwargs), ints(range(n)), first(n))
    return tokens


def splitmix64_uniform(seed: int, k: int) -> float:
    """The reference: SplitMix64 in Python integers, top 24 bits."""
    mask = 2**64 - 1
    x = (seed + (k + 1) * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return (x >> 40) / 2**24


class TestCounterUniforms:
    def test_bit_for_bit_the_python_reference(self):
        seeds = [0, 1, 7, 2**31, 2**62 + 12345, 2**63 - 1, 987654321987654321]
        counters = [0, 1, 5, 63, 1000]
        pairs = [(seed, k) for seed in seeds for k in counters]
        got = counter_uniforms(ints(seed for seed, _ in pairs), torch.tensor([k for _, k in pairs]))
        assert got.dtype == torch.float32
        assert got.tolist() == [splitmix64_uniform(seed, k) for seed, k in pairs]

    def test_uniform_in_the_unit_interval(self):
        values = counter_uniforms(torch.arange(100).repeat_interleave(100), torch.arange(100).repeat(100))
        assert values.min() >= 0 and values.max() < 1
        assert abs(values.mean().item() - 0.5) < 0.01
        assert len(set(values.tolist())) > 9900  # (seed, k) pairs do not collide in practice


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
            for k in (0, 3):
                alone = sample_next(LOGITS[None].clone(), batch_of(1), ints([seed]), torch.tensor([k]))[0]
                mixed = sample_next(
                    LOGITS.expand(3, VOCAB).clone(), batch_of(3), ints([7, seed, 9]), torch.tensor([1, k, 8])
                )[0]
                assert mixed[1].item() == alone.item()
        a, b = batch_of(1), batch_of(1)
        seq_a = [
            sample_next(LOGITS[None].clone(), a, ints([5]), torch.tensor([k]))[0].item() for k in range(20)
        ]
        seq_b = [
            sample_next(LOGITS[None].clone(), b, ints([5]), torch.tensor([k]))[0].item() for k in range(20)
        ]
        assert seq_a == seq_b and len(set(seq_a)) > 1

    def test_logprobs_are_of_the_unmodified_distribution(self):
        tokens, logprobs = sample_next(
            LOGITS.expand(50, VOCAB).clone(),
            batch_of(50, temperature=0.3, top_k=2),
            ints(range(50)),
            first(50),
        )
        torch.testing.assert_close(logprobs, torch.log_softmax(LOGITS, -1)[tokens])

    def test_greedy_rows_stay_greedy_in_a_sampled_batch(self):
        batch = SamplingBatch.from_rows(
            [0.0, 1.0], [1.0, 1.0], [-1, -1], vocab_size=VOCAB, device=torch.device("cpu")
        )
        greedy_row = [
            sample_next(LOGITS.expand(2, VOCAB).clone(), batch, ints([1, 2]), torch.tensor([k, k]))[0][
                0
            ].item()
            for k in range(50)
        ]
        assert greedy_row == [0] * 50
