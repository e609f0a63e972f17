"""LDPv2 (Cobra's `fused-ldpnet`, after MobileVLM v2): a fused MLP, an average pool of the patch grid
to 14×14, then a depthwise 3×3 conv added back as a positional residual. Keys `projector.{0,2}`,
`projector.4.peg.0` (index 3, the pool, has no weights)."""

from __future__ import annotations

import math

import torch
from torch import nn


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, N, C] row-major patch tokens -> [B, C, h, h]."""
    b, n, c = x.shape
    h = math.isqrt(n)
    if h * h != n:
        raise ValueError(f"LDP projector needs a square patch grid, got {n} tokens")
    return x.transpose(1, 2).reshape(b, c, h, h), h


class TokenDownLayer(nn.Module):
    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.dwn = nn.Sequential(nn.AdaptiveAvgPool2d(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, _ = _grid(x)
        return self.dwn(grid).flatten(2).transpose(1, 2)


class PosInjectLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, _ = _grid(x)
        return (self.peg(grid) + grid).flatten(2).transpose(1, 2)


class FusedLDPProjector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, grid: int = 14):
        super().__init__()
        hidden = 4 * vision_dim
        self.projector = nn.Sequential(
            nn.Linear(vision_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, llm_dim),
            TokenDownLayer((grid, grid)),
            PosInjectLayer(llm_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)
