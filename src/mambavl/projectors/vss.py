"""VL-Mamba's connector, VSS-L2 (the paper's final choice): V' = Linear(V); V_out = Linear(Norm(VSS(GELU(V'))
+ V')). VSS scans the patch grid with a selective SSM in several directions and merges the results.

VL-Mamba released no code, so no checkpoint names exist to match: the VSS here follows VMamba's SS2D,
which VL-Mamba names as its base — in_proj → depthwise 3×3 conv + SiLU → K selective scans (row-major,
column-major, and both reversed; or the paper's default bidirectional pair) with per-direction x_proj /
dt_proj / A / D → outputs mapped back and summed → LayerNorm → gate silu(z) → out_proj. Parameter names
are SS2D's (`x_proj_weight`, `dt_projs_weight`, `dt_projs_bias`, `A_logs`, `Ds`, `out_norm`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambavl import ops


class SS2D(nn.Module):
    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 3, expand: int = 2, directions: int = 4):
        super().__init__()
        if directions not in (2, 4):
            raise ValueError(f"directions must be 2 (bidirectional) or 4 (cross-scan), got {directions}")
        d_inner, rank = expand * dim, math.ceil(dim / 16)
        self.d_inner, self.d_state, self.rank, self.K = d_inner, d_state, rank, directions
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True
        )
        self.x_proj_weight = nn.Parameter(
            torch.randn(directions, rank + 2 * d_state, d_inner) * d_inner**-0.5
        )
        self.dt_projs_weight = nn.Parameter(torch.randn(directions, d_inner, rank) * rank**-0.5)
        self.dt_projs_bias = nn.Parameter(torch.full((directions, d_inner), math.log(math.expm1(0.01))))
        A = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(directions * d_inner, 1)
        self.A_logs = nn.Parameter(A)
        self.Ds = nn.Parameter(torch.ones(directions * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def scans(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D, H, W] -> the K scans [B, K, D, H·W]: row-major, column-major, then both reversed."""
        b, d, h, w = x.shape
        rows, cols = x.reshape(b, d, h * w), x.transpose(2, 3).reshape(b, d, h * w)
        if self.K == 2:
            return torch.stack([rows, rows.flip(-1)], dim=1)
        return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)

    def merge(self, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, K, D, L] scan outputs -> their sum in row-major order [B, D, L]."""
        b, _, d, length = y.shape
        if self.K == 2:
            return y[:, 0] + y[:, 1].flip(-1)

        def from_cols(t):
            return t.reshape(b, d, w, h).transpose(2, 3).reshape(b, d, length)

        return y[:, 0] + y[:, 2].flip(-1) + from_cols(y[:, 1]) + from_cols(y[:, 3].flip(-1))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid [B, H, W, dim] -> [B, H, W, dim]."""
        b, h, w, _ = grid.shape
        x, z = self.in_proj(grid).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        xs = self.scans(x)  # [B, K, D, L]
        dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = dbl.split([self.rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        y = ops.selective_scan(
            xs.reshape(b, -1, h * w),
            dts.reshape(b, -1, h * w),
            -torch.exp(self.A_logs.float()),
            Bs,  # [B, K, N, L]: direction k's B serves its own block of channels
            Cs,
            self.Ds,
            delta_bias=self.dt_projs_bias.reshape(-1),
            delta_softplus=True,
        ).reshape(b, self.K, self.d_inner, h * w)
        y = self.merge(y, h, w).transpose(1, 2).reshape(b, h, w, self.d_inner)
        return self.out_proj(self.out_norm(y) * F.silu(z))


class VSSProjector(nn.Module):
    """`vss-l2`: proj_in (Linear v→l) → GELU → VSS over the patch grid → + residual → LayerNorm → proj_out."""

    def __init__(self, vision_dim: int, llm_dim: int, directions: int = 4, **ss2d):
        super().__init__()
        self.proj_in = nn.Linear(vision_dim, llm_dim)
        self.vss = SS2D(llm_dim, directions=directions, **ss2d)
        self.norm = nn.LayerNorm(llm_dim)
        self.proj_out = nn.Linear(llm_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, _ = features.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"the VSS connector needs a square patch grid, got {n} tokens")
        v = self.proj_in(features)
        scanned = self.vss(F.gelu(v).view(b, side, side, -1)).view(b, n, -1)
        return self.proj_out(self.norm(scanned + v))
