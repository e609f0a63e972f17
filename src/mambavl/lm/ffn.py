"""Feed-forward layers of the hybrid models: an MLP (SwiGLU, or squared ReLU) and a sparse mixture of
experts of the same kind with top-k routing (`LMConfig.moe_routing`: Jamba's, Granite's, Nemotron-H's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambavl.lm.config import LMConfig
from mambavl.lm.linear import Linear

# the gated activations by `ffn_act` (act(gate) · up); any other (relu2) is a plain MLP
GATES = {"silu_gated": F.silu, "gelu_gated": F.gelu}
# Up to this many tokens a call (decode steps), experts run with shapes that do not depend on the routing,
# so that a step can be captured in a CUDA graph; more (a prefill) run expert by expert.
STATIC_TOKENS = 256


class MLP(nn.Module):
    """A gated MLP (`ffn_act` silu_gated: SwiGLU, or gelu_gated: gate, up, down) or a plain MLP with squared
    ReLU (relu2: up, down; Nemotron-H). `width`: its hidden size (default `d_ffn`)."""

    def __init__(self, cfg: LMConfig, width: int | None = None, act: str | None = None):
        super().__init__()
        width = width or cfg.d_ffn
        self.gate = GATES.get(act or cfg.ffn_act)
        self.gated = self.gate is not None
        if self.gated:
            self.gate_proj = Linear(cfg.d_model, width, bias=False)
        self.up_proj = Linear(cfg.d_model, width, bias=False)
        self.down_proj = Linear(width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.gate(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class MoE(nn.Module):
    """Experts stored stacked: gate_up_proj [E, 2F, H] (gate rows first; SwiGLU) or up_proj [E, F, H]
    (squared ReLU), and down_proj [E, H, F]; with `d_shared_ffn`, a shared MLP beside them (`shared`), its
    output added. Sigmoid grouped routing keeps its learned score bias in `router_bias`."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = GATES.get(cfg.ffn_act)
        self.gated = self.gate is not None
        width = cfg.d_expert_ffn or cfg.d_ffn
        self.shared = MLP(cfg, cfg.d_shared_ffn) if cfg.d_shared_ffn else None
        self.router = Linear(cfg.d_model, cfg.n_experts, bias=False)
        if cfg.moe_routing == "sigmoid_grouped":
            self.register_buffer("router_bias", torch.zeros(cfg.n_experts))
        up = nn.Parameter(torch.empty(cfg.n_experts, (2 if self.gated else 1) * width, cfg.d_model))
        if self.gated:
            self.gate_up_proj = up
        else:
            self.up_proj = up
        self.down_proj = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, width))
        nn.init.normal_(up, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and their weights per token: the softmax over all experts at the top k
        (softmax_topk), the softmax over the top k logits (topk_softmax), or sigmoid scores (fp32) chosen
        after the score bias within the best groups, each group scored by its best two (sigmoid_grouped)."""
        cfg = self.cfg
        if cfg.moe_routing == "sigmoid_grouped":
            return self._route_grouped(x)
        logits = self.router(x).float()
        if cfg.moe_routing == "topk_softmax":
            top, experts = torch.topk(logits, cfg.top_k, dim=-1)
            return torch.softmax(top, dim=-1).to(x.dtype), experts
        weights, experts = torch.topk(torch.softmax(logits, dim=-1), cfg.top_k, dim=-1)
        return weights.to(x.dtype), experts

    def _route_grouped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        scores = F.linear(x.float(), self.router.weight.float()).sigmoid()
        biased = scores + self.router_bias.float()
        by_group = biased.view(-1, cfg.moe_groups, cfg.n_experts // cfg.moe_groups)
        best = torch.topk(by_group.topk(2, dim=-1)[0].sum(-1), cfg.moe_topk_groups, dim=-1)[1]
        keep = torch.zeros_like(by_group[..., 0], dtype=torch.bool).scatter_(1, best, True)
        biased = by_group.masked_fill(~keep[..., None], float("-inf")).view(-1, cfg.n_experts)
        experts = torch.topk(biased, cfg.top_k, dim=-1)[1]
        weights = scores.gather(1, experts)
        if cfg.moe_norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.moe_scaling, experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            return F.linear(self.gate(gate) * up, self.down_proj[e])
        return F.linear(torch.square(F.relu(F.linear(x, self.up_proj[e]))), self.down_proj[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        if x.shape[0] <= STATIC_TOKENS:
            out = self._static(x, weights, experts)
        else:
            out = self._by_expert(x, weights, experts)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)

    def _by_expert(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each expert runs once on exactly the tokens routed to it: no capacity limit, nothing dropped
        (shapes depend on the routing: many tokens, as in a prefill)."""
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            y = self.expert(e, x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _static(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The same sum with shapes that do not depend on the routing (a decode step, captured in a CUDA
        graph): each token's own experts' weights gathered when that reads fewer weights than all the
        experts once (tokens × top_k < experts), else every expert on every token, weighted by the routing
        (zero off the chosen ones)."""
        up_all = self.gate_up_proj if self.gated else self.up_proj  # [E, (2)F, H]
        if x.shape[0] * experts.shape[1] < self.cfg.n_experts:
            hidden = torch.einsum("nh,nkfh->nkf", x, up_all[experts])
            y = torch.einsum("nkf,nkhf->nkh", self._act(hidden), self.down_proj[experts])
            return (y * weights[..., None].to(y.dtype)).sum(1)
        dense = torch.zeros(x.shape[0], self.cfg.n_experts, dtype=weights.dtype, device=x.device)
        dense.scatter_(1, experts, weights)
        hidden = torch.einsum("nh,efh->nef", x, up_all)
        y = torch.einsum("nef,ehf->neh", self._act(hidden), self.down_proj)
        return torch.einsum("ne,neh->nh", dense.to(y.dtype), y)

    def _act(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            return self.gate(gate) * up
        return torch.square(F.relu(hidden))
