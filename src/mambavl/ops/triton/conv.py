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


@triton.jit
def _conv_seq_kernel(
    x, init, weight, bias, out,
    D, L, W,
    x_b, x_d, x_l, i_b, i_d, i_s, w_d, w_w, o_b, o_d, o_l,
    HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, MAX_W: tl.constexpr,
):  # fmt: skip
    # Output tile [BLOCK_D, BLOCK_T]: y_t = Σ_k w_k x_{t - (W-1) + k}; inputs before 0 come from `init`
    # (its last W-1 columns), or are zero.
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    md, mt = d < D, t < L
    acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    for k in tl.static_range(MAX_W):
        if k < W:
            wk = tl.load(weight + d * w_d + k * w_w, mask=md, other=0.0).to(tl.float32)
            src = t - (W - 1) + k
            v = tl.load(
                x + b * x_b + d[:, None] * x_d + src[None, :] * x_l,
                mask=md[:, None] & (mt & (src >= 0))[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_INIT:  # src in [-(W-1), 0): column W-1+src of the initial window
                v += tl.load(
                    init + b * i_b + d[:, None] * i_d + (src + W - 1)[None, :] * i_s,
                    mask=md[:, None] & (mt & (src < 0))[None, :],
                    other=0.0,
                ).to(tl.float32)
            acc += wk[:, None] * v
    if HAS_BIAS:
        acc += tl.load(bias + d, mask=md, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(
        out + b * o_b + d[:, None] * o_d + t[None, :] * o_l,
        acc.to(out.dtype.element_ty),
        mask=md[:, None] & mt[None, :],
    )


def causal_conv1d_fn(x, weight, bias=None, initial_states=None, activation=None) -> torch.Tensor:
    """`mambavl.ops.causal_conv1d_fn` without `return_final_states` (forward only)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    batch, dim, length = x.shape
    width = weight.shape[1]
    if initial_states is not None and initial_states.shape[-1] != width - 1:
        raise ValueError(f"initial_states must hold {width - 1} inputs, got {initial_states.shape[-1]}")
    out = torch.empty(batch, dim, length, device=x.device, dtype=x.dtype)
    init = initial_states if initial_states is not None else x
    block_d, block_t = 32, 64
    grid = (batch, triton.cdiv(dim, block_d), triton.cdiv(length, block_t))
    _conv_seq_kernel[grid](
        x, init, weight, bias if bias is not None else weight, out,
        dim, length, width,
        *x.stride(), *init.stride(), *weight.stride(), *out.stride(),
        HAS_INIT=initial_states is not None, HAS_BIAS=bias is not None, SILU=activation is not None,
        BLOCK_D=block_d, BLOCK_T=block_t, MAX_W=triton.next_power_of_2(max(width, 2)),
    )  # fmt: skip
    return out
