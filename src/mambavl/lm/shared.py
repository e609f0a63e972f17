"""Zamba2's shared blocks: a few attention + MLP blocks whose weights are reused by many layers.

The u-th `shared+mamba2` layer (`LMConfig.shared_layers`) runs block u mod `shared_blocks` on the residual
stream concatenated with the input embeddings [stream, embeddings] (2·d_model channels): RMSNorm → attention
(its KV cache in the layer's own state) → RMSNorm → gated MLP, with no residual inside. Each use adds low-rank
adapters of its own, B·(A·x), to the MLP's gate_up projection and, with `shared_qkv_adapters`, to q, k and v;
so a block holds adapters for exactly the uses that run it. The layer passes the block's output through its
own linear into its Mamba-2 mixer's input (`lm.model.Block`).
"""

from __future__ import annotations

import torch
from torch import nn

from mambavl.lm.attention import Attention
from mambavl.lm.config import LMConfig
from mambavl.lm.ffn import GATES
from mambavl.lm.linear import Linear
from mambavl.lm.norm import RMSNorm


def _adapter(width: int, rank: int, out: int) -> nn.Sequential:
    return nn.Sequential(Linear(width, rank, bias=False), Linear(rank, out, bias=False))


def _uses(cfg: LMConfig, block: int) -> list[int]:
    """The uses (indices into `shared_layers`) that run shared block `block`."""
    return [u for u in range(len(cfg.shared_layers)) if u % cfg.shared_blocks == block]


class SharedAttention(Attention):
    """Attention over 2·d_model channels, with per-use q/k/v adapters where the config asks for them."""

    def __init__(self, cfg: LMConfig, block: int):
        width = 2 * cfg.d_model
        super().__init__(cfg, in_dim=width)
        if cfg.shared_qkv_adapters:
            for name in ("q_adapters", "k_adapters", "v_adapters"):
                adapters = {str(u): _adapter(width, cfg.adapter_rank, width) for u in _uses(cfg, block)}
                setattr(self, name, nn.ModuleDict(adapters))
        else:
            self.q_adapters = self.k_adapters = self.v_adapters = None

    def forward(self, hidden, state=None, valid=None, use: int = 0) -> torch.Tensor:
        q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        if self.q_adapters is not None:
            key = str(use)
            q = q + self.q_adapters[key](hidden)
            k = k + self.k_adapters[key](hidden)
            v = v + self.v_adapters[key](hidden)
        return self.attend(hidden, q, k, v, state, valid)


class SharedMLP(nn.Module):
    """act(gate) · up from one gate_up projection (gate rows first) plus the use's adapter, then down."""

    def __init__(self, cfg: LMConfig, block: int):
        super().__init__()
        if cfg.ffn_act not in GATES:
            raise ValueError(f"the shared blocks' MLP is gated: ffn_act must be one of {sorted(GATES)}")
        self.act = GATES[cfg.ffn_act]
        self.gate_up_proj = Linear(cfg.d_model, 2 * cfg.d_ffn, bias=cfg.proj_bias)
        self.down_proj = Linear(cfg.d_ffn, cfg.d_model, bias=cfg.proj_bias)
        rank = cfg.adapter_rank
        self.adapters = (
            nn.ModuleDict({str(u): _adapter(cfg.d_model, rank, 2 * cfg.d_ffn) for u in _uses(cfg, block)})
            if rank
            else None
        )

    def forward(self, x: torch.Tensor, use: int) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.adapters is not None:
            gate_up = gate_up + self.adapters[str(use)](x)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SharedBlock(nn.Module):
    def __init__(self, cfg: LMConfig, block: int):
        super().__init__()
        self.norm = RMSNorm(2 * cfg.d_model, cfg.norm_eps)
        self.attn = SharedAttention(cfg, block)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SharedMLP(cfg, block)

    def forward(
        self,
        stream: torch.Tensor,
        embeddings: torch.Tensor,
        state: dict[str, torch.Tensor] | None,
        valid: torch.Tensor | None,
        use: int,
    ) -> torch.Tensor:
        x = self.norm(torch.cat([stream, embeddings], dim=-1))
        x = self.attn(x, state, valid, use)
        return self.ffn(self.ffn_norm(x), use)
