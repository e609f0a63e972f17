"""The Mamba-1 mixer's inner path, from in_proj's output to the gated scan output: causal conv1d + SiLU →
x_proj → dt_proj → selective scan (Δ bias and softplus, D, the z gate) (`mamba1_inner`, mamba_ssm's
`mamba_inner_fn` without the two outer projections), and the whole mixer over sequences that start from a
zero state, in_proj and out_proj included (`mamba1_mixer`); and the Mamba-2 mixer from in_proj's output to
out_proj's (`mamba2_inner`: conv → SSD → gated RMSNorm → out_proj, mamba_ssm's
`mamba_split_conv1d_scan_combined`).

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
from mambavl.ops.linear import linear
from mambavl.ops.norms import rms_norm_gated
from mambavl.ops.scan import selective_scan
from mambavl.ops.ssd import mamba_chunk_scan_combined
from mambavl.ops.timestep import NO_LIMIT


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


def mamba1_mixer(
    hidden: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    dt_rank: int,
    d_state: int,
    backend: str | None = None,
) -> torch.Tensor:
    """The Mamba-1 mixer's output [B, L, d_model] from its input hidden [B, L, d_model], every sequence
    starting from a zero state: in_proj (in_proj_weight [2D, d_model]) → `mamba1_inner` → out_proj
    (out_proj_weight [d_model, D]).

    The reference composes in_proj, `mamba1_inner` and out_proj. Under the Triton backend a call that needs
    gradients runs one autograd node (`ops.triton.inner.mamba1_mixer`, as mamba_ssm's `mamba_inner_fn` with
    in_proj taken in) that computes in_proj as W·hᵀ, so that x, z, Δ, the scan's output and every gradient
    between the two projections are time-contiguous where they are made and no layout copy is needed."""
    if backend_for(hidden, backend) == "triton" and needs_grad(
        hidden, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
        dt_bias, A, D, out_proj_weight, out_proj_bias,
    ):  # fmt: skip
        from mambavl.ops.triton.inner import mamba1_mixer as fused

        return fused(
            hidden, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
            dt_bias, A, D, out_proj_weight, out_proj_bias, dt_rank, d_state,
        )  # fmt: skip
    # [B, D, L] views of the [B, L, D] halves: split on the last axis, so that the backward joins their
    # (channel-contiguous) gradients into in_proj's layout with one concatenation and no transpose
    x, z = (
        half.transpose(1, 2) for half in linear(hidden, in_proj_weight, in_proj_bias, backend).chunk(2, -1)
    )
    y = mamba1_inner(
        x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, dt_rank, d_state, backend
    )
    return linear(y.transpose(1, 2), out_proj_weight, out_proj_bias, backend)


def mamba2_inner(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    headdim: int,
    ngroups: int,
    d_state: int,
    chunk_size: int,
    norm_eps: float,
    norm_group_size: int,
    norm_before_gate: bool,
    dt_limit: tuple[float, float] = NO_LIMIT,
    backend: str | None = None,
) -> torch.Tensor:
    """The Mamba-2 mixer's output [B, L, d_model] from in_proj's output zxbcdt [B, L, 2D + 2GN + H] (z, then
    x, B, C through the causal conv1d + SiLU, then dt), every sequence from a zero state: the chunked SSD
    scan (Δ bias + softplus + limits, D per channel [D] or per head [H]), the gated RMSNorm over groups of
    `norm_group_size` channels, and out_proj (out_proj_weight [d_model, D]).

    The reference composes the ops. Under the Triton backend a call that needs gradients runs one autograd
    node (`ops.triton.inner.mamba2_inner`) that keeps zxbcdt and what the scan's backward reads (Δ, its
    running sum, C·Bᵀ, the chunk states) and recomputes the conv's output, the scan's output and the
    norm's in the backward: three [B, L, D] tensors a layer that do not live from forward to backward."""
    if backend_for(zxbcdt, backend) == "triton" and needs_grad(
        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias
    ):
        from mambavl.ops.triton.inner import mamba2_inner as fused

        return fused(
            zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias,
            headdim, ngroups, d_state, chunk_size, norm_eps, norm_group_size, norm_before_gate,
            tuple(dt_limit),
        )  # fmt: skip
    batch, length, _ = zxbcdt.shape
    d = out_proj_weight.shape[1]
    heads = d // headdim
    gn = ngroups * d_state
    z, xBC, dt = zxbcdt.split([d, d + 2 * gn, heads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv_weight, conv_bias, activation="silu", backend=backend)
    x, B, C = xBC.transpose(1, 2).split([d, gn, gn], dim=-1)
    y = mamba_chunk_scan_combined(
        x.view(batch, length, heads, headdim), dt, A, B.view(batch, length, ngroups, d_state),
        C.view(batch, length, ngroups, d_state), chunk_size,
        D=D.view(heads, headdim) if D.numel() == d else D,
        dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit, backend=backend,
    )  # fmt: skip
    y = rms_norm_gated(
        y.reshape(batch, length, d), norm_weight, z, norm_eps, norm_group_size, norm_before_gate, backend
    )
    return linear(y, out_proj_weight, out_proj_bias, backend)
