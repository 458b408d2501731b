"""One forward step of a Llama-style decoder (Qwen2, Qwen3, Llama) over the KV pool, on the HF module weights.

A step feeds the rows' new tokens flattened, (T,), through the loaded `transformers` model's weights with
plain tensor ops (no module calls but the embedding, so a step is ~20 kernels per layer). Per layer the
new keys/values of all rows are written into their pool slots in one `index_copy_`, then each attention
group (decoding rows, one query each; prefilling rows, a chunk each) reads its rows' K/V with one
`index_select` over its (B, K) slot matrix and runs `scaled_dot_product_attention` with an additive mask
(key j visible to a query at position p iff j <= p). The README's engine section has the measurement
behind this choice (vs advanced indexing, a bool mask, manual attention and FlexAttention).
Why not transformers' forward: it takes slot tables directly, so nothing but the pool holds KV.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from treepo.service.engine.forward_batch import AttentionGroup, ForwardBatch
from treepo.service.engine.kv_pool import KVPool, KVShape

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Layer:
    """One decoder layer's weights; qkv and gate/up are packed (the modules' parameters are views of them)."""

    input_norm: torch.Tensor
    qkv_weight: torch.Tensor  # ((H + 2 Hkv) D, C)
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over head_dim
    k_norm: torch.Tensor | None
    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_weight: torch.Tensor  # (2 I, C)
    down_weight: torch.Tensor


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
        config = model.config.get_text_config(decoder=True)
        self.model = model
        self.pool = pool
        self.device = next(model.parameters()).device
        self.decoder = model.model
        shape = pool.shape
        self.num_heads, self.num_kv_heads = int(config.num_attention_heads), shape.num_kv_heads
        self.eps = float(config.rms_norm_eps)
        self.scaling = float(self.decoder.layers[0].self_attn.scaling)
        self.act = F.silu if config.hidden_act == "silu" else self.decoder.layers[0].mlp.act_fn
        self.layers = [_pack(layer) for layer in self.decoder.layers]
        self._rope_cos = self._rope_sin = torch.empty(0)  # (N, D) for positions < N, grown on demand
        self.num_computed_tokens = 0  # real tokens passed through the model, prefill + decode
        self.num_forward_passes = 0

    @torch.inference_mode()
    def step(self, batch: ForwardBatch) -> torch.Tensor:
        """Feed the batch's tokens; returns the logits (R, V) at `batch.logits_index`, in order."""
        hidden = self.decoder.embed_tokens(batch.input_ids)  # (T, C)
        rope = self._rope(batch.positions, batch.max_position, hidden.dtype)
        for index, layer in enumerate(self.layers):
            attn_in = _rms_norm(hidden, layer.input_norm, self.eps)
            hidden = hidden.add_(self._attention(index, layer, attn_in, rope, batch))
            mlp_in = _rms_norm(hidden, layer.post_norm, self.eps)
            gate, up = _linear(mlp_in, layer.gate_up_weight).chunk(2, dim=-1)  # (T, I) each
            hidden = hidden.add_(_linear(self.act(gate).mul_(up), layer.down_weight))
        last = _rms_norm(hidden.index_select(0, batch.logits_index), self.decoder.norm.weight, self.eps)
        self.num_computed_tokens += int(batch.input_ids.numel())
        self.num_forward_passes += 1
        return _linear(last, self.model.lm_head.weight, self.model.lm_head.bias)  # (R, V)

    # Internal helpers

    def _attention(self, index: int, layer: _Layer, x, rope, batch: ForwardBatch) -> torch.Tensor:
        num_tokens, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = _linear(x, layer.qkv_weight, layer.qkv_bias).view(num_tokens, heads + 2 * kv_heads, -1)
        qk = qkv[:, : heads + kv_heads]  # (T, H + Hkv, D); then v (T, Hkv, D)
        if layer.q_norm is not None:  # Qwen3: per-head RMSNorm of q and k before RoPE
            q_normed = _rms_norm(qk[:, :heads], layer.q_norm, self.eps)
            qk = torch.cat((q_normed, _rms_norm(qk[:, heads:], layer.k_norm, self.eps)), dim=1)
        qkv[:, : heads + kv_heads] = _rotate(qk, *rope)  # q and k rotated together, in place
        q = qkv[:, :heads]  # (T, H, D)
        self.pool.write(index, batch.write_slots, qkv[:, heads:].view(num_tokens, 2, kv_heads, -1))
        parts = [self._attend(index, qkv, group) for group in batch.groups]
        if batch.is_whole_decode:
            out = parts[0]  # (T, H, D): one query per row, in the step's token order
        else:
            out = q.new_empty(q.shape)  # (T, H, D)
            for group, part in zip(batch.groups, parts, strict=True):
                out[group.flat_index] = part
        return _linear(out.reshape(num_tokens, -1), layer.o_weight, layer.o_bias)  # (T, C)

    def _attend(self, index: int, qkv: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """Attention of the group's queries over its rows' pool slots: (group tokens, H, D) in flat order."""
        kv = self.pool.read(index, group.key_slots)  # (B, K, 2, Hkv, D)
        key, value = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, Hkv, K, D)
        heads = self.num_heads
        if group.token_index is None:  # decode: one query per row
            # rows picked from qkv, not q: the same strided layout whatever the grouping (SDPA's kernel
            # choice, hence the last bits of a row's logprobs, depends on it)
            rows = qkv if group.flat_index is None else qkv.index_select(0, group.flat_index)
            query = rows[:, :heads, None, :]  # (B, H, 1, D)
        else:
            query = qkv[:, :heads][group.token_index].transpose(1, 2)  # (B, H, Q, D)
        attended = F.scaled_dot_product_attention(
            query,
            key.to(qkv.dtype),
            value.to(qkv.dtype),
            attn_mask=group.mask,
            scale=self.scaling,
            enable_gqa=True,
        )  # (B, H, Q, D)
        if group.token_index is None:
            return attended[:, :, 0]  # (B, H, D)
        return attended.transpose(1, 2)[group.token_valid]  # (n, H, D)

    def _rope(
        self, positions: torch.Tensor, max_position: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, 1, D) of `positions`, from a table the model's own rotary module computed once."""
        needed = max_position + 1
        if needed > self._rope_cos.shape[0]:
            size = max(needed, 2 * self._rope_cos.shape[0], 256)
            table = torch.arange(size, device=self.device)[None]  # (1, N)
            probe = torch.empty((), dtype=dtype, device=self.device)
            cos, sin = self.decoder.rotary_emb(probe, table)  # (1, N, D) each
            self._rope_cos, self._rope_sin = cos[0], sin[0]
        cos, sin = self._rope_cos.index_select(0, positions), self._rope_sin.index_select(0, positions)
        return cos[:, None, :], sin[:, None, :]


