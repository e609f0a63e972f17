"""The Mamba-1 mixer's inner path, from in_proj's output to the gated scan output: causal conv1d + SiLU →
x_proj → dt_proj → selective scan (Δ bias and softplus, D, the z gate). mamba_ssm's `mamba_inner_fn`
without the two outer projections.

The reference composes the ops (each its own autograd node, as the mixer did). Under the Triton backend a
call that needs gradients runs one autograd node (`ops.triton.inner`) that keeps only in_proj's output,
x_proj's small output and the scan's chunk states, and recomputes the conv's output and Δ in the backward:
two [B, D, L] tensors a layer that do not live from the forward to the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.conv import causal_conv1d_fn
from mambavl.ops.dispatch import backend_for, needs_grad
from mambavl.ops.scan import selective_scan


def mamba1_inner(
    x: torch.Tensor,
    z: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_rank: int,
    d_state: int,
    backend: str | None = None,
) -> torch.Tensor:
    """y [B, D, L] from x, z [B, D, L] (in_proj's two halves), starting from a zero state.

    conv_weight [D, W] (bias [D] or None), x_proj_weight [R + 2N, D], dt_proj_weight [D, R], dt_bias [D],
    A [D, N] (the negative decay rates), D [D]. Δ = softplus(dt_proj(dt) + dt_bias)."""
    if backend_for(x, backend) == "triton" and needs_grad(
        x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D
    ):
        from mambavl.ops.triton.inner import mamba1_inner as fused

        return fused(
            x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, dt_rank, d_state
        )
    xc = causal_conv1d_fn(x, conv_weight, conv_bias, activation="silu", backend=backend)
    dt, B, C = F.linear(xc.transpose(1, 2), x_proj_weight).split([dt_rank, d_state, d_state], dim=-1)
    delta = (dt @ dt_proj_weight.T).transpose(1, 2)
    return selective_scan(
        xc, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z, dt_bias, True, backend=backend
    )
