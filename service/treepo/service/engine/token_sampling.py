"""Next-token sampling for a batch with per-request temperature, top-k, top-p and seed.

The k-th new token of a request is drawn (inverse CDF) with the uniform `counter_uniforms(seed, k)`: a
counter-based generator (SplitMix64's mixing of seed + k), so a request's samples depend only on its seed
and its own logits, not on what else is in the batch, and a step computes its rows' uniforms in a few
tensor ops: a request costs no generator state and no work when it is created (it is created on the event
loop's thread, where every torch call would hand the GIL to the engine thread and wait to get it back).
The reported logprob is the sampled token's log-probability under the unmodified model distribution
(temperature 1, no filtering): the `old_per_token_logprobs` an RL trainer needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from treepo.service.engine.host_tensors import float32_tensor, int64_tensor


def as_int64(value: int) -> int:
    """An integer's low 64 bits as the int64 with the same bits (seeds and constants)."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


_GOLDEN = as_int64(0x9E3779B97F4A7C15)
_MIX1 = as_int64(0xBF58476D1CE4E5B9)
_MIX2 = as_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1), float32 (24 random bits, exact), of (seed, k) pairs: int64 tensors, same shape.

    SplitMix64 (Steele, Lea and Flood 2014) of seed + (k + 1) * golden ratio, all mod 2^64 (int64 products
    wrap around); tests check it bit for bit against Python integers."""
    x = seeds + (counters + 1) * _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 40).to(torch.float32) * 2.0**-24


@dataclass(slots=True)
class SamplingBatch:
    """Sampling parameters of the rows of a batch, as tensors on the model's device."""

    temperature: torch.Tensor  # (B,) float32; 0 = greedy
    top_p: torch.Tensor  # (B,) float32 in (0, 1]
    top_k: torch.Tensor  # (B,) int64; >= vocab size when off
    is_all_greedy: bool
    is_filtered: bool  # some row uses top-k or top-p

    @classmethod
    def from_rows(
        cls,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        top_ks: Sequence[int],
        *,
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatch:
        top_ks = [k if k >= 1 else vocab_size for k in top_ks]
        return cls(
            temperature=float32_tensor(temperatures).to(device),
            top_p=float32_tensor(top_ps).to(device),
            top_k=int64_tensor(top_ks).to(device),
            is_all_greedy=all(t == 0 for t in temperatures),
            is_filtered=any(k < vocab_size for k in top_ks) or any(p < 1 for p in top_ps),
        )


def sample_next(
    logits: torch.Tensor, batch: SamplingBatch, seeds: torch.Tensor, counters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` (B, V): row i's draw `counters[i]` of seed `seeds[i]` (int64,
    (B,) each); returns (tokens (B,), logprobs (B,))."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V), unmodified distribution
    tokens = logprobs.argmax(dim=-1)
    if not batch.is_all_greedy:
        temperature = batch.temperature.clamp(min=1e-6)[:, None]  # greedy rows are overridden below
        uniforms = counter_uniforms(seeds.to(logits.device), counters.to(logits.device))
        chosen = _draw(logprobs / temperature, batch, uniforms)
        tokens = torch.where(batch.temperature > 0, chosen, tokens)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _draw(scaled: torch.Tensor, batch: SamplingBatch, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(scaled) restricted to the top-k / top-p set of each row."""
    vocab_size = scaled.shape[-1]
    order = None
    if batch.is_filtered:
        scaled, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab_size, device=scaled.device)
        scaled = scaled.masked_fill(ranks[None, :] >= batch.top_k[:, None], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    if order is not None:
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= batch.top_p[:, None], 0.0)  # the most likely token always stays
    cdf = probs.cumsum(dim=-1)  # (B, V)
    targets = (uniforms * cdf[:, -1])[:, None]  # (B, 1)
    picks = torch.searchsorted(cdf, targets, right=True).clamp_(max=vocab_size - 1).squeeze(1)
    return picks if order is None else order.gather(1, picks[:, None]).squeeze(1)
