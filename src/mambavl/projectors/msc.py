"""ML-Mamba's Mamba-2 Scan Connector as released: `mlp` (Linear + GELU) → `bidirectional_mamba` (2 blocks
of a bidirectional Mamba-2 mixer and a SwiGLU, then a LayerNorm) → `projector` (fused GELU MLP).

Facts from the release (ML-Mamba's VLM and its mamba_ssm fork, `Bidirectional_Mamba`, bimamba v2):
- a block is `x = x + mixer(x); x = x + SwiGLU(LayerNorm(x))` — no norm before the mixer;
- the mixer shares in_proj, the gated RMSNorm and out_proj between directions; conv1d, dt_bias, A_log and
  D have a second copy with suffix `_b` for the time-reversed pass; out_proj((fwd + flip(bwd)) / 2);
- Mamba-2 settings of state-spaces/mamba2-2.7b: d_state 128, headdim 64, ngroups 1, chunk 256, expand 2;
- SwiGLU `w3(silu(w1 x) * w2 x)` with biases, hidden = width; LayerNorms with bias, eps 1e-5.
The patches are scanned as a 1-D sequence in row-major order, forwards and backwards (the paper's 2-D
multi-direction scans are not in the released code).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambavl import ops
from mambavl.lm.config import LMConfig
from mambavl.lm.mamba1 import conv_step, depthwise_conv
from mambavl.lm.mamba2 import Mamba2Mixer
from mambavl.projectors.mlp import FusedMLPProjector

# Scan orders over a square patch grid; each direction after the first has its own conv / dt_bias / A_log / D
# with a suffix (the release's second direction is `_b`; `_c`, `_d` are our 4-direction option's).
SUFFIXES = ("", "_b", "_c", "_d")


def scan_orders(n_tokens: int, directions: int, device=None) -> list[torch.Tensor | None]:
    """Token permutations for each direction: row-major, its reverse, then column-major and its reverse
    (None: the identity), made on `device` (no copy from the host: the towers' CUDA graphs capture them)."""
    rev = torch.arange(n_tokens - 1, -1, -1, device=device)
    if directions == 2:
        return [None, rev]
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"a 4-direction cross-scan needs a square patch grid, got {n_tokens} tokens")
    cols = torch.arange(n_tokens, device=device).view(side, side).t().flatten()
    return [None, rev, cols, cols.flip(0)]


class BiMamba2Mixer(Mamba2Mixer):
    """`directions=2`: the released bidirectional mixer; `directions=4`: also column-major scans."""

    def __init__(self, cfg: LMConfig, directions: int = 2):
        super().__init__(cfg)
        if directions not in (2, 4):
            raise ValueError(f"directions must be 2 (as released) or 4 (cross-scan), got {directions}")
        self.directions = directions
        for suffix in SUFFIXES[1:directions]:
            setattr(self, "conv1d" + suffix, depthwise_conv(self.conv_dim, cfg))
            for name in ("dt_bias", "A_log", "D"):
                setattr(self, name + suffix, nn.Parameter(getattr(self, name).detach().clone()))

    def _direction(self, z, xBC, dt, suffix: str) -> torch.Tensor:
        batch, T, _ = z.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        conv = getattr(self, "conv1d" + suffix)
        xBC = conv_step(xBC.transpose(1, 2), conv, None).transpose(1, 2)
        x, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        y = ops.mamba_chunk_scan_combined(
            x.reshape(batch, T, h, p),
            dt,
            -torch.exp(getattr(self, "A_log" + suffix).float()),
            B.reshape(batch, T, g, n),
            C.reshape(batch, T, g, n),
            self.chunk_size,
            D=getattr(self, "D" + suffix),
            dt_bias=getattr(self, "dt_bias" + suffix),
            dt_softplus=True,
            dt_limit=self.dt_limit,
        )
        return self.norm(y.reshape(batch, T, self.d_inner), z)

    def forward(self, hidden: torch.Tensor, state=None, valid=None) -> torch.Tensor:
        if state is not None or valid is not None:
            raise ValueError("the bidirectional connector reads whole images: it takes no state or padding")
        parts = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        total = 0
        orders = scan_orders(hidden.shape[1], self.directions, hidden.device)
        for suffix, order in zip(SUFFIXES, orders, strict=False):
            if order is None:
                total = total + self._direction(*parts, suffix)
                continue
            y = self._direction(*(t[:, order] for t in parts), suffix)
            total = total + torch.empty_like(y).index_copy_(1, order, y)  # back to row-major positions
        return self.out_proj(total / self.directions)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class BiMambaBlock(nn.Module):
    def __init__(self, cfg: LMConfig, directions: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.mixer = BiMamba2Mixer(cfg, directions)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(x)
        return x + self.mlp(self.norm(x))


class BidirectionalMamba(nn.Module):
    def __init__(self, cfg: LMConfig, directions: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(BiMambaBlock(cfg, directions) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x)


def connector_config(llm_dim: int, n_layer: int = 2, **mamba2) -> LMConfig:
    """The connector's Mamba-2 settings (those of state-spaces/mamba2-2.7b unless overridden)."""
    settings = dict(d_state=128, headdim=64, ngroups=1, chunk_size=256, expand=2, d_conv=4) | mamba2
    return LMConfig(
        family="mamba2", default_mixer="mamba2", d_model=llm_dim, n_layer=n_layer, vocab_size=1, **settings
    )


class MSCProjector(nn.Module):
    """`msc`: checkpoint groups `mlp`, `bidirectional_mamba`, `projector` map to these submodules.
    `directions=4` adds column-major scans over the patch grid (the paper's 2-D idea; not in the release)."""

    SEED_GROUPS = ("mlp", "bidirectional_mamba", "projector")

    def __init__(self, vision_dim: int, llm_dim: int, n_layer: int = 2, directions: int = 2, **mamba2):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU())
        self.bidirectional_mamba = BidirectionalMamba(
            connector_config(llm_dim, n_layer, **mamba2), directions
        )
        self.projector = FusedMLPProjector(llm_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(self.bidirectional_mamba(self.mlp(features)))
