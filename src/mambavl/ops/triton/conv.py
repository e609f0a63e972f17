"""Causal depthwise conv1d in Triton: the sequence kernels (forward and backward, for prefill and training)
and the decode update (the new input(s) against the rolling window, the state shifted in place).

Sequence layout: x [B, D, L] with any strides, usually a transposed view of a channel-contiguous
[B, L, D] projection; outputs and input gradients take x's layout, so that writes stay coalesced.
The backward recomputes the pre-activation instead of saving it: only the inputs are kept for it. Each
input's gradient sums the gradients at the W pre-activations it feeds; the kernel recomputes those at the W
shifts from x and dy (cache hits), so that it writes nothing to memory but the input gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambavl.ops.dispatch import needs_grad
from mambavl.ops.triton.layout import channels_last, empty_like_layout

# Launch parameters of the sequence kernels, by x's layout ("channels": D contiguous; "time": L
# contiguous): (BLOCK_D, BLOCK_T, num_warps), chosen to stay well under 128 registers a thread on sm_90
# (the backward: 69 registers on time-contiguous x, 80 on channel-contiguous x, compiled for sm_90).
# PROGRAMS_PER_SM sets how many programs the backward aims for; each walks several time tiles, so that
# the weight-gradient partials stay few.
TILES = {
    "fwd_channels": (128, 16, 4),
    "fwd_time": (16, 128, 4),
    "bwd_channels": (32, 16, 4),
    "bwd_time": (16, 64, 4),
}
PROGRAMS_PER_SM = 128


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
    _check_activation(activation)
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


# --- the sequence: xc = [initial window (W-1 inputs, zeros if none), x]; y_t = act(b + Σ_k w_k xc_{t+k}).
# Positions below are x's: position p < 0 is column W-1+p of the initial window.


# The kernels address channels through row pointers (x + b·x_b + d·x_d, one per channel of the block) and
# take a time stride; helpers get p0, the first position of p, to skip the initial window where p ≥ 0.


@triton.jit
def _bias_vec(brow, md, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(brow, mask=md, other=0.0).to(tl.float32)
    return tl.zeros_like(md.to(tl.float32))


@triton.jit
def _silu(v, SILU: tl.constexpr):
    if SILU:
        return v * tl.sigmoid(v)
    return v


@triton.jit
def _silu_grad(dy, pre, SILU: tl.constexpr):
    """The gradient at the pre-activation from the output's."""
    if SILU:
        sg = tl.sigmoid(pre)
        return dy * sg * (1.0 + pre * (1.0 - sg))
    return dy


