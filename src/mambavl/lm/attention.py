"""Causal self-attention with grouped-query heads and a KV cache: without positional encoding, as in
Jamba's and Nemotron-H's attention layers (the Mamba layers carry position), or with rotary embeddings on
the first `rotary_dim` channels of each head (Bamba: half of them). A token's position is the number of
real tokens before it in its row (padding in the cache does not count), so ragged batches and rows
resumed from different states rotate exactly as one row alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambavl.lm.config import LMConfig
from mambavl.lm.linear import Linear


def attention_state(batch: int, n_kv: int, head_dim: int, device=None) -> dict[str, torch.Tensor]:
    """An empty KV cache: k, v [B, KV, 0, Dh] fp32, and "valid" [B, 0], which marks the cached positions
    that hold real tokens (padding in ragged batches does not)."""
    empty = torch.zeros(batch, n_kv, 0, head_dim, dtype=torch.float32, device=device)
    return {"k": empty, "v": empty.clone(), "valid": torch.zeros(batch, 0, dtype=torch.bool, device=device)}


HALF = (torch.bfloat16, torch.float16)


def causal_half(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of a whole prompt in its own 16-bit dtype: q [B, H, T, Dh], k, v [B, KV, T, Dh]
    with H a multiple of KV (grouped heads read their shared keys, never copied). On a GPU this is flash
    attention, with fp32 softmax statistics inside the kernel; a long prompt's hybrid prefill spent about a
    third of its time in the fp32 path below. Returns [B, H, T, Dh] in q's dtype."""
    T = q.shape[2]
    return F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), is_causal=T > 1, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


class Attention(nn.Module):
    """`in_dim`: the width it reads (default d_model; Zamba2's shared blocks read 2·d_model)."""

    def __init__(self, cfg: LMConfig, in_dim: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        in_dim = in_dim or cfg.d_model
        self.q_proj = Linear(in_dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(in_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(in_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta
        self.scale = cfg.attention_scale or None  # None: 1/√head_dim

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x [B, H, T, Dh] at positions [B, T] on its first `rotary_dim` channels
        (halves rotated against each other, as transformers' `rotate_half`)."""
        dim = self.rotary_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
        angles = positions[..., None].float() * inv  # [B, T, dim/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, dim]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rot, rest = x[..., :dim], x[..., dim:]
        half = torch.cat([-rot[..., dim // 2 :], rot[..., : dim // 2]], dim=-1)
        return torch.cat([rot * cos + half * sin, rest], dim=-1)

    def new_state(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        return attention_state(batch, self.n_kv, self.head_dim, device)

    def forward(
        self,
        hidden: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.attend(
            hidden, self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden), state, valid
        )

    def attend(
        self,
        hidden: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """o_proj(attention) of the projections q [B, T, H·Dh], k, v [B, T, KV·Dh] of `hidden`."""
        batch, T, _ = hidden.shape
        q = q.view(batch, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(batch, T, self.n_kv, self.head_dim).transpose(1, 2)
        past = 0
        new_valid = torch.ones(batch, T, dtype=torch.bool, device=hidden.device) if valid is None else valid
        keys_valid = new_valid
        if self.rotary_dim:
            before = state["valid"].sum(-1) if state is not None else torch.zeros(batch, device=hidden.device)
            positions = before[:, None] + torch.arange(T, device=hidden.device)[None, :]
            q, k = self._rotate(q, positions), self._rotate(k, positions)
        if state is not None and "fill" in state:  # per-slot buffers (`vlm.graphs.KVSlotDecoder`)
            return self.o_proj(self._attend_in_slots(q, k, v, state, new_valid).to(hidden.dtype))
        if state is not None:
            past = state["k"].shape[2]
            k = state["k"] = torch.cat([state["k"], k.float()], dim=2)
            v = state["v"] = torch.cat([state["v"], v.float()], dim=2)
            keys_valid = state["valid"] = torch.cat([state["valid"], new_valid], dim=1)
        if past == 0 and q.is_cuda and q.dtype in HALF and bool(keys_valid.all()):
            out = causal_half(q, k, v, self.scale)  # a fresh prefill on the GPU: flash attention
            return self.o_proj(out.transpose(1, 2).reshape(batch, T, -1).to(hidden.dtype))
        # fp32 softmax(QKᵀ)V: the cache is fp32, and the reference must not depend on the weights' dtype.
        q, k, v = q.float(), k.float(), v.float()
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        if past == 0 and bool(keys_valid.all()):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)
        else:  # query i sits at position past + i and sees the real keys among 0 .. past + i
            keys = torch.arange(past + T, device=q.device)
            queries = past + torch.arange(T, device=q.device)
            mask = (keys[None, :] <= queries[:, None]) & keys_valid[:, None, :]  # [B, T, S]
            # a padding query sees at least itself, so no row of the softmax is empty (no NaN)
            mask = mask | (keys[None, :] == queries[:, None])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, T, -1).to(hidden.dtype)
        return self.o_proj(out)

    def _attend_in_slots(self, q, k, v, state, new_valid) -> torch.Tensor:
        """Attention with the KV cache in per-slot buffers: k, v [B, KV, S, Dh] and valid [B, S] hold each
        row's cached positions from 0 on, `fill` [B] counts them. The T new keys and values go to each row's
        positions fill .. fill+T-1 (the buffers must have room: the decoder grows them), and query i of row
        b, at position fill_b + i, sees the real keys up to itself. Returns [B, T, H·Dh] fp32."""
        batch, _, T, _ = q.shape
        fill, length = state["fill"], state["k"].shape[2]
        positions = fill[:, None] + torch.arange(T, device=q.device)[None, :]  # [B, T]
        rows = torch.arange(batch, device=q.device)[:, None]
        state["k"][rows, :, positions] = k.transpose(1, 2).float()
        state["v"][rows, :, positions] = v.transpose(1, 2).float()
        state["valid"][rows, positions] = new_valid
        fill += T
        keys = torch.arange(length, device=q.device)
        mask = (keys[None, None, :] <= positions[:, :, None]) & state["valid"][:, None, :]  # [B, T, S]
        mask = mask | (keys[None, None, :] == positions[:, :, None])  # a padding query sees itself
        k, v = state["k"], state["v"]
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[:, None], scale=self.scale)
        return out.transpose(1, 2).reshape(batch, T, -1)
