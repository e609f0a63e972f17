"""The time step Δ as every scan uses it: fp32, plus its bias, through softplus, clamped to a limit."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NO_LIMIT = (0.0, math.inf)


def timestep(
    dt: torch.Tensor,
    bias: torch.Tensor | None = None,
    softplus: bool = False,
    limit: tuple[float, float] = NO_LIMIT,
) -> torch.Tensor:
    """`bias` must broadcast against `dt`; `limit` clamps after softplus (Mamba-2's time_step_limit)."""
    dt = dt.float()
    if bias is not None:
        dt = dt + bias.float()
    if softplus:
        dt = F.softplus(dt)
    if tuple(limit) != NO_LIMIT:
        dt = dt.clamp(min=limit[0], max=limit[1])
    return dt
