"""The Mamba-1 decode step between in_proj and out_proj (`mambavl.ops.mamba1_step`) in two kernels.

1. Per (sequence, block of channels): the conv window update with bias and SiLU, and that block's
   share of x_proj (a partial sum over its channels for every output of x_proj), written to a small
   fp32 buffer [B, blocks, R + 2N].
2. Per (sequence, block of channels): the partial sums reduced in a fixed order (deterministic, no
   atomics) into dt_low, B and C, their optional RMSNorms, dt_proj for the block's channels, softplus,
   the state update, the read-out through C, the skip D and the SiLU gate.

Everything between the two projections stays in fp32; only y is rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Channels per program in each kernel: the fastest of `mambavl bench --kernels --sweep` on an H200 at
# cobra+3b's sizes. Each program serves one sequence and reads its weight tiles again for the next, so
# the fused step wins only for a few sequences; `ops.mamba1_step` takes it up to FUSED_MAX_BATCH.
BLOCK_CONV, BLOCK_SCAN = 128, 32
FUSED_MAX_BATCH = 4


@triton.jit
def _conv_xproj_kernel(
    xz, conv_state, conv_w, conv_b, x_proj_w, xc, part,
    D, S, W, O,
    xz_b, xz_d, s_b, s_d, s_s, w_d, w_w, p_o, p_d, xc_b, part_b, part_p,
    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_O: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1)
    d = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    x = tl.load(xz + b * xz_b + d * xz_d, mask=md, other=0.0).to(tl.float32)
    # The conv sees sequence positions S-W+1 .. S: the window's last W-1 inputs, then x.
    j = tl.arange(0, BLOCK_W)
    i = S - W + 1 + j
    mw = md[:, None] & ((j < W) & (i < S))[None, :]
    win = tl.load(conv_state + b * s_b + d[:, None] * s_d + i[None, :] * s_s, mask=mw, other=0.0)
    win = tl.where((i == S)[None, :], x[:, None], win.to(tl.float32))
    wt = tl.load(conv_w + d[:, None] * w_d + j[None, :] * w_w, mask=md[:, None] & (j < W)[None, :], other=0.0)
    y = tl.sum(wt.to(tl.float32) * win, axis=1)
    if HAS_BIAS:
        y += tl.load(conv_b + d, mask=md, other=0.0).to(tl.float32)
    y = y * tl.sigmoid(y)
    # The window moves on by one: column s takes column s + 1, the last takes x.
    s = tl.arange(0, BLOCK_S)
    ms = md[:, None] & (s < S - 1)[None, :]
    moved = tl.load(conv_state + b * s_b + d[:, None] * s_d + (s + 1)[None, :] * s_s, mask=ms, other=0.0)
    moved = tl.where((s == S - 1)[None, :], x[:, None], moved.to(tl.float32))
    tl.debug_barrier()
    keep = md[:, None] & (s < S)[None, :]
    tl.store(
        conv_state + b * s_b + d[:, None] * s_d + s[None, :] * s_s,
        moved.to(conv_state.dtype.element_ty),
        keep,
    )
    tl.store(xc + b * xc_b + d, y, mask=md)
    o = tl.arange(0, BLOCK_O)
    wx = tl.load(
        x_proj_w + o[:, None] * p_o + d[None, :] * p_d, mask=(o < O)[:, None] & md[None, :], other=0.0
    )
    tl.store(part + b * part_b + pid * part_p + o, tl.sum(wx.to(tl.float32) * y[None, :], axis=1), mask=o < O)


@triton.jit
def _reduce(part, P, part_p, start, width, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """Σ over the P partial rows of columns [start, start + width), in a fixed order."""
    c = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        v = tl.load(
            part + p[:, None] * part_p + start + c[None, :],
            mask=(p < P)[:, None] & (c < width)[None, :],
            other=0.0,
        )
        acc += tl.sum(v, axis=0)
    return acc


@triton.jit
def _rms(v, n, w, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.arange(0, BLOCK)
    v = v * (1.0 / tl.sqrt(tl.sum(v * v, axis=0) / n + eps))
    if HAS_W:
        v = v * tl.load(w + c, mask=c < n, other=0.0).to(tl.float32)
    return v


@triton.jit
def _dt_state_kernel(
    xz, xc, part, dt_w, dt_b, A, Dskip, ssm, norm_dt, norm_b, norm_c, out,
    D, R, N, P, eps,
    xz_b, xz_d, xc_b, part_b, part_p, dw_d, dw_r, a_d, a_n, s_b, s_d, s_n, o_b, o_d,
    HAS_D: tl.constexpr, NORM: tl.constexpr, NORM_W: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    r = tl.arange(0, BLOCK_R)
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    pb = part + b * part_b
    dt_low = _reduce(pb, P, part_p, 0, R, BLOCK_P, BLOCK_R)
    Bv = _reduce(pb, P, part_p, R, N, BLOCK_P, BLOCK_N)
    Cv = _reduce(pb, P, part_p, R + N, N, BLOCK_P, BLOCK_N)
    if NORM:
        dt_low = _rms(dt_low, R, norm_dt, eps, NORM_W, BLOCK_R)
        Bv = _rms(Bv, N, norm_b, eps, NORM_W, BLOCK_N)
        Cv = _rms(Cv, N, norm_c, eps, NORM_W, BLOCK_N)
    wdt = tl.load(
        dt_w + d[:, None] * dw_d + r[None, :] * dw_r, mask=md[:, None] & (r < R)[None, :], other=0.0
    )
    dt = tl.sum(wdt.to(tl.float32) * dt_low[None, :], axis=1) + tl.load(dt_b + d, mask=md, other=0.0).to(
        tl.float32
    )
    dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    x = tl.load(xc + b * xc_b + d, mask=md, other=0.0)
    m2 = md[:, None] & mn[None, :]
    a = tl.load(A + d[:, None] * a_d + n[None, :] * a_n, mask=m2, other=0.0).to(tl.float32)
    s_ptr = ssm + b * s_b + d[:, None] * s_d + n[None, :] * s_n
    h = tl.load(s_ptr, mask=m2, other=0.0).to(tl.float32)
    h = h * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptr, h.to(ssm.dtype.element_ty), mask=m2)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(Dskip + d, mask=md, other=0.0).to(tl.float32)
    z = tl.load(xz + b * xz_b + (D + d) * xz_d, mask=md, other=0.0).to(tl.float32)
    y = y * (z * tl.sigmoid(z))
    tl.store(out + b * o_b + d * o_d, y.to(out.dtype.element_ty), mask=md)


def mamba1_step(
    xz,
    conv_state,
    ssm_state,
    conv_weight,
    conv_bias,
    x_proj_weight,
    dt_proj_weight,
    dt_proj_bias,
    A,
    D,
    bcdt_norm=None,
) -> torch.Tensor:
    """Same contract as `mambavl.ops.mamba1_step`."""
    batch, dim, S = conv_state.shape
    W = conv_weight.shape[1]
    if S < W - 1:
        raise ValueError(f"conv_state holds {S} inputs; a width-{W} conv needs at least {W - 1}")
    R, N = dt_proj_weight.shape[1], ssm_state.shape[-1]
    O = R + 2 * N
    blocks = triton.cdiv(dim, BLOCK_CONV)
    f32 = dict(dtype=torch.float32, device=xz.device)
    xc = torch.empty(batch, dim, **f32)
    part = torch.empty(batch, blocks, O, **f32)
    _conv_xproj_kernel[(blocks, batch)](
        xz, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, x_proj_weight,
        xc, part,
        dim, S, W, O,
        *xz.stride(), *conv_state.stride(), *conv_weight.stride(), *x_proj_weight.stride(), xc.stride(0),
        part.stride(0), part.stride(1),
        HAS_BIAS=conv_bias is not None, BLOCK_D=BLOCK_CONV, BLOCK_W=triton.next_power_of_2(W),
        BLOCK_S=triton.next_power_of_2(S), BLOCK_O=triton.next_power_of_2(O), num_warps=8,
    )  # fmt: skip
    out = torch.empty(batch, dim, dtype=xz.dtype, device=xz.device)
    norm = bcdt_norm is not None
    w_dt, w_b, w_c, eps = bcdt_norm if norm else (None, None, None, 0.0)
    weighted = norm and w_dt is not None
    if norm and ((w_b is None) != (not weighted) or (w_c is None) != (not weighted)):
        raise ValueError("mamba1_step: the dt, B and C norms must all have weights or all have none")
    dummy = xc
    _dt_state_kernel[(triton.cdiv(dim, BLOCK_SCAN), batch)](
        xz, xc, part, dt_proj_weight, dt_proj_bias, A, D if D is not None else dummy, ssm_state,
        w_dt if weighted else dummy, w_b if weighted else dummy, w_c if weighted else dummy, out,
        dim, R, N, blocks, float(eps),
        *xz.stride(), xc.stride(0), part.stride(0), part.stride(1), *dt_proj_weight.stride(), *A.stride(),
        *ssm_state.stride(), *out.stride(),
        HAS_D=D is not None, NORM=norm, NORM_W=weighted, BLOCK_D=BLOCK_SCAN,
        BLOCK_R=triton.next_power_of_2(R), BLOCK_N=triton.next_power_of_2(N), BLOCK_P=16, num_warps=4,
    )  # fmt: skip
    return out
