"""One forward step of a Llama-style decoder (Qwen2, Qwen3, Llama) over the KV pool, on the HF module weights.

A step feeds the rows' new tokens flattened, (T,), through the projections, RoPE, RMSNorm and MLP of the
loaded `transformers` model. Per layer the new keys/values of all rows are written into their pool slots
in one indexed store, then each row attends over its slot table: keys and values are index-selected from
the pool per layer (no per-call copy of prefixes is kept), padded to the longest row, and fed to
`scaled_dot_product_attention` with a mask that allows key j for a query at position p iff j <= p.
Decoding rows (one query each) and prefilling rows (a chunk each) are two attention groups of one step.
Why this and not transformers' forward: it takes slot tables directly, so nothing but the pool holds KV;
the README's engine section measures it against `generate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from treepo.service.engine.kv_pool import PAD_SLOT, KVPool, KVShape

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RowStep:
    """What one row feeds in a step: its new tokens, where they start, and its slot table so far."""

    token_ids: list[int]
    start: int  # position of token_ids[0]
    slots: torch.Tensor  # (start + len(token_ids),) int64: the row's slot table up to its last new token
    wants_logits: bool  # the last new token ends the row's known tokens: sample from it


@dataclass(slots=True)
class _Group:
    """Rows attended together: query index into the flat tokens, key slots and mask, padded."""

    query_index: torch.Tensor  # (B, Q) index into the step's flat tokens (0 where padded)
    query_valid: torch.Tensor  # (B, Q) bool
    key_slots: torch.Tensor  # (B, K) pool slots (PAD_SLOT where padded)
    mask: torch.Tensor  # (B, 1, Q, K) bool: True = attend
    is_whole_step: bool = False  # one query per row covering the step's tokens in order (pure decode)


def kv_shape(model: torch.nn.Module, dtype: torch.dtype) -> KVShape:
    config = model.config.get_text_config(decoder=True)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return KVShape(int(config.num_hidden_layers), kv_heads, head_dim, dtype)


class ModelRunner:
    """Runs steps of a loaded causal LM against a `KVPool`; counts the real tokens it computes."""

    def __init__(self, model: torch.nn.Module, pool: KVPool) -> None:
        _check_architecture(model)
        self.model = model
        self.pool = pool
        self.device = next(model.parameters()).device
        self.decoder = model.model
        self.num_heads = int(model.config.get_text_config(decoder=True).num_attention_heads)
        self.num_computed_tokens = 0  # real tokens passed through the model, prefill + decode
        self.num_forward_passes = 0

    @torch.inference_mode()
    def step(self, rows: list[RowStep]) -> torch.Tensor:
        """Feed every row's new tokens; returns the logits (R, V) of the rows with `wants_logits`, in order."""
        token_ids = torch.tensor([t for row in rows for t in row.token_ids], device=self.device)  # (T,)
        positions = torch.cat([torch.arange(r.start, r.start + len(r.token_ids)) for r in rows]).to(
            self.device
        )
        write_slots = torch.cat([row.slots[row.start :] for row in rows]).to(self.device)  # (T,)
        groups = self._groups(rows)
        hidden = self.decoder.embed_tokens(token_ids)  # (T, C)
        cos, sin = self.decoder.rotary_emb(hidden[None], positions[None])  # (1, T, D) each
        rope = (cos[0, :, None, :], sin[0, :, None, :])  # (T, 1, D): broadcast over heads
        for index, layer in enumerate(self.decoder.layers):
            attn_in = layer.input_layernorm(hidden)
            hidden = hidden + self._attention(index, layer.self_attn, attn_in, rope, write_slots, groups)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        ends = torch.tensor(_ends(rows), device=self.device, dtype=torch.int64)
        last = self.decoder.norm(hidden[ends])  # (R, C)
        self.num_computed_tokens += int(token_ids.numel())
        self.num_forward_passes += 1
        return self.model.lm_head(last)

    # Internal helpers

    def _attention(self, layer_index, attn, x, rope, write_slots, groups) -> torch.Tensor:
        num_tokens, head_dim = x.shape[0], attn.head_dim
        q = attn.q_proj(x).view(num_tokens, -1, head_dim)  # (T, H, D)
        k = attn.k_proj(x).view(num_tokens, -1, head_dim)  # (T, Hkv, D)
        v = attn.v_proj(x).view(num_tokens, -1, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        self.pool.write(layer_index, write_slots, k, v)  # in place: the rows read them back below
        out = torch.empty_like(q)  # (T, H, D)
        keys, values = self.pool.keys[layer_index], self.pool.values[layer_index]  # (S, Hkv, D)
        for group in groups:
            # (B, H, Q, D); a decode-only step needs no gather or scatter back
            query = q[:, :, None, :] if group.is_whole_step else q[group.query_index].transpose(1, 2)
            key = keys[group.key_slots].transpose(1, 2).to(q.dtype)  # (B, Hkv, K, D)
            value = values[group.key_slots].transpose(1, 2).to(q.dtype)
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=group.mask, scale=attn.scaling, enable_gqa=True
            )  # (B, H, Q, D)
            if group.is_whole_step:
                return attn.o_proj(attended[:, :, 0].reshape(num_tokens, -1))  # (T, C)
            out[group.query_index[group.query_valid]] = attended.transpose(1, 2)[group.query_valid]
        return attn.o_proj(out.view(num_tokens, -1))  # (T, C)

    def _groups(self, rows: list[RowStep]) -> list[_Group]:
        """Decoding rows (1 query) in one group, prefilling rows (chunks) in another."""
        offsets, offset = [], 0
        for row in rows:
            offsets.append(offset)
            offset += len(row.token_ids)
        single = [i for i, row in enumerate(rows) if len(row.token_ids) == 1]
        chunks = [i for i, row in enumerate(rows) if len(row.token_ids) > 1]
        parts = [part for part in (single, chunks) if part]
        groups = [self._group([rows[i] for i in part], [offsets[i] for i in part]) for part in parts]
        groups[0].is_whole_step = not chunks
        return groups

    def _group(self, rows: list[RowStep], offsets: list[int]) -> _Group:
        num_queries = max(len(row.token_ids) for row in rows)
        num_keys = max(int(row.slots.numel()) for row in rows)
        key_slots = torch.full((len(rows), num_keys), PAD_SLOT, dtype=torch.int64)
        query_pos = torch.full((len(rows), num_queries), -1, dtype=torch.int64)
        query_index = torch.zeros((len(rows), num_queries), dtype=torch.int64)
        for i, (row, offset) in enumerate(zip(rows, offsets, strict=True)):
            n = len(row.token_ids)
            key_slots[i, : row.slots.numel()] = row.slots
            query_pos[i, :n] = torch.arange(row.start, row.start + n)
            query_index[i, :n] = torch.arange(offset, offset + n)
        mask = torch.arange(num_keys)[None, None, :] <= query_pos[:, :, None]  # (B, Q, K)
        mask[:, :, 0] |= query_pos < 0  # padded queries see one (zero) key: no NaN
        device = self.device
        return _Group(
            query_index.to(device),
            (query_pos >= 0).to(device),
            key_slots.to(device),
            mask[:, None].to(device),
        )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (T, H, D) with cos/sin (T, 1, D), as transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _ends(rows: list[RowStep]) -> list[int]:
    """Flat index of the last new token of each row that wants logits."""
    ends, offset = [], 0
    for row in rows:
        offset += len(row.token_ids)
        if row.wants_logits:
            ends.append(offset - 1)
    return ends


def _check_architecture(model: torch.nn.Module) -> None:
    """The step above needs a Llama-style decoder with full attention; say so for anything else."""
    config = model.config.get_text_config(decoder=True)
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
    if layers is None or not all(hasattr(layers[0].self_attn, name) for name in needed):
        raise ValueError(
            f"the embedded engine runs Llama-style decoders (qwen2, qwen3, llama); got {config.model_type}"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ValueError("the embedded engine does not implement sliding-window attention; disable it")
