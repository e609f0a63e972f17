"""Causal depthwise conv1d for decode: the new input(s) against the rolling window, the state shifted
in place, bias and SiLU fused. One program per (sequence, block of channels)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_update_kernel(
    x, state, weight, bias, out,
    D, L, S, W,
    x_b, x_d, x_l, s_b, s_d, s_s, w_d, w_w, o_b, o_d, o_l,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    w = tl.arange(0, BLOCK_W)
    wt = tl.load(weight + d[:, None] * w_d + w[None, :] * w_w, mask=md[:, None] & (w < W)[None, :], other=0.0)
    wt = wt.to(tl.float32)
    if HAS_BIAS:
        bv = tl.load(bias + d, mask=md, other=0.0).to(tl.float32)
    # The sequence is state[0..S) followed by x[0..L); step l sees positions S + l - W + 1 ... S + l.
    for l in range(L):
        i = S + l - W + 1 + w
        from_state = i < S
        sv = tl.load(
            state + b * s_b + d[:, None] * s_d + i[None, :] * s_s,
            mask=md[:, None] & (from_state & (i >= 0) & (w < W))[None, :],
            other=0.0,
        )
        xv = tl.load(
            x + b * x_b + d[:, None] * x_d + (i - S)[None, :] * x_l,
            mask=md[:, None] & ((~from_state) & (w < W))[None, :],
            other=0.0,
        )
        y = tl.sum(wt * (sv.to(tl.float32) + xv.to(tl.float32)), axis=1)
        if HAS_BIAS:
            y += bv
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out + b * o_b + d * o_d + l * o_l, y.to(out.dtype.element_ty), mask=md)
    # New state: the last S positions of the sequence, gathered before anything is written.
    j = tl.arange(0, BLOCK_S)
    src = j + L
    ms = j < S
    old = tl.load(
        state + b * s_b + d[:, None] * s_d + src[None, :] * s_s, mask=md[:, None] & (ms & (src < S))[None, :]
    )
    new = tl.load(
        x + b * x_b + d[:, None] * x_d + (src - S)[None, :] * x_l,
        mask=md[:, None] & (ms & (src >= S))[None, :],
    )
    merged = tl.where((src < S)[None, :], old.to(tl.float32), new.to(tl.float32))
    tl.debug_barrier()
    tl.store(state + b * s_b + d[:, None] * s_d + j[None, :] * s_s, merged.to(state.dtype.element_ty),
             mask=md[:, None] & ms[None, :])  # fmt: skip


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None) -> torch.Tensor:
    """Same contract as `mambavl.ops.causal_conv1d_update`."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    squeeze = x.dim() == 2
    if squeeze:
        x = x[:, :, None]
    batch, dim, length = x.shape
    width, state_len = weight.shape[1], conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(
            f"conv_state holds {state_len} inputs; a width-{width} conv needs at least {width - 1}"
        )
    out = torch.empty_like(x)
    block_d = 64
    grid = (batch, triton.cdiv(dim, block_d))
    _conv_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, out,
        dim, length, state_len, width,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(state_len), BLOCK_W=triton.next_power_of_2(width),
    )  # fmt: skip
    return out[:, :, 0] if squeeze else out
