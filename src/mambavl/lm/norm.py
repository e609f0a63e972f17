"""RMSNorm as a module (the math lives in mambavl.ops.norms)."""

from __future__ import annotations

import torch
from torch import nn

from mambavl import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add(
        self, x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) for a pre-norm residual stream; `residual=None` starts it
        at x. An fp32 stream is added and normed in one fused op; a stream in the weights' dtype is
        rounded before the norm reads it (as transformers' Jamba does)."""
        if residual_in_fp32:
            return ops.rms_norm(x, self.weight, self.eps, residual, prenorm=True, residual_in_fp32=True)
        residual = x if residual is None else residual + x
        return self.forward(residual), residual


class GatedRMSNorm(nn.Module):
    """Mamba-2's norm on y, gated by silu(z), statistics over groups of `group_size` channels."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return ops.rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)
