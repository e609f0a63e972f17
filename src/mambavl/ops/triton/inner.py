"""`ops.mamba1_inner` for training in one autograd node: the conv, the two small projections and the scan
run forward as the composed ops do; the node keeps x and z (views of in_proj's output, kept for in_proj's
backward anyway), x_proj's output [B, L, R + 2N] and the scan's chunk states, and the backward recomputes the
conv's output and Δ before the scan's backward. Projections run under the caller's autocast, as F.linear
would, so the forward equals the composed ops exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.triton import conv, scan


def _recompute(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_rank, d_state, x_dbl=None):
    """The conv's output [B, D, L], x_proj's output [B, L, R + 2N], dt [B, L, R], Δ before its bias
    [B, D, L], and B, C [B, N, L] (views of x_proj's output)."""
    xc = conv._conv_forward(x, conv_weight, conv_bias, None, "silu")
    if x_dbl is None:
        x_dbl = F.linear(xc.transpose(1, 2), x_proj_weight)
    dt, B, C = x_dbl.split([dt_rank, d_state, d_state], dim=-1)
    delta = (dt @ dt_proj_weight.T.to(dt.dtype)).transpose(1, 2)  # what autocast does in the forward
    return xc, x_dbl, dt, delta, B.transpose(1, 2), C.transpose(1, 2)


class _Mamba1Inner(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, dt_rank, d_state
    ):
        tiles = scan.DEFAULT_TILES
        xc, x_dbl, _, delta, B, C = _recompute(
            x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_rank, d_state
        )
        B, C, D, dt_bias = scan.kernel_inputs(B, C, D, dt_bias)
        y, _, states = scan._forward(xc, delta, A, B, C, D, z, dt_bias, True, None, tiles, save_states=True)
        ctx.save_for_backward(
            x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, x_dbl, states
        )
        ctx.sizes, ctx.tiles = (dt_rank, d_state), tiles
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, x_dbl, states = (
            ctx.saved_tensors
        )
        dt_rank, d_state = ctx.sizes
        xc, _, dt, delta, B, C = _recompute(
            x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_rank, d_state, x_dbl
        )
        B, C, _, _ = scan.kernel_inputs(B, C, None, None)
        g = scan._backward(xc, delta, A, B, C, D, z, dt_bias, states, True, ctx.tiles, dy, None)
        ddelta = g["delta"]  # [B, D, L]
        # Δ = dt @ dt_proj_weightᵀ: through dt_proj, then x_proj's output, then x_proj into the conv's output
        d_dt = torch.matmul(ddelta.transpose(1, 2), dt_proj_weight.to(ddelta.dtype))  # [B, L, R]
        d_dt_proj = torch.matmul(ddelta.to(dt.dtype), dt).float().sum(0)  # [D, R]
        d_x_dbl = torch.cat(
            (d_dt, g["B"].transpose(1, 2).to(d_dt.dtype), g["C"].transpose(1, 2).to(d_dt.dtype)), -1
        )
        rows = d_x_dbl.reshape(-1, d_x_dbl.shape[-1])
        d_x_proj = rows.T @ xc.transpose(1, 2).reshape(rows.shape[0], -1).to(rows.dtype)
        dxc = g["u"] + torch.matmul(d_x_dbl, x_proj_weight.to(d_x_dbl.dtype)).transpose(1, 2)
        dx, _, d_conv_weight, d_conv_bias = conv._conv_backward(
            x, conv_weight, conv_bias, None, "silu", dxc.to(x.dtype), None, False
        )
        return (
            dx,
            g["z"],
            d_conv_weight,
            d_conv_bias,
            d_x_proj,
            d_dt_proj,
            g["delta_bias"],
            g["A"],
            g["D"],
            None,
            None,
        )


def mamba1_inner(
    x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, dt_rank, d_state
):
    """`ops.mamba1_inner`, differentiable in every tensor input."""
    return _Mamba1Inner.apply(
        x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, dt_rank, d_state
    )
