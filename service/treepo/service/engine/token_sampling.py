"""Next-token sampling for a batch with per-request temperature, top-k, top-p and seed.

Each request owns a CPU `torch.Generator` and draws exactly one uniform per sampled token, so its samples
depend only on its seed and its own logits, not on what else is in the batch. The reported logprob is the
sampled token's log-probability under the unmodified model distribution (temperature 1, no filtering):
that is the `old_per_token_logprobs` an RL trainer needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SamplingBatch:
    """Sampling parameters of the rows of a batch, as tensors on the model's device."""

    temperature: torch.Tensor  # (B,) float32; 0 = greedy
    top_p: torch.Tensor  # (B,) float32 in (0, 1]
    top_k: torch.Tensor  # (B,) int64; >= vocab size when off
    generators: list[torch.Generator]

    @classmethod
    def build(
        cls,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        top_ks: Sequence[int],
        seeds: Sequence[int],
        *,
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatch:
        generators = []
        for seed in seeds:
            generator = torch.Generator()
            generator.manual_seed(seed % 2**63)
            generators.append(generator)
        top_ks = [k if k >= 1 else vocab_size for k in top_ks]
        return cls(
            temperature=torch.tensor(temperatures, dtype=torch.float32, device=device),
            top_p=torch.tensor(top_ps, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device),
            generators=generators,
        )

    def select(self, keep: torch.Tensor) -> SamplingBatch:
        """The rows `keep` (positions in this batch), in that order."""
        index = keep.to(self.temperature.device)
        return SamplingBatch(
            temperature=self.temperature[index],
            top_p=self.top_p[index],
            top_k=self.top_k[index],
            generators=[self.generators[i] for i in keep.tolist()],
        )


def sample_next(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` (B, V); returns (tokens (B,), logprobs (B,))."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # greedy rows keep this
    sampled = (batch.temperature > 0).nonzero().squeeze(1)  # (S,)
    if sampled.numel():
        rows = sampled.tolist()
        uniforms = torch.cat([torch.rand(1, generator=batch.generators[i]) for i in rows])  # (S,)
        scaled = logits[sampled] / batch.temperature[sampled, None]  # (S, V)
        chosen = _draw(scaled, batch.top_k[sampled], batch.top_p[sampled], uniforms.to(logits.device))
        tokens[sampled] = chosen
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (B,)
    return tokens, logprobs


def _draw(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF draw from softmax(scaled) restricted to the top-k / top-p set of each row."""
    vocab_size = scaled.shape[-1]
    if bool((top_k >= vocab_size).all()) and bool((top_p >= 1).all()):
        order = None  # no filtering: skip the sort
        probs = torch.softmax(scaled, dim=-1)  # (S, V)
    else:
        scaled, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab_size, device=scaled.device)
        scaled = scaled.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)  # the most likely token always stays
    cdf = probs.cumsum(dim=-1)  # (S, V)
    targets = (uniforms * cdf[:, -1])[:, None]  # (S, 1)
    picks = torch.searchsorted(cdf, targets, right=True).clamp_(max=vocab_size - 1).squeeze(1)
    return picks if order is None else order.gather(1, picks[:, None]).squeeze(1)
