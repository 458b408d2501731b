"""The trained policy: a Hugging Face causal LM and the per-token log-probs of responses under it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


class Policy:
    """Wraps a causal LM; batches (prompt, response) pairs with right padding.

    Rows are laid out as `prompt ⊕ response ⊕ pad`; response token t of row i sits at position
    `len(prompt_i) + t` and is predicted by the logits one position earlier.
    """

    def __init__(self, model: torch.nn.Module, *, pad_token_id: int = 0) -> None:
        self.model = model
        self.pad_token_id = pad_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu") -> Policy:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
        pad = model.config.pad_token_id
        if pad is None:
            eos = model.config.eos_token_id
            pad = eos[0] if isinstance(eos, list) else (eos or 0)
        logger.info("loaded policy from %s (%d params)", path, sum(p.numel() for p in model.parameters()))
        return cls(model, pad_token_id=int(pad))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def per_token_logprobs(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        """Log p(response token | prefix) for every row, right-padded.

        Returns (per_token_logprobs, response_mask), both (B, T_resp) with T_resp the longest response;
        padding positions hold 0 log-prob and mask 0. Differentiable when grad is enabled.
        """
        if len(prompt_ids) != len(response_ids) or not prompt_ids:
            raise ValueError(
                f"need as many prompts as responses, at least one ({len(prompt_ids)=}, {len(response_ids)=})"
            )
        input_ids, attention_mask, gather_index, response_mask = self._layout(prompt_ids, response_ids)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
        # Only the positions that predict response tokens matter: pick them before the softmax.
        index = gather_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, T_resp, V)
        step_logits = torch.gather(logits, 1, index).float()  # (B, T_resp, V)
        next_index = (gather_index + 1).clamp(max=input_ids.shape[1] - 1)
        targets = torch.gather(input_ids, 1, next_index)  # (B, T_resp)
        logprobs = F.log_softmax(step_logits, dim=-1)
        token_logprobs = torch.gather(logprobs, 2, targets.unsqueeze(-1)).squeeze(-1)  # (B, T_resp)
        return token_logprobs * response_mask, response_mask

    def _layout(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch = len(prompt_ids)
        total = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True))
        max_response = max(1, max(len(r) for r in response_ids))
        input_ids = torch.full((batch, total), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((batch, total), dtype=torch.long)  # (B, L)
        gather_index = torch.zeros((batch, max_response), dtype=torch.long)  # (B, T_resp)
        response_mask = torch.zeros((batch, max_response), dtype=torch.float32)  # (B, T_resp)
        for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            if not prompt:
                raise ValueError(f"row {i} has an empty prompt; every row needs at least one prompt token")
            length = len(prompt) + len(response)
            input_ids[i, :length] = torch.tensor([*prompt, *response], dtype=torch.long)
            attention_mask[i, :length] = 1
            steps = len(response)
            gather_index[i, :steps] = torch.arange(len(prompt) - 1, len(prompt) - 1 + steps)
            response_mask[i, :steps] = 1.0
        device = self.device
        return (
            input_ids.to(device),
            attention_mask.to(device),
            gather_index.to(device),
            response_mask.to(device),
        )

    def state_dict(self) -> dict[str, Tensor]:
        return {name: tensor.detach().contiguous() for name, tensor in self.model.state_dict().items()}