@triton.jit
def _inputs_at(xrow, irow, md, p, p0, live, x_l, i_s, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """The [BLOCK_D, len(p)] inputs at positions p (fp32), zero where not `live` or before the window."""
    v = tl.load(
        xrow[:, None] + p[None, :] * x_l, mask=md[:, None] & (live & (p >= 0))[None, :], other=0.0
    ).to(tl.float32)
    if HAS_INIT:  # noqa: SIM102
        if p0 < 0:  # a window column per position, broadcast in registers (no second 2D load layout)
            for j in tl.static_range(W - 1):
                col = tl.load(irow + j * i_s, mask=md, other=0.0).to(tl.float32)
                v += tl.where((live & (p == j - (W - 1)))[None, :], col[:, None], 0.0)
    return v


@triton.jit
def _preactivation(
    xrow, irow, wrow, brow, md, t, t0, live, x_l, i_s, w_w,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """b + Σ_k w_k x_{t-(W-1)+k} for the output positions t (t0 the first), fp32."""
    acc = tl.load(wrow, mask=md, other=0.0).to(tl.float32)[:, None] * _inputs_at(
        xrow, irow, md, t - (W - 1), t0 - (W - 1), live, x_l, i_s, W, HAS_INIT
    )
    for k in tl.static_range(1, W):
        wk = tl.load(wrow + k * w_w, mask=md, other=0.0).to(tl.float32)
        acc += wk[:, None] * _inputs_at(
            xrow, irow, md, t - (W - 1) + k, t0 - (W - 1) + k, live, x_l, i_s, W, HAS_INIT
        )
    return acc + _bias_vec(brow, md, HAS_BIAS)[:, None]


@triton.jit
def _conv_fwd_kernel(
    x, init, weight, bias, out,
    D, L,
    x_b, x_d, x_l, i_b, i_d, i_s, w_d, w_w, o_b, o_d, o_l,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    QUAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t0 = tl.program_id(2) * BLOCK_T
    t = t0 + tl.arange(0, BLOCK_T)
    md, mt = d < D, t < L
    xrow, irow, wrow, brow = x + b * x_b + d * x_d, init + b * i_b + d * i_d, weight + d * w_d, bias + d
    if QUAD:
        acc = _quad_preactivation(xrow, irow, wrow, brow, md, t, t0, L, x_l, i_s, w_w, W, HAS_INIT,
                                  HAS_BIAS, BLOCK_D, BLOCK_T)  # fmt: skip
    else:
        acc = _preactivation(xrow, irow, wrow, brow, md, t, t0, mt, x_l, i_s, w_w, W, HAS_INIT, HAS_BIAS)
    tl.store(
        out + b * o_b + d[:, None] * o_d + t[None, :] * o_l,
        _silu(acc, SILU).to(out.dtype.element_ty),
        mask=md[:, None] & mt[None, :],
    )


@triton.jit
def _output_grad(
    xrow, irow, wrow, brow, dyrow, md, t, t0, L, x_l, i_s, w_w, dy_l,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """The gradient at the pre-activation of outputs t (zero outside [0, L)): dy, times silu' if any."""
    live = (t >= 0) & (t < L)
    g = tl.load(dyrow[:, None] + t[None, :] * dy_l, mask=md[:, None] & live[None, :], other=0.0).to(
        tl.float32
    )
    if SILU:
        pre = _preactivation(xrow, irow, wrow, brow, md, t, t0, live, x_l, i_s, w_w, W, HAS_INIT, HAS_BIAS)
        g = _silu_grad(g, pre, SILU)
    return g


@triton.jit
def _final_grad(frow, md, p, L, f_s, W: tl.constexpr):
    """The final-window gradient at x positions p (the window is x's last W-1 entries)."""
    f = p - L + (W - 1)
    return tl.load(
        frow[:, None] + f[None, :] * f_s, mask=md[:, None] & ((f >= 0) & (f < W - 1))[None, :], other=0.0
    ).to(tl.float32)


@triton.jit
def _bwd_rows(
    x, init, weight, bias, dy, dfinal, D, x_b, x_d, i_b, i_d, w_d, dy_b, dy_d, f_b, f_d, BLOCK_D: tl.constexpr
):  # fmt: skip
    """A backward program's (sequence, channels, chunk along time), its channel mask and the row pointers
    of its channels into x, the initial window, the weights, the bias, dy and the final window's gradient."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    xrow, irow, wrow, brow = x + b * x_b + d * x_d, init + b * i_b + d * i_d, weight + d * w_d, bias + d
    dyrow, frow = dy + b * dy_b + d * dy_d, dfinal + b * f_b + d * f_d
    return b, d, tl.program_id(2), d < D, xrow, irow, wrow, brow, dyrow, frow


@triton.jit
def _store_dinit(
    xrow, irow, wrow, brow, dyrow, frow, dirow, md, L, x_l, i_s, w_w, dy_l, f_s, di_s,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """The initial window's gradient, positions -(W-1) ... -1: what the first outputs read of it."""
    p = tl.arange(0, BLOCK_W) - (W - 1)
    acc = tl.zeros([BLOCK_D, BLOCK_W], dtype=tl.float32)
    for j in tl.static_range(W):
        wj = tl.load(wrow + (W - 1 - j) * w_w, mask=md, other=0.0).to(tl.float32)
        gj = _output_grad(
            xrow, irow, wrow, brow, dyrow, md, p + j, -(W - 1) + j, L, x_l, i_s, w_w, dy_l,
            W, HAS_INIT, HAS_BIAS, SILU,
        )  # fmt: skip
        acc += wj[:, None] * gj
    if HAS_DFINAL:
        acc += _final_grad(frow, md, p, L, f_s, W)
    tl.store(
        dirow[:, None] + (p + W - 1)[None, :] * di_s,
        acc.to(dirow.dtype.element_ty),
        mask=md[:, None] & (p < 0)[None, :],
    )


@triton.jit
def _conv_bwd_kernel(
    x, init, weight, bias, dy, dfinal, dx, dinit, dw_part, db_part,
    D, L, TILES,
    x_b, x_d, x_l, i_b, i_d, i_s, w_d, w_w, dy_b, dy_d, dy_l, f_b, f_d, f_s, dx_b, dx_d, dx_l,
    di_b, di_d, di_s,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr, QUAD: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # Program (b, channel block, c) owns the time tiles [c·TILES, (c+1)·TILES). Per tile of positions p:
    # dx_p = Σ_j w_{W-1-j} g_{p+j}, with g the gradient at the pre-activation, recomputed at the shifts the
    # tile reads from x and dy (loads the cache serves: x, dy and dx each cross memory once, and nothing is
    # written but dx); the weight and bias gradients' partial sums take g at the tile's own positions and go
    # to row b·chunks + c of dw_part / db_part. QUAD (widths up to 4): the four-column form, BLOCK_W = 4
    # taps, tap k being weight k - (4 - W); else a shifted load of x or dy for each shift.
    b, d, c, md, xrow, irow, wrow, brow, dyrow, frow = _bwd_rows(
        x, init, weight, bias, dy, dfinal, D, x_b, x_d, i_b, i_d, w_d, dy_b, dy_d, f_b, f_d, BLOCK_D
    )
    kk = tl.arange(0, BLOCK_W)
    dw = tl.zeros([BLOCK_D, BLOCK_W], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(c * TILES, tl.minimum((c + 1) * TILES, tl.cdiv(L, BLOCK_T))):
        p0 = tile * BLOCK_T
        p = p0 + tl.arange(0, BLOCK_T)
        mp = p < L
        if QUAD:
            acc, g_sum, dw_tile = _quad_grads(
                xrow, irow, wrow, brow, dyrow, md, p, p0, L, x_l, i_s, w_w, dy_l,
                W, HAS_INIT, HAS_BIAS, SILU, BLOCK_D, BLOCK_T,
            )  # fmt: skip
            db += g_sum
            dw += dw_tile
        else:
            g = _output_grad(
                xrow, irow, wrow, brow, dyrow, md, p, p0, L, x_l, i_s, w_w, dy_l, W, HAS_INIT, HAS_BIAS, SILU
            )
            db += tl.sum(g, axis=1)
            for k in tl.static_range(W):
                xk = _inputs_at(xrow, irow, md, p - (W - 1) + k, p0 - (W - 1) + k, mp, x_l, i_s, W, HAS_INIT)
                dw += tl.where(kk[None, :] == k, tl.sum(g * xk, axis=1)[:, None], 0.0)
            acc = tl.load(wrow + (W - 1) * w_w, mask=md, other=0.0).to(tl.float32)[:, None] * g
            for j in tl.static_range(1, W):
                wj = tl.load(wrow + (W - 1 - j) * w_w, mask=md, other=0.0).to(tl.float32)
                gj = _output_grad(
                    xrow, irow, wrow, brow, dyrow, md, p + j, p0 + j, L, x_l, i_s, w_w, dy_l,
                    W, HAS_INIT, HAS_BIAS, SILU,
                )  # fmt: skip
                acc += wj[:, None] * gj
        if HAS_DFINAL:
            acc += _final_grad(frow, md, p, L, f_s, W)
        tl.store(
            dx + b * dx_b + d[:, None] * dx_d + p[None, :] * dx_l,
            acc.to(dx.dtype.element_ty),
            mask=md[:, None] & mp[None, :],
        )
    if STORE_DINIT:  # noqa: SIM102 (a compile-time flag, then a run-time test)
        if c == 0:
            _store_dinit(
                xrow, irow, wrow, brow, dyrow, frow, dinit + b * di_b + d * di_d, md, L, x_l, i_s, w_w, dy_l,
                f_s, di_s, W, HAS_INIT, HAS_BIAS, SILU, HAS_DFINAL, BLOCK_D, BLOCK_W,
            )  # fmt: skip
    row = b * tl.num_programs(2) + c
    k = kk - (BLOCK_W - W if QUAD else 0)  # the weight each column holds
    tl.store(
        dw_part + row * D * W + d[:, None] * W + k[None, :],
        dw,
        mask=md[:, None] & ((k >= 0) & (k < W))[None, :],
    )
    if HAS_BIAS:
        tl.store(db_part + row * D + d, db, mask=md)


# --- widths up to 4, the Mamba convs': the taps padded to four (tap 3 on the newest input, the missing
# leading taps zero), and every tile read as four columns, the positions 4g, 4g+1, 4g+2 and 4g+3. A shift
# by s is then a choice of column in the same group or a neighbour group's, so that each input is loaded
# in aligned vectors (the tile, the groups before it, the groups after it) instead of once per shift.
QUAD_WIDTH = 4


@triton.jit
def _quads(t, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """The four columns of a [BLOCK_D, BLOCK_T] tile, positions 4g + i for i = 0..3: [BLOCK_D, BLOCK_T // 4]
    each."""
    even, odd = tl.split(tl.reshape(t, [BLOCK_D, BLOCK_T // 4, 2, 2]))
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _unquads(c0, c1, c2, c3, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """The [BLOCK_D, BLOCK_T] tile of the four columns (`_quads` inverted)."""
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK_D, BLOCK_T])


@triton.jit
def _tap(wrow, md, w_w, k: tl.constexpr, W: tl.constexpr):
    """Tap k of the four-tap form, [BLOCK_D] fp32: weight k - (4 - W), zero for the padding."""
    return tl.load(wrow + (k - (4 - W)) * w_w, mask=md & (k >= 4 - W), other=0.0).to(tl.float32)


@triton.jit
def _pre_at(xs, taps, bv, o: tl.constexpr):
    """The pre-activation at column offset o (positions 4g + o) from xs, the columns from offset -4 on."""
    return bv + taps[0] * xs[o + 1] + taps[1] * xs[o + 2] + taps[2] * xs[o + 3] + taps[3] * xs[o + 4]


@triton.jit
def _quad_preactivation(
    xrow, irow, wrow, brow, md, t, t0, L, x_l, i_s, w_w,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """`_preactivation` for widths up to 4 (t0 a multiple of 4): two aligned loads of x, the tile and the
    groups before it."""
    taps = _taps(wrow, md, w_w, W)
    bv = _bias_vec(brow, md, HAS_BIAS)[:, None]
    before = _inputs_at(xrow, irow, md, t - 4, t0 - 4, t - 4 < L, x_l, i_s, W, HAS_INIT)
    here = _inputs_at(xrow, irow, md, t, t0, t < L, x_l, i_s, W, HAS_INIT)
    xs = _quads(before, BLOCK_D, BLOCK_T) + _quads(here, BLOCK_D, BLOCK_T)
    return _unquads(
        _pre_at(xs, taps, bv, 0), _pre_at(xs, taps, bv, 1),
        _pre_at(xs, taps, bv, 2), _pre_at(xs, taps, bv, 3), BLOCK_D, BLOCK_T,
    )  # fmt: skip


@triton.jit
def _taps(wrow, md, w_w, W: tl.constexpr):
    """The four taps, each [BLOCK_D, 1]."""
    return (
        _tap(wrow, md, w_w, 0, W)[:, None], _tap(wrow, md, w_w, 1, W)[:, None],
        _tap(wrow, md, w_w, 2, W)[:, None], _tap(wrow, md, w_w, 3, W)[:, None],
    )  # fmt: skip


@triton.jit
def _quad_grads(
    xrow, irow, wrow, brow, dyrow, md, p, p0, L, x_l, i_s, w_w, dy_l,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """One tile of the backward for widths up to 4: (dx of the tile without the final window's share, the
    tile's Σ g, its [BLOCK_D, 4] weight-gradient sums by tap). x is read as the tile and its neighbour groups
    on each side, dy as the tile and the groups after it; g is recomputed at the seven column offsets 0..6
    that the tile's input gradients read, dx_p = Σ_j w'_{3-j} g_{p+j}."""
    taps = _taps(wrow, md, w_w, W)
    bv = _bias_vec(brow, md, HAS_BIAS)[:, None]
    before = _inputs_at(xrow, irow, md, p - 4, p0 - 4, p - 4 < L, x_l, i_s, W, HAS_INIT)
    here = _inputs_at(xrow, irow, md, p, p0, p < L, x_l, i_s, W, HAS_INIT)
    after = _inputs_at(xrow, irow, md, p + 4, p0 + 4, p + 4 < L, x_l, i_s, W, HAS_INIT)
    xs = _quads(before, BLOCK_D, BLOCK_T) + _quads(here, BLOCK_D, BLOCK_T) + _quads(after, BLOCK_D, BLOCK_T)
    dy_here = tl.load(dyrow[:, None] + p[None, :] * dy_l, mask=md[:, None] & (p < L)[None, :], other=0.0)
    dy_after = tl.load(
        dyrow[:, None] + (p + 4)[None, :] * dy_l, mask=md[:, None] & (p + 4 < L)[None, :], other=0.0
    )
    dys = _quads(dy_here.to(tl.float32), BLOCK_D, BLOCK_T) + _quads(dy_after.to(tl.float32), BLOCK_D, BLOCK_T)
    g0 = _silu_grad(dys[0], _pre_at(xs, taps, bv, 0), SILU)
    g1 = _silu_grad(dys[1], _pre_at(xs, taps, bv, 1), SILU)
    g2 = _silu_grad(dys[2], _pre_at(xs, taps, bv, 2), SILU)
    g3 = _silu_grad(dys[3], _pre_at(xs, taps, bv, 3), SILU)
    g4 = _silu_grad(dys[4], _pre_at(xs, taps, bv, 4), SILU)
    g5 = _silu_grad(dys[5], _pre_at(xs, taps, bv, 5), SILU)
    g6 = _silu_grad(dys[6], _pre_at(xs, taps, bv, 6), SILU)
    # dw'_k = Σ_p g_p x_{p-3+k}: g's column i against x's column at offset i - 3 + k (xs[i + 1 + k])
    kk = tl.arange(0, 4)[None, :]
    dw = tl.where(kk == 0, tl.sum(g0 * xs[1] + g1 * xs[2] + g2 * xs[3] + g3 * xs[4], axis=1)[:, None], 0.0)
    dw += tl.where(kk == 1, tl.sum(g0 * xs[2] + g1 * xs[3] + g2 * xs[4] + g3 * xs[5], axis=1)[:, None], 0.0)
    dw += tl.where(kk == 2, tl.sum(g0 * xs[3] + g1 * xs[4] + g2 * xs[5] + g3 * xs[6], axis=1)[:, None], 0.0)
    dw += tl.where(kk == 3, tl.sum(g0 * xs[4] + g1 * xs[5] + g2 * xs[6] + g3 * xs[7], axis=1)[:, None], 0.0)
    dx = _unquads(
        taps[3] * g0 + taps[2] * g1 + taps[1] * g2 + taps[0] * g3,
        taps[3] * g1 + taps[2] * g2 + taps[1] * g3 + taps[0] * g4,
        taps[3] * g2 + taps[2] * g3 + taps[1] * g4 + taps[0] * g5,
        taps[3] * g3 + taps[2] * g4 + taps[1] * g5 + taps[0] * g6,
        BLOCK_D, BLOCK_T,
    )  # fmt: skip
    return dx, tl.sum(g0 + g1 + g2 + g3, axis=1), dw


# --- channel-contiguous x, widths up to 4: each program walks a run of steps one at a time over a block of
# channels (a coalesced row per step), with the last inputs (and in the backward the last gradients at the
# pre-activation) carried in registers: every input is loaded once, nothing is recomputed at a shift.
ROLL_BLOCK_D, ROLL_WARPS, ROLL_MIN_STEPS = 256, 2, 16


@triton.jit
def _x_row(xrow, irow, md, q, L, x_l, i_s, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """x at the one position q, [BLOCK_D] fp32: the initial window below 0, zero before it and from L on."""
    v = tl.load(xrow + q * x_l, mask=md & (q >= 0) & (q < L), other=0.0).to(tl.float32)
    if HAS_INIT:
        j = q + (W - 1)
        v += tl.load(irow + j * i_s, mask=md & (q < 0) & (j >= 0), other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv_fwd_roll_kernel(
    x, init, weight, bias, out,
    D, L, STEPS,
    x_b, x_d, x_l, i_b, i_d, i_s, w_d, w_w, o_b, o_d, o_l,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t0 = tl.program_id(2) * STEPS
    t1 = tl.minimum(t0 + STEPS, L)
    md = d < D
    xrow, irow, wrow = x + b * x_b + d * x_d, init + b * i_b + d * i_d, weight + d * w_d
    orow = out + b * o_b + d * o_d
    w0, w1 = _tap(wrow, md, w_w, 0, W), _tap(wrow, md, w_w, 1, W)
    w2, w3 = _tap(wrow, md, w_w, 2, W), _tap(wrow, md, w_w, 3, W)
    bv = _bias_vec(bias + d, md, HAS_BIAS)
    x3 = _x_row(xrow, irow, md, t0 - 3, L, x_l, i_s, W, HAS_INIT)  # x_{t-3}, x_{t-2}, x_{t-1}
    x2 = _x_row(xrow, irow, md, t0 - 2, L, x_l, i_s, W, HAS_INIT)
    x1 = _x_row(xrow, irow, md, t0 - 1, L, x_l, i_s, W, HAS_INIT)
    for t in range(t0, t1):
        x0 = tl.load(xrow + t * x_l, mask=md, other=0.0).to(tl.float32)
        y = _silu(bv + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0, SILU)
        tl.store(orow + t * o_l, y.to(out.dtype.element_ty), mask=md)
        x3, x2, x1 = x2, x1, x0


@triton.jit
def _conv_bwd_roll_kernel(
    x, init, weight, bias, dy, dfinal, dx, dinit, dw_part, db_part,
    D, L, STEPS,
    x_b, x_d, x_l, i_b, i_d, i_s, w_d, w_w, dy_b, dy_d, dy_l, f_b, f_d, f_s, dx_b, dx_d, dx_l,
    di_b, di_d, di_s,
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Program (b, channel block, c) owns the steps [t0, t1). At step t it forms g_t, the gradient at the
    # pre-activation, and then dx_{t-3} = w'_3 g_{t-3} + w'_2 g_{t-2} + w'_1 g_{t-1} + w'_0 g_t; it goes on
    # three steps past t1 (g there, not its own) to finish its last inputs' gradients. The first program of
    # a row ends in the initial window's gradient (positions -3..-1).
    b, d, c, md, xrow, irow, wrow, brow, dyrow, frow = _bwd_rows(
        x, init, weight, bias, dy, dfinal, D, x_b, x_d, i_b, i_d, w_d, dy_b, dy_d, f_b, f_d, BLOCK_D
    )
    t0 = c * STEPS
    t1 = tl.minimum(t0 + STEPS, L)
    dxrow, dirow = dx + b * dx_b + d * dx_d, dinit + b * di_b + d * di_d
    w0, w1 = _tap(wrow, md, w_w, 0, W), _tap(wrow, md, w_w, 1, W)
    w2, w3 = _tap(wrow, md, w_w, 2, W), _tap(wrow, md, w_w, 3, W)
    bv = _bias_vec(brow, md, HAS_BIAS)
    x3 = _x_row(xrow, irow, md, t0 - 3, L, x_l, i_s, W, HAS_INIT)
    x2 = _x_row(xrow, irow, md, t0 - 2, L, x_l, i_s, W, HAS_INIT)
    x1 = _x_row(xrow, irow, md, t0 - 1, L, x_l, i_s, W, HAS_INIT)
    g3 = tl.zeros([BLOCK_D], dtype=tl.float32)  # g_{t-3}, g_{t-2}, g_{t-1}: none before t0 is needed
    g2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    g1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(t0, t1 + 3):
        live = t < L
        x0 = tl.load(xrow + t * x_l, mask=md & live, other=0.0).to(tl.float32)
        g = tl.load(dyrow + t * dy_l, mask=md & live, other=0.0).to(tl.float32)
        g = _silu_grad(g, bv + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0, SILU)
        own = tl.where(t < t1, g, 0.0)
        db += own
        dw0 += own * x3
        dw1 += own * x2
        dw2 += own * x1
        dw3 += own * x0
        p = t - 3
        acc = w3 * g3 + w2 * g2 + w1 * g1 + w0 * g
        if HAS_DFINAL:
            f = p - L + (W - 1)
            acc += tl.load(frow + f * f_s, mask=md & (f >= 0) & (f < W - 1), other=0.0).to(tl.float32)
        tl.store(dxrow + p * dx_l, acc.to(dx.dtype.element_ty), mask=md & (p >= t0))
        if STORE_DINIT:
            tl.store(
                dirow + (p + W - 1) * di_s,
                acc.to(dinit.dtype.element_ty),
                mask=md & (c == 0) & (p < 0) & (p >= -(W - 1)),  # the first program's alone
            )
        x3, x2, x1 = x2, x1, x0
        g3, g2, g1 = g2, g1, g
    row = b * tl.num_programs(2) + c
    base = dw_part + row * D * W + d * W - (4 - W)  # tap k is weight k - (4 - W)
    tl.store(base + 0, dw0, mask=md & (W >= 4))
    tl.store(base + 1, dw1, mask=md & (W >= 3))
    tl.store(base + 2, dw2, mask=md & (W >= 2))
    tl.store(base + 3, dw3, mask=md)
    if HAS_BIAS:
        tl.store(db_part + row * D + d, db, mask=md)


def _check_activation(activation) -> None:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def _tiles(x: torch.Tensor, direction: str) -> tuple[int, int, int]:
    return TILES[f"{direction}_{'channels' if channels_last(x) else 'time'}"]


def _programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM
    return 4  # the interpreter: few programs, each walking more tiles


def _final_states(x: torch.Tensor, initial_states: torch.Tensor | None, width: int) -> torch.Tensor:
    """The last W-1 inputs of [initial window, x], fp32, in a new contiguous tensor."""
    batch, dim, length = x.shape
    keep = width - 1
    if keep == 0:
        return x.new_zeros(batch, dim, 0, dtype=torch.float32)
    if initial_states is not None:
        before = initial_states.float()
    else:
        before = x.new_zeros(batch, dim, keep, dtype=torch.float32)
    window = torch.cat([before, x[:, :, max(0, length - keep) :].float()], dim=-1)
    return window[:, :, window.shape[-1] - keep :].contiguous()


def _conv_forward(x, weight, bias, initial_states, activation) -> torch.Tensor:
    batch, dim, length = x.shape
    width = weight.shape[1]
    out = empty_like_layout(x, x.dtype)
    init = initial_states if initial_states is not None else x
    flags = dict(
        W=width, HAS_INIT=initial_states is not None, HAS_BIAS=bias is not None, SILU=activation is not None
    )
    args = (x, init, weight, bias if bias is not None else weight, out)
    strides = (*x.stride(), *init.stride(), *weight.stride(), *out.stride())
    if _rolls(x, width):
        d_blocks = triton.cdiv(dim, ROLL_BLOCK_D)
        steps, chunks = _roll_steps(x, batch * d_blocks, length)
        _conv_fwd_roll_kernel[(batch, d_blocks, chunks)](
            *args, dim, length, steps, *strides, **flags, BLOCK_D=ROLL_BLOCK_D, num_warps=ROLL_WARPS
        )
        return out
    block_d, block_t, warps = _tiles(x, "fwd")
    grid = (batch, triton.cdiv(dim, block_d), triton.cdiv(length, block_t))
    _conv_fwd_kernel[grid](
        *args, dim, length, *strides, **flags, QUAD=width <= QUAD_WIDTH, BLOCK_D=block_d, BLOCK_T=block_t,
        num_warps=warps,
    )  # fmt: skip
    return out


def _rolls(x: torch.Tensor, width: int) -> bool:
    """Whether the step-by-step kernels take x: channel-contiguous, a width of at most 4."""
    return channels_last(x) and width <= QUAD_WIDTH


def _roll_steps(x: torch.Tensor, rows: int, length: int) -> tuple[int, int]:
    """(steps a program walks, programs along time) for `rows` (sequence, channel block) pairs: enough
    programs to fill the GPU, none shorter than ROLL_MIN_STEPS steps (each also walks 3 steps past its
    share in the backward, and reads 3 before it)."""
    target = _programs_target(x.device) // 8 if x.device.type == "cuda" else 4  # 16 an SM: 32 warps
    want = triton.cdiv(target, rows)
    steps = max(triton.cdiv(length, want), min(ROLL_MIN_STEPS, length))
    return steps, triton.cdiv(length, steps)


def _conv_backward(x, weight, bias, initial_states, activation, dy, dfinal, want_dinit, dx_out=None):
    """(dx, dinitial_states or None, dweight, dbias or None); the weight gradients in fp32. dx is written
    into `dx_out` when given (x's shape and dtype, any layout)."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    if dx_out is not None and (dx_out.shape != x.shape or dx_out.dtype != x.dtype):
        raise ValueError("causal_conv1d backward: dx_out must have x's shape and dtype")
    dx = empty_like_layout(x, x.dtype) if dx_out is None else dx_out
    init = initial_states if initial_states is not None else x
    store_dinit = want_dinit and initial_states is not None and width > 1
    dinit = torch.empty_like(initial_states, memory_format=torch.contiguous_format) if store_dinit else dx
    rolls = _rolls(x, width)
    if rolls:
        block_d, warps = ROLL_BLOCK_D, ROLL_WARPS
        d_blocks = triton.cdiv(dim, block_d)
        tiles, chunks = _roll_steps(x, batch * d_blocks, length)  # steps a program, programs along time
    else:
        block_d, block_t, warps = _tiles(x, "bwd")
        d_blocks, t_tiles = triton.cdiv(dim, block_d), triton.cdiv(length, block_t)
        chunks = max(1, min(t_tiles, triton.cdiv(_programs_target(x.device), batch * d_blocks)))
        tiles = triton.cdiv(t_tiles, chunks)
        chunks = triton.cdiv(t_tiles, tiles)
    dw_part = torch.empty(batch * chunks, dim, width, device=x.device, dtype=torch.float32)
    db_part = (
        torch.empty(batch * chunks, dim, device=x.device, dtype=torch.float32)
        if bias is not None
        else dw_part
    )
    fin = dfinal if dfinal is not None else dy
    args = (
        x, init, weight, bias if bias is not None else weight, dy, fin, dx, dinit, dw_part, db_part,
        dim, length, tiles,
        *x.stride(), *init.stride(), *weight.stride(), *dy.stride(), *fin.stride(), *dx.stride(),
        *dinit.stride(),
    )  # fmt: skip
    flags = dict(
        W=width, HAS_INIT=initial_states is not None, HAS_BIAS=bias is not None, SILU=activation is not None,
        HAS_DFINAL=dfinal is not None, STORE_DINIT=store_dinit, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    grid = (batch, d_blocks, chunks)
    if rolls:
        _conv_bwd_roll_kernel[grid](*args, **flags)
    else:
        quad = width <= QUAD_WIDTH
        block_w = QUAD_WIDTH if quad else triton.next_power_of_2(width)
        _conv_bwd_kernel[grid](*args, **flags, QUAD=quad, BLOCK_T=block_t, BLOCK_W=max(2, block_w))
    dbias = db_part.sum(0) if bias is not None else None
    return dx, dinit if store_dinit else None, dw_part.sum(0), dbias


class _CausalConv1d(torch.autograd.Function):
    """Keeps only the inputs for the backward; the pre-activation is recomputed there."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, return_final_states, activation):
        y = _conv_forward(x, weight, bias, initial_states, activation)
        ctx.save_for_backward(x, weight, bias, initial_states)
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        if return_final_states:
            return y, _final_states(x, initial_states, weight.shape[1])
        return y

    @staticmethod
    def backward(ctx, dy, dfinal=None):
        x, weight, bias, initial_states = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dinit, dweight, dbias = _conv_backward(
            x, weight, bias, initial_states, ctx.activation, dy, dfinal, ctx.needs_input_grad[3]
        )
        if initial_states is not None and dinit is None and ctx.needs_input_grad[3]:
            dinit = torch.zeros_like(initial_states)  # a width-1 conv has no window to read
        return (
            dx,
            dweight.to(weight.dtype),
            dbias.to(bias.dtype) if dbias is not None else None,
            dinit,
            None,
            None,
        )


def causal_conv1d_fn(
    x, weight, bias=None, initial_states=None, return_final_states=False, activation=None
):  # fmt: skip
    """Same contract as `mambavl.ops.causal_conv1d_fn`, differentiable in x, weight, bias and
    initial_states (and through the returned final states, which are the last W-1 inputs, fp32).
    y takes x's layout: channel-contiguous for a transposed [B, L, D] view, else contiguous."""
    _check_activation(activation)
    width = weight.shape[1]
    if initial_states is not None and initial_states.shape[-1] != width - 1:
        raise ValueError(f"initial_states must hold {width - 1} inputs, got {initial_states.shape[-1]}")
    if needs_grad(x, weight, bias, initial_states):
        return _CausalConv1d.apply(x, weight, bias, initial_states, return_final_states, activation)
    y = _conv_forward(x, weight, bias, initial_states, activation)
    if return_final_states:
        return y, _final_states(x, initial_states, width)
    return y
