"""DAPO policy loss (TreePO Eq. 1-2, TREEPO.md §2.3): asymmetric ratio clip, dual clip, token-mean.

A pure function over per-token tensors of shape (B, T); no KL and no entropy term unless asked for.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
LOSS_AGG_MODES: tuple[LossAggMode, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps one wild token from producing inf

# Public API


def dapo_policy_loss(
    per_token_logprobs: Tensor,
    old_per_token_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    clip_ratio_c: float = 10.0,
    loss_agg_mode: LossAggMode = "token-mean",
    num_tokens: float | None = None,
    ref_per_token_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    per_token_entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss and its metrics.

    Args:
        per_token_logprobs: log pi_theta of each response token, (B, T), with grad.
        old_per_token_logprobs: log pi_old of the same tokens, (B, T) (recomputed or the sampler's).
        advantages: per-token advantages, (B, T) (or (B,) broadcast over the tokens).
        response_mask: 1 on valid response tokens, (B, T).
        clip_ratio_c: dual-clip bound for negative advantages (> 1).
        loss_agg_mode: "token-mean" (release), "seq-mean-token-mean" or "seq-mean-token-sum".
        num_tokens: token-mean denominator for gradient accumulation (the whole mini-batch's valid
            tokens); default: this call's valid tokens.
        ref_per_token_logprobs, kl_coef: optional k3 KL penalty to a reference policy (off by default).
        per_token_entropy, entropy_coef: optional entropy bonus (off by default).
    """
    _check_args(
        per_token_logprobs,
        old_per_token_logprobs,
        response_mask,
        epsilon_low,
        epsilon_high,
        clip_ratio_c,
        loss_agg_mode,
    )
    mask = response_mask.to(per_token_logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B,) -> (B, 1), broadcast over T
    advantages = advantages.to(per_token_logprobs.dtype).detach()
    log_ratio = (per_token_logprobs - old_per_token_logprobs.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)  # rho, (B, T)
    # TreePO Eq. 1 / DAPO: max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    pg_losses = torch.maximum(unclipped, clipped)
    # Dual clip: for A < 0 the loss is capped at -A * c, so a huge ratio cannot dominate.
    dual_bound = -advantages * clip_ratio_c
    is_negative = advantages < 0
    pg_losses = torch.where(is_negative, torch.minimum(pg_losses, dual_bound), pg_losses)
    loss = aggregate_loss(pg_losses, mask, loss_agg_mode, num_tokens=num_tokens)
    if ref_per_token_logprobs is not None and kl_coef != 0.0:
        kl = _k3_kl(per_token_logprobs, ref_per_token_logprobs.detach())
        loss = loss + kl_coef * aggregate_loss(kl, mask, loss_agg_mode, num_tokens=num_tokens)
    if per_token_entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * aggregate_loss(
            per_token_entropy, mask, loss_agg_mode, num_tokens=num_tokens
        )
    metrics = _metrics(log_ratio, ratio, advantages, mask, epsilon_low, epsilon_high, clip_ratio_c)
    metrics["pg_loss"] = float(aggregate_loss(pg_losses.detach(), mask, loss_agg_mode, num_tokens=num_tokens))
    return loss, metrics


def aggregate_loss(
    per_token_loss: Tensor, mask: Tensor, mode: LossAggMode = "token-mean", *, num_tokens: float | None = None
) -> Tensor:
    """Reduce a (B, T) loss to a scalar over the valid tokens.

    token-mean: sum / (valid tokens) -- every token weighs the same (DAPO);
    seq-mean-token-mean: mean over sequences of each sequence's token mean (GRPO);
    seq-mean-token-sum: mean over sequences of each sequence's token sum.
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode == "token-mean":
        denominator = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype)
        return masked.sum() / denominator.clamp(min=1.0)
    seq_tokens = mask.sum(dim=-1)  # (B,)
    has_tokens = seq_tokens > 0
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / seq_tokens.clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        per_seq = masked.sum(dim=-1)
    else:
        raise ValueError(f"Unknown loss_agg_mode {mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}")
    return per_seq[has_tokens].sum() / has_tokens.sum().clamp(min=1)


# Internal helpers


def _check_args(
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    clip_ratio_c: float,
    loss_agg_mode: str,
) -> None:
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            "per_token_logprobs, old_per_token_logprobs and response_mask must share one (B, T) shape "
            f"(got {tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)})"
        )
    if not 0.0 <= epsilon_low < 1.0 or epsilon_high < 0.0:
        raise ValueError(
            f"need 0 <= epsilon_low < 1 and epsilon_high >= 0 (got {epsilon_low}, {epsilon_high})"
        )
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (release: 10.0), got {clip_ratio_c}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"Unknown loss_agg_mode {loss_agg_mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}"
        )


def _k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    diff = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(diff) - diff - 1.0


@torch.no_grad()
def _metrics(
    log_ratio: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    clip_ratio_c: float,
) -> dict[str, float]:
    """Token-mean fractions: which clip was active, and how far the policy moved."""
    advantages = advantages.expand_as(ratio)
    valid = mask.sum().clamp(min=1.0)

    def frac(condition: Tensor) -> float:
        return float((condition.to(mask.dtype) * mask).sum() / valid)

    # A clip is active when it changes the max, i.e. the gradient of that token is zero.
    clip_low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    clip_high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    dual = (ratio > clip_ratio_c) & (advantages < 0)
    is_valid = mask > 0
    ratios = ratio[is_valid]
    return {
        "clip_frac": frac(clip_low | clip_high),
        "clip_frac_low": frac(clip_low),
        "clip_frac_high": frac(clip_high),
        "dual_clip_frac": frac(dual),
        "approx_kl": float((-log_ratio * mask).sum() / valid),  # k1 estimate of KL(old || new)
        "ratio_mean": float(ratios.mean()) if ratios.numel() else 1.0,
        "ratio_max": float(ratios.max()) if ratios.numel() else 1.0,
        "ratio_min": float(ratios.min()) if ratios.numel() else 1.0,
    }
