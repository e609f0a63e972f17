"""Feed-forward layers of the hybrid models: an MLP (SwiGLU, or squared ReLU) and a sparse mixture of
SwiGLU experts with top-k routing (Jamba: softmax over all experts, the top-k weights used as they are,
not renormalised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambavl.lm.config import LMConfig
from mambavl.lm.linear import Linear


class MLP(nn.Module):
    """SwiGLU (`ffn_act` silu_gated: gate, up, down) or a plain MLP with squared ReLU (relu2: up, down;
    Nemotron-H). `width`: its hidden size (default `d_ffn`)."""

    def __init__(self, cfg: LMConfig, width: int | None = None, act: str | None = None):
        super().__init__()
        width = width or cfg.d_ffn
        self.gated = (act or cfg.ffn_act) == "silu_gated"
        if self.gated:
            self.gate_proj = Linear(cfg.d_model, width, bias=False)
        self.up_proj = Linear(cfg.d_model, width, bias=False)
        self.down_proj = Linear(width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class MoE(nn.Module):
    """Experts stored stacked: gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F]; with
    `d_shared_ffn`, a shared SwiGLU MLP beside them (`shared`), its output added."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_experts, self.top_k, self.routing = cfg.n_experts, cfg.top_k, cfg.moe_routing
        self.shared = MLP(cfg, cfg.d_shared_ffn, "silu_gated") if cfg.d_shared_ffn else None
        self.router = Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_ffn, cfg.d_model))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_ffn))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and their weights per token: the softmax over all experts at the top k
        (softmax_topk), or the softmax over the top k logits (topk_softmax)."""
        logits = self.router(x).float()
        if self.routing == "topk_softmax":
            top, experts = torch.topk(logits, self.top_k, dim=-1)
            return torch.softmax(top, dim=-1).to(x.dtype), experts
        weights, experts = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        # Each expert runs once on exactly the tokens routed to it: no capacity limit, nothing dropped.
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)