def _pack(layer: torch.nn.Module) -> _Layer:
    """Pack q/k/v and gate/up into one matrix each, making the module parameters views of the packed ones
    (so in-place weight loads and edits reach both)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _packed((attn.q_proj, attn.k_proj, attn.v_proj), "weight")
    qkv_bias = _packed((attn.q_proj, attn.k_proj, attn.v_proj), "bias")
    gate_up = _packed((mlp.gate_proj, mlp.up_proj), "weight")
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    return _Layer(
        input_norm=layer.input_layernorm.weight,
        qkv_weight=qkv,
        qkv_bias=qkv_bias,
        q_norm=None if q_norm is None else q_norm.weight,
        k_norm=None if k_norm is None else k_norm.weight,
        o_weight=attn.o_proj.weight,
        o_bias=attn.o_proj.bias,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up_weight=gate_up,
        down_weight=mlp.down_proj.weight,
    )


def _packed(modules: tuple[torch.nn.Module, ...], name: str) -> torch.Tensor | None:
    params = [getattr(m, name) for m in modules]
    if any(p is None for p in params):
        assert all(p is None for p in params), f"mixed {name} presence in {modules}"
        return None
    with torch.no_grad():
        packed = torch.cat([p.detach() for p in params])
    offset = 0
    for param in params:
        param.data = packed[offset : offset + param.shape[0]]
        offset += param.shape[0]
    return packed


BATCH_INVARIANT_ROWS = 8


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` whose rows do not depend on how many rows share the step: BLAS picks other kernels (other
    summation orders) for fewer than 8 rows, so a request's logprobs would change in the last bits with the
    traffic beside it and a seeded run would not repeat. Padding small steps to 8 rows makes them
    bit-identical (measured on CPU; tests/service/engine/test_embedded.py)."""
    rows = x.shape[0]
    if rows >= BATCH_INVARIANT_ROWS:
        return F.linear(x, weight, bias)
    padded = torch.cat((x, x.new_zeros(BATCH_INVARIANT_ROWS - rows, x.shape[1])))
    return F.linear(padded, weight, bias)[:rows]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalized in float32, cast back, then scaled (5 kernels in float32;
    `F.rms_norm` measured slower on CPU for decode-sized inputs)."""
    x32 = _as(x, torch.float32)
    normed = x32 * (x32 * x32).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return weight * _as(normed, x.dtype)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)` without the dispatch when it is already that dtype (hot loop)."""
    return x if x.dtype == dtype else x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (T, H, D) with cos/sin (T, 1, D), as transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos).add_(rotated.mul_(sin))


def _check_architecture(model: torch.nn.Module) -> None:
    """The step above needs a Llama-style decoder with full attention; say so for anything else."""
    config = model.config.get_text_config(decoder=True)
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
    mlp_needed = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if (
        layers is None
        or not all(hasattr(layers[0].self_attn, name) for name in needed)
        or not all(hasattr(layers[0].mlp, name) for name in mlp_needed)
    ):
        raise ValueError(
            f"the embedded engine runs Llama-style decoders (qwen2, qwen3, llama); got {config.model_type}"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ValueError("the embedded engine does not implement sliding-window attention; disable it")
