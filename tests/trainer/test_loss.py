"""DAPO loss: hand-computed values for every clip regime, aggregation modes, gradient signs."""

from __future__ import annotations

import math

import pytest
import torch

from treepo.trainer.loss import aggregate_loss, dapo_policy_loss


def _one_token(ratio: float, advantage: float, **kwargs):
    """A (1, 1) batch with the given ratio; returns (loss, metrics, grad of the new logprob)."""
    logprobs = torch.tensor([[math.log(ratio) - 1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    loss, metrics = dapo_policy_loss(
        logprobs, old, torch.tensor([[advantage]], dtype=torch.float64), torch.ones(1, 1), **kwargs
    )
    loss.backward()
    return loss.item(), metrics, logprobs.grad.item()


# (ratio, advantage, expected loss, gradient is zero, which clip)
CASES = [
    (1.1, 2.0, -2.2, False, None),  # inside the trust region: -A * rho
    (1.5, 2.0, -2.0 * 1.28, True, "clip_frac_high"),  # A > 0, rho above 1 + eps_high
    (0.5, 2.0, -1.0, False, None),  # A > 0, rho below 1 - eps_low: unclipped (pessimistic max)
    (0.5, -2.0, 2.0 * 0.8, True, "clip_frac_low"),  # A < 0, rho below 1 - eps_low
    (1.5, -2.0, 3.0, False, None),  # A < 0, rho above 1 + eps_high: unclipped
    (20.0, -2.0, 20.0, True, "dual_clip_frac"),  # A < 0, rho above c: dual clip -A * c
    (20.0, 2.0, -2.0 * 1.28, True, "clip_frac_high"),  # A > 0: no dual clip
]


class TestDapoPolicyLoss:
    @pytest.mark.parametrize(("ratio", "advantage", "expected", "is_flat", "clip"), CASES)
    def test_single_token_regimes(self, ratio, advantage, expected, is_flat, clip):
        loss, metrics, grad = _one_token(ratio, advantage)
        assert loss == pytest.approx(expected, rel=1e-9)
        if is_flat:
            assert grad == 0.0
        else:
            # d(-A rho)/d logp = -A rho: descending raises logp when A > 0, lowers it when A < 0
            assert grad == pytest.approx(-advantage * ratio, rel=1e-9)
        for name in ("clip_frac_low", "clip_frac_high", "dual_clip_frac"):
            assert metrics[name] == (1.0 if name == clip else 0.0)

    def test_gradient_signs_follow_advantages(self):
        logprobs = torch.full((2, 3), -1.0, requires_grad=True)
        advantages = torch.tensor([1.0, -1.0])  # (B,) broadcast over tokens
        loss, metrics = dapo_policy_loss(logprobs, logprobs.detach().clone(), advantages, torch.ones(2, 3))
        loss.backward()
        assert torch.all(logprobs.grad[0] < 0)  # gradient descent raises the good sequence's logprobs
        assert torch.all(logprobs.grad[1] > 0)
        assert metrics["ratio_mean"] == pytest.approx(1.0)
        assert metrics["approx_kl"] == pytest.approx(0.0)
        assert metrics["clip_frac"] == 0.0

    def test_token_mean_ignores_padding_and_weighs_tokens_equally(self):
        logprobs = torch.zeros(2, 4, requires_grad=True)
        advantages = torch.tensor([[1.0, 1.0, 1.0, 5.0], [-1.0, 9.0, 9.0, 9.0]])
        mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
        loss, _ = dapo_policy_loss(logprobs, torch.zeros(2, 4), advantages, mask)
        assert loss.item() == pytest.approx(-(1 + 1 + 1 - 1) / 4)
        loss.backward()
        assert torch.all(logprobs.grad[mask == 0] == 0)

    def test_num_tokens_rescales_for_gradient_accumulation(self):
        logprobs = torch.zeros(1, 2)
        loss, _ = dapo_policy_loss(logprobs, logprobs, torch.ones(1, 2), torch.ones(1, 2), num_tokens=8)
        assert loss.item() == pytest.approx(-2 / 8)

    def test_metrics_fractions_over_valid_tokens(self):
        old = torch.zeros(1, 4)
        logprobs = torch.log(torch.tensor([[1.5, 1.0, 0.5, 3.0]]))
        advantages = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
        mask = torch.tensor([[1, 1, 1, 0]])
        _, metrics = dapo_policy_loss(logprobs, old, advantages, mask)
        assert metrics["clip_frac_high"] == pytest.approx(1 / 3)
        assert metrics["clip_frac_low"] == pytest.approx(1 / 3)
        assert metrics["clip_frac"] == pytest.approx(2 / 3)
        assert metrics["ratio_max"] == pytest.approx(1.5)
        assert metrics["ratio_mean"] == pytest.approx(1.0)

    def test_kl_and_entropy_terms_are_opt_in(self):
        logprobs = torch.zeros(1, 2)
        ref = torch.full((1, 2), -1.0)
        entropy = torch.full((1, 2), 2.0)
        args = (logprobs, logprobs, torch.zeros(1, 2), torch.ones(1, 2))
        base, _ = dapo_policy_loss(*args, ref_per_token_logprobs=ref, per_token_entropy=entropy)
        assert base.item() == 0.0
        with_kl, _ = dapo_policy_loss(*args, ref_per_token_logprobs=ref, kl_coef=0.5)
        assert with_kl.item() == pytest.approx(0.5 * (math.exp(-1) + 1 - 1))
        with_entropy, _ = dapo_policy_loss(*args, per_token_entropy=entropy, entropy_coef=0.1)
        assert with_entropy.item() == pytest.approx(-0.2)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"epsilon_low": 1.0}, "epsilon_low"),
            ({"epsilon_high": -0.1}, "epsilon_high"),
            ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
            ({"loss_agg_mode": "sum"}, "token-mean, seq-mean-token-mean"),
        ],
    )
    def test_bad_options_are_clear_errors(self, kwargs, message):
        x = torch.zeros(1, 2)
        with pytest.raises(ValueError, match=message):
            dapo_policy_loss(x, x, x, torch.ones(1, 2), **kwargs)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="share one"):
            dapo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 2))


class TestAggregateLoss:
    LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])

    @pytest.mark.parametrize(
        ("mode", "expected"),
        [
            ("token-mean", (1 + 2 + 3 + 4) / 4),
            ("seq-mean-token-mean", (2.0 + 4.0) / 2),  # empty rows are left out
            ("seq-mean-token-sum", (6.0 + 4.0) / 2),
        ],
    )
    def test_modes(self, mode, expected):
        assert aggregate_loss(self.LOSS, self.MASK, mode).item() == pytest.approx(expected)

    def test_unknown_mode(self):
        with pytest.raises(ValueError, match="Unknown loss_agg_mode"):
            aggregate_loss(self.LOSS, self.MASK, "mean")  # type: ignore[arg-type]
