"""Next-token sampling for a batch with per-request temperature, top-k, top-p and seed.

Each request owns a CPU `torch.Generator`; at the start of a call it draws one uniform per possible new
token, and the k-th token of the request is drawn (inverse CDF) with its k-th uniform. Its samples thus
depend only on its seed and its own logits, not on what else is in the batch, and a step costs no
per-row work. The reported logprob is the sampled token's log-probability under the unmodified model
distribution (temperature 1, no filtering): the `old_per_token_logprobs` an RL trainer needs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_local = threading.local()


@dataclass(slots=True)
class SamplingBatch:
    """Sampling parameters of the rows of a batch, as tensors on the model's device."""

    temperature: torch.Tensor  # (B,) float32; 0 = greedy
    top_p: torch.Tensor  # (B,) float32 in (0, 1]
    top_k: torch.Tensor  # (B,) int64; >= vocab size when off
    uniforms: torch.Tensor  # (B, max_steps) float32: row i's k-th token uses uniforms[i, k]
    is_all_greedy: bool
    is_filtered: bool  # some row uses top-k or top-p
    step: int = 0

    @classmethod
    def build(
        cls,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        top_ks: Sequence[int],
        seeds: Sequence[int],
        *,
        max_steps: int,
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatch:
        uniforms = torch.tensor([draw_uniforms(seed, max_steps) for seed in seeds])  # (B, max_steps)
        return cls.from_rows(temperatures, top_ps, top_ks, uniforms, vocab_size=vocab_size, device=device)

    @classmethod
    def from_rows(
        cls,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        top_ks: Sequence[int],
        uniforms: torch.Tensor,
        *,
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatch:
        """A batch whose row i draws its k-th next token with `uniforms[i, k]`, (B, steps) float32."""
        top_ks = [k if k >= 1 else vocab_size for k in top_ks]
        return cls(
            temperature=torch.tensor(temperatures, dtype=torch.float32, device=device),
            top_p=torch.tensor(top_ps, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device),
            uniforms=uniforms.to(device=device, dtype=torch.float32),
            is_all_greedy=all(t == 0 for t in temperatures),
            is_filtered=any(k < vocab_size for k in top_ks) or any(p < 1 for p in top_ps),
        )

    def select(self, keep: torch.Tensor) -> SamplingBatch:
        """The rows `keep` (positions in this batch), in that order."""
        index = keep.to(self.temperature.device)
        return SamplingBatch(
            temperature=self.temperature[index],
            top_p=self.top_p[index],
            top_k=self.top_k[index],
            uniforms=self.uniforms[index],
            is_all_greedy=self.is_all_greedy,
            is_filtered=self.is_filtered,
            step=self.step,
        )


def draw_uniforms(seed: int, n: int) -> list[float]:
    """The `n` uniforms a request with `seed` draws its tokens with (its k-th token uses the k-th)."""
    generator = getattr(_local, "generator", None)
    if generator is None:  # one per thread, re-seeded per request (creating one costs more than drawing)
        generator = _local.generator = torch.Generator()
    generator.manual_seed(seed % 2**63)
    return torch.rand(n, generator=generator).tolist()


def sample_next(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` (B, V); returns (tokens (B,), logprobs (B,))."""
    assert batch.step < batch.uniforms.shape[1], f"{batch.step=} {batch.uniforms.shape=}"
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V), unmodified distribution
    tokens = logprobs.argmax(dim=-1)
    if not batch.is_all_greedy:
        temperature = batch.temperature.clamp(min=1e-6)[:, None]  # greedy rows are overridden below
        chosen = _draw(logprobs / temperature, batch, batch.uniforms[:, batch.step])
        tokens = torch.where(batch.temperature > 0, chosen, tokens)
    batch.step += 1
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
