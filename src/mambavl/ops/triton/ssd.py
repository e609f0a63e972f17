"""Mamba-2's chunked SSD scan in Triton: the forward in five kernels, and its backward.

1. `_dt_cumsum_kernel`: Δ (bias, softplus, clamp) and Acum, the running sum of Δ·A inside each chunk.
2. `_chunk_cb_kernel`: C·Bᵀ of every chunk, once per group (its heads share it), above the diagonal skipped.
3. `_chunk_state_kernel`: each chunk's own part of its end state, Σ_s exp(Acum_end - Acum_s) Δ_s x_s B_sᵀ.
4. `_state_passing_kernel`: the recurrence over chunks: every chunk's start state, and the final state.
5. `_chunk_scan_kernel`: y_l = Σ_{s<=l} (C_l·B_s) exp(Acum_l - Acum_s) Δ_s x_s + exp(Acum_l) C_l·start
   + D x_l, then the SiLU gate.

The backward (`_ChunkScan`), six kernels: the gate's (y recomputed by 5, only when z is given); the
recurrence backwards, each chunk's own start-state gradient computed on the way (end-state gradients,
dinit); dC·Bᵀ summed over a group's heads; dx; dC; dB; and last dΔ, dA, ddt_bias from the gradient of Acum,
gathered per position by the others. Saved: the inputs, Δ and Acum, C·Bᵀ and the start states; nothing
[chunk, chunk] per head leaves a kernel.

The matmuls are `tl.dot` on tiles of at least 16 along every side, masked where a size is smaller or odd
(a partial last chunk included), and accumulate in fp32; Δ, Acum, C·Bᵀ and the states are fp32. Operands:
fp32 inputs multiply as tf32x3 (about fp32's accuracy); 16-bit inputs, by default, as 16-bit values, the
fp32 intermediates that enter a matmul rounded to them (`DOT_16BIT`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambavl.ops.dispatch import interpreting, needs_grad
from mambavl.ops.timestep import NO_LIMIT


@triton.jit
def _softplus(v):
    """torch's softplus (the identity above 20), its log1p to full relative precision (Kahan's trick)."""
    u = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(v > 20.0, v, log1p)


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b, the operands rounded to DOT_DTYPE."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)


@triton.jit
def _dt_cumsum_kernel(
    dt, A, dt_bias, dt_out, acum, L, H, nchunks, chunk_size, dt_min, dt_max,
    dt_b, dt_l, dt_h, a_h, bias_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_CS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // nchunks).to(tl.int64)
    c = pid % nchunks
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    s = tl.arange(0, BLOCK_CS)
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    mh = h < H
    m = mh[:, None] & (s < valid)[None, :]
    ptr = dt + b * dt_b + (c * chunk_size).to(tl.int64) * dt_l + h[:, None] * dt_h + s[None, :] * dt_l
    d = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        d += tl.load(dt_bias + h * bias_h, mask=mh, other=0.0).to(tl.float32)[:, None]
    if SOFTPLUS:
        d = _softplus(d)
    if CLAMP:
        d = tl.minimum(tl.maximum(d, dt_min), dt_max)
    d = tl.where(m, d, 0.0)  # padding past the end: Δ = 0, an exact identity step
    a = tl.load(A + h * a_h, mask=mh, other=0.0).to(tl.float32)
    cum = tl.cumsum(d * a[:, None], axis=1)
    off = ((b * H + h[:, None]) * nchunks + c) * chunk_size + s[None, :]  # [B, H, nchunks, chunk_size]
    ms = mh[:, None] & (s < chunk_size)[None, :]
    tl.store(dt_out + off, d, mask=ms)
    tl.store(acum + off, cum, mask=ms)


@triton.jit
def _chunk_cb_kernel(
    C, B, cb, L, N, nchunks, chunk_size,
    c_b, c_l, c_g, c_n, b_b, b_l, b_g, b_n, cb_b, cb_c, cb_g, cb_m,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // nchunks).to(tl.int64)
    c = pid % nchunks
    g = tl.program_id(1)
    k_blocks = tl.cdiv(chunk_size, BLOCK_K)
    mb = tl.program_id(2) // k_blocks
    kb = tl.program_id(2) % k_blocks
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    mm, mk = m < valid, k < valid
    l0 = (c * chunk_size).to(tl.int64)
    c_ptr = C + b * c_b + l0 * c_l + g * c_g
    b_ptr = B + b * b_b + l0 * b_l + g * b_g
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    # Blocks wholly above the diagonal are never read: left unwritten.
    n_end = tl.where(kb * BLOCK_K < (mb + 1) * BLOCK_M, N, 0)
    for n0 in range(0, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mn = n < N
        cm = tl.load(c_ptr + m[:, None] * c_l + n[None, :] * c_n, mask=mm[:, None] & mn[None, :], other=0.0)
        bk = tl.load(b_ptr + k[None, :] * b_l + n[:, None] * b_n, mask=mn[:, None] & mk[None, :], other=0.0)
        acc = _dot(cm, bk, acc, DOT_DTYPE, DOT_PRECISION)
    out = cb + b * cb_b + c * cb_c + g * cb_g + m[:, None] * cb_m + k[None, :]
    tl.store(out, acc, mask=(m < chunk_size)[:, None] & (k < chunk_size)[None, :] & (n_end > 0))


@triton.jit
def _chunk_state_kernel(
    x, B, dt_out, acum, states, L, H, P, N, nchunks, chunk_size, heads_per_group,
    x_b, x_l, x_h, x_p, b_b, b_l, b_g, b_n, st_b, st_c, st_h, st_p,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    n_blocks = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(P, BLOCK_P) * n_blocks
    pid = tl.program_id(0)  # (sequence, chunk, tile), the tile fastest
    b = (pid // (nchunks * tiles)).to(tl.int64)
    c = (pid // tiles) % nchunks
    tile = pid % tiles
    h = tl.program_id(1)
    g = h // heads_per_group
    p = (tile // n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tile % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mp, mn = p < P, n < N
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    l0 = (c * chunk_size).to(tl.int64)
    x_ptr = x + b * x_b + l0 * x_l + h * x_h
    b_ptr = B + b * b_b + l0 * b_l + g * b_g
    t_off = ((b * H + h) * nchunks + c) * chunk_size
    a_end = tl.load(acum + t_off + chunk_size - 1)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, valid, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < valid
        ak = tl.load(acum + t_off + k, mask=mk, other=0.0)
        dk = tl.load(dt_out + t_off + k, mask=mk, other=0.0)
        w = tl.where(mk, dk * tl.exp(a_end - ak), 0.0)  # Δ_s times the decay from s to the chunk's end
        xk = tl.load(x_ptr + p[:, None] * x_p + k[None, :] * x_l, mask=mp[:, None] & mk[None, :], other=0.0)
        bk = tl.load(b_ptr + k[:, None] * b_l + n[None, :] * b_n, mask=mk[:, None] & mn[None, :], other=0.0)
        acc = _dot(xk.to(tl.float32) * w[None, :], bk, acc, DOT_DTYPE, DOT_PRECISION)
    out = states + b * st_b + c * st_c + h * st_h + p[:, None] * st_p + n[None, :]
    tl.store(out, acc, mask=mp[:, None] & mn[None, :])


@triton.jit
def _state_passing_kernel(
    states, acum, init, starts, final, H, N, PN, nchunks, chunk_size,
    st_b, st_c, st_h, i_b, i_h, i_p, i_n, f_b, f_h,
    HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """`starts` (laid out like `states`) gets each chunk's start state, in its own dtype."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)  # flat (p, n)
    m = offs < PN
    if HAS_INIT:
        i_ptr = init + b * i_b + h * i_h + (offs // N) * i_p + (offs % N) * i_n
        s = tl.load(i_ptr, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    off = b * st_b + h * st_h + offs
    a_ptr = acum + (b * H + h) * nchunks * chunk_size + chunk_size - 1
    own = tl.load(states + off, mask=m, other=0.0)
    a = tl.load(a_ptr)
    for c in range(nchunks):
        tl.store(starts + off, s.to(starts.dtype.element_ty), mask=m)
        more = c + 1 < nchunks  # the next chunk's loads go out before this step's update
        own_next = tl.load(states + off + st_c, mask=m & more, other=0.0)
        a_next = tl.load(a_ptr + chunk_size, mask=more, other=0.0)
        s = s * tl.exp(a) + own
        own, a = own_next, a_next
        off += st_c
        a_ptr += chunk_size
    tl.store(final + b * f_b + h * f_h + offs, s, mask=m)


@triton.jit
def _chunk_scan_kernel(
    cb, x, z, C, starts, dt_out, acum, D, out, dout, dz, L, H, P, N, nchunks, chunk_size, heads_per_group,
    cb_b, cb_c, cb_g, cb_m,
    x_b, x_l, x_h, x_p, z_b, z_l, z_h, z_p, c_b, c_l, c_g, c_n,
    st_b, st_c, st_h, st_p, d_h, d_p, o_b, o_l, o_h, o_p, do_b, do_l, do_h, do_p, dz_b, dz_l, dz_h, dz_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GATE_BWD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y = out; with GATE_BWD (the backward, z given) y is recomputed, not stored: `out` gets
    dy = dout·silu(z) and `dz` the gate's gradient dout·y·silu'(z)."""
    p_blocks = tl.cdiv(P, BLOCK_P)
    tiles = tl.cdiv(chunk_size, BLOCK_M) * p_blocks
    pid = tl.program_id(0)  # (sequence, chunk, tile), the tile fastest: a chunk's tiles share its start
    b = (pid // (nchunks * tiles)).to(tl.int64)
    c = (pid // tiles) % nchunks
    tile = pid % tiles
    h = tl.program_id(1)
    g = h // heads_per_group
    mb = tile // p_blocks
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    p = (tile % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    mm, mp = m < valid, p < P
    l0 = (c * chunk_size).to(tl.int64)
    t_off = ((b * H + h) * nchunks + c) * chunk_size
    am = tl.load(acum + t_off + m, mask=mm, other=0.0)

    # the state at the chunk's start, read through C and decayed to each position
    c_ptr = C + b * c_b + l0 * c_l + g * c_g
    st_ptr = starts + b * st_b + c * st_c + h * st_h
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mn = n < N
        cm = tl.load(c_ptr + m[:, None] * c_l + n[None, :] * c_n, mask=mm[:, None] & mn[None, :], other=0.0)
        sv = tl.load(st_ptr + n[:, None] + p[None, :] * st_p, mask=mn[:, None] & mp[None, :], other=0.0)
        acc = _dot(cm, sv, acc, DOT_DTYPE, DOT_PRECISION)
    acc *= tl.exp(am)[:, None]

    # inside the chunk: the causal, decayed C·Bᵀ against Δx. Left of the diagonal a block's decay factors
    # through its last position e, exp(Acum_l - Acum_s) = exp(Acum_l - Acum_e) exp(Acum_e - Acum_s), both
    # at most 1 for A <= 0: an exp per row and per column rather than one per entry.
    cb_ptr = cb + b * cb_b + c * cb_c + g * cb_g + m[:, None] * cb_m
    x_ptr = x + b * x_b + l0 * x_l + h * x_h
    m0 = mb * BLOCK_M
    for k0 in range(0, tl.where(m0 < valid, m0, 0), BLOCK_M):  # whole blocks before m0 < valid
        k = k0 + tl.arange(0, BLOCK_M)
        s = tl.load(cb_ptr + k[None, :], mask=mm[:, None], other=0.0)
        a_e = tl.load(acum + t_off + k0 + BLOCK_M - 1)
        rows = tl.where(mm, tl.exp(am - a_e), 0.0)
        cols = tl.exp(a_e - tl.load(acum + t_off + k)) * tl.load(dt_out + t_off + k)
        s = s * rows[:, None] * cols[None, :]
        xk = tl.load(x_ptr + k[:, None] * x_l + p[None, :] * x_p, mask=mp[None, :], other=0.0)
        acc = _dot(s, xk, acc, DOT_DTYPE, DOT_PRECISION)
    m2 = mm[:, None] & mp[None, :]
    if m0 < valid:  # the diagonal block, masked to s <= l; then the skip connection
        s = tl.load(cb_ptr + m[None, :], mask=mm[:, None] & mm[None, :], other=0.0)
        dm = tl.load(dt_out + t_off + m, mask=mm, other=0.0)
        causal = m[:, None] >= m[None, :]
        s *= tl.exp(tl.where(causal, am[:, None] - am[None, :], float("-inf"))) * dm[None, :]
        xm = tl.load(x_ptr + m[:, None] * x_l + p[None, :] * x_p, mask=m2, other=0.0)
        acc = _dot(s, xm, acc, DOT_DTYPE, DOT_PRECISION)
        if HAS_D:
            dv = tl.load(D + h * d_h + p * d_p, mask=mp, other=0.0).to(tl.float32)
            acc += xm.to(tl.float32) * dv[None, :]
    if HAS_Z:
        z_ptr = z + b * z_b + l0 * z_l + h * z_h + m[:, None] * z_l + p[None, :] * z_p
        zm = tl.load(z_ptr, mask=m2, other=0.0).to(tl.float32)
        if GATE_BWD:
            sg = tl.sigmoid(zm)
            do_ptr = dout + b * do_b + l0 * do_l + h * do_h + m[:, None] * do_l + p[None, :] * do_p
            dom = tl.load(do_ptr, mask=m2, other=0.0).to(tl.float32)
            dz_ptr = dz + b * dz_b + l0 * dz_l + h * dz_h + m[:, None] * dz_l + p[None, :] * dz_p
            tl.store(dz_ptr, (dom * acc * sg * (1.0 + zm * (1.0 - sg))).to(dz.dtype.element_ty), mask=m2)
            acc = dom * zm * sg
        else:
            acc *= zm * tl.sigmoid(zm)
    o_ptr = out + b * o_b + l0 * o_l + h * o_h + m[:, None] * o_l + p[None, :] * o_p
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------------------
# The backward. Notation per chunk and head: Δ_s, Acum_l, dy_l (the gradient of y before the gate), H the
# chunk's start state, dS the gradient of its end state. The gradient of every Acum_l (dAcum) is gathered
# per position and turned into Δ's and A's by one reverse cumsum at the end (`_bwd_dt_kernel`).
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _state_passing_bwd_kernel(
    dy, C, starts, acum, dfinal, dsend, dinit, passes, L, H, P, N, nchunks, chunk_size, heads_per_group,
    dy_b, dy_l, dy_h, dy_p, c_b, c_l, c_g, c_n, st_b, st_c, st_h, st_p, f_b, f_h, f_p, f_n, pass_t,
    HAS_DFINAL: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The recurrence over chunks, backwards, for a tile of (p, n): g, the gradient of a chunk's end state,
    goes to `dsend` (laid out like `starts`), then becomes its start state's, g <- Σ_l exp(Acum_l) dy_lᵀ C_l
    + exp(Acum_end) g, the first term (the chunk's own outputs) a matmul over the chunk. Also the gradient
    of each chunk's end decay, exp(Acum_end) Σ g·start, a partial sum per tile in `passes`; and dinit,
    the last g."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(P, BLOCK_P) * n_blocks
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    h = tl.program_id(1)
    g = h // heads_per_group
    p = (tile // n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tile % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mp, mn = p < P, n < N
    m2 = mp[:, None] & mn[None, :]
    if HAS_DFINAL:
        f_ptr = dfinal + b * f_b + h * f_h + p[:, None] * f_p + n[None, :] * f_n
        grad = tl.load(f_ptr, mask=m2, other=0.0).to(tl.float32)
    else:
        grad = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for k in range(nchunks):
        c = nchunks - 1 - k
        valid = tl.minimum(chunk_size, L - c * chunk_size)
        l0 = (c * chunk_size).to(tl.int64)
        t_off = ((b * H + h) * nchunks + c) * chunk_size
        own = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, valid, BLOCK_K):
            l = k0 + tl.arange(0, BLOCK_K)
            ml = l < valid
            el = tl.where(ml, tl.exp(tl.load(acum + t_off + l, mask=ml, other=0.0)), 0.0)
            dy_ptr = dy + b * dy_b + (l0 + l[None, :]) * dy_l + h * dy_h + p[:, None] * dy_p
            dyt = tl.load(dy_ptr, mask=mp[:, None] & ml[None, :], other=0.0)
            c_ptr = C + b * c_b + (l0 + l[:, None]) * c_l + g * c_g + n[None, :] * c_n
            ct = tl.load(c_ptr, mask=ml[:, None] & mn[None, :], other=0.0)
            own = _dot(dyt.to(tl.float32) * el[None, :], ct, own, DOT_DTYPE, DOT_PRECISION)
        off = b * st_b + c * st_c + h * st_h + p[:, None] * st_p + n[None, :]
        start = tl.load(starts + off, mask=m2, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(acum + t_off + chunk_size - 1))
        tl.store(dsend + off, grad.to(dsend.dtype.element_ty), mask=m2)
        tl.store(passes + tile * pass_t + (b * H + h) * nchunks + c, decay * tl.sum(grad * start))
        grad = own + decay * grad
    tl.store(dinit + (b * H + h) * P * N + p[:, None] * N + n[None, :], grad, mask=m2)


@triton.jit
def _bwd_dcb_kernel(
    dy, x, cb, dt_out, acum, dcb, intra, L, H, P, nchunks, chunk_size, heads_per_group, heads_per_split,
    dy_b, dy_l, dy_h, dy_p, x_b, x_l, x_h, x_p, cb_b, cb_c, cb_g, cb_m, dcb_b, dcb_c, dcb_g, dcb_m, in_t,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """dCB[l, s] = Σ_h exp(Acum_l - Acum_s) Δ_s dy_l·x_s (s <= l) for one block of rows l and columns s and a
    split of a group's heads (`dcb` holds one per split). On the way, the intra-chunk part of dAcum: with
    T = dCB_h ∘ C·Bᵀ, dAcum_l gets the row sum of T and loses the column sum. Each (row block i, column
    block j) writes its row sums to `intra` slot j and its column sums to slot i: every slot of every
    position is written exactly once (the diagonal block writes rows - columns), and the slots are summed
    at the end."""
    pid = tl.program_id(0)
    b = (pid // nchunks).to(tl.int64)
    c = pid % nchunks
    splits = tl.cdiv(heads_per_group, heads_per_split)
    g = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    tiles = tl.cdiv(chunk_size, BLOCK_M)
    i = tl.program_id(2) // tiles
    j = tl.program_id(2) % tiles
    if j > i:  # above the diagonal: nothing
        return
    l = i * BLOCK_M + tl.arange(0, BLOCK_M)
    s = j * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    ml, ms = l < valid, s < valid
    inl, ins = l < chunk_size, s < chunk_size
    causal = (l[:, None] >= s[None, :]) & ml[:, None] & ms[None, :]
    l0 = (c * chunk_size).to(tl.int64)
    cb_ptr = cb + b * cb_b + c * cb_c + g * cb_g + l[:, None] * cb_m + s[None, :]
    cbt = tl.load(cb_ptr, mask=causal, other=0.0)
    e = tl.minimum(j * BLOCK_M + BLOCK_M - 1, chunk_size - 1)  # the column block's last position
    h0 = g * heads_per_group + split * heads_per_split
    h1 = tl.minimum(h0 + heads_per_split, (g + 1) * heads_per_group)
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for h in range(h0, h1):
        t_off = ((b * H + h) * nchunks + c) * chunk_size
        al = tl.load(acum + t_off + l, mask=inl, other=0.0)
        a_s = tl.load(acum + t_off + s, mask=ins, other=0.0)
        d_s = tl.load(dt_out + t_off + s, mask=ins, other=0.0)
        dyx = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mp = p < P
            dy_ptr = dy + b * dy_b + (l0 + l[:, None]) * dy_l + h * dy_h + p[None, :] * dy_p
            dyt = tl.load(dy_ptr, mask=ml[:, None] & mp[None, :], other=0.0)
            x_ptr = x + b * x_b + (l0 + s[None, :]) * x_l + h * x_h + p[:, None] * x_p
            xt = tl.load(x_ptr, mask=mp[:, None] & ms[None, :], other=0.0)
            dyx = _dot(dyt, xt, dyx, DOT_DTYPE, DOT_PRECISION)
        if i > j:  # exp(Acum_l - Acum_e) exp(Acum_e - Acum_s): an exp per row and per column, both <= 1
            a_e = tl.load(acum + t_off + e)
            decay = tl.exp(al - a_e)[:, None] * (tl.exp(a_e - a_s) * d_s)[None, :]
        else:
            decay = tl.exp(tl.where(causal, al[:, None] - a_s[None, :], float("-inf"))) * d_s[None, :]
        dcb_h = tl.where(causal, dyx * decay, 0.0)
        acc += dcb_h
        t = dcb_h * cbt
        rows = tl.sum(t, axis=1)
        cols = tl.sum(t, axis=0)
        base = intra + (b * H + h) * nchunks * chunk_size + c * chunk_size
        if i == j:
            tl.store(base + i * in_t + l, rows - cols, mask=inl)
        else:
            tl.store(base + j * in_t + l, rows, mask=inl)
            tl.store(base + i * in_t + s, -cols, mask=ins)
    out = dcb + b * dcb_b + c * dcb_c + tl.program_id(1) * dcb_g + l[:, None] * dcb_m + s[None, :]
    tl.store(out, acc, mask=inl[:, None] & ins[None, :])


@triton.jit
def _bwd_dx_kernel(
    x, dy, cb, B, dsend, dt_out, acum, D, dx, ddt_part, w_part, dD_part,
    L, H, P, N, nchunks, chunk_size, heads_per_group,
    x_b, x_l, x_h, x_p, dy_b, dy_l, dy_h, dy_p, cb_b, cb_c, cb_g, cb_m, b_b, b_l, b_g, b_n,
    ds_b, ds_c, ds_h, ds_p, d_h, d_p, dx_b, dx_l, dx_h, dx_p, part_t,
    HAS_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dx_s = Δ_s (Σ_{l>=s} C_l·B_s exp(Acum_l - Acum_s) dy_l + exp(Acum_end - Acum_s) dS B_s) + D dy_s, for a
    block of positions s, a block of channels and one head. Also, per position, the direct part of dΔ
    (x_s · the bracket) and w_s = Δ_s x_s · (the end-state part): Acum_end - Acum_s sums the steps after s,
    so step t gets Σ_{s<t} w_s. And D's gradient Σ dy·x of the block."""
    p_blocks = tl.cdiv(P, BLOCK_P)
    m_blocks = tl.cdiv(chunk_size, BLOCK_M)
    tiles = m_blocks * p_blocks
    pid = tl.program_id(0)  # (sequence, chunk, tile), the tile fastest
    b = (pid // (nchunks * tiles)).to(tl.int64)
    c = (pid // tiles) % nchunks
    tile = pid % tiles
    h = tl.program_id(1)
    g = h // heads_per_group
    j = tile // p_blocks
    s = j * BLOCK_M + tl.arange(0, BLOCK_M)
    p = (tile % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    ms, mp, ins = s < valid, p < P, s < chunk_size
    m2 = ms[:, None] & mp[None, :]
    l0 = (c * chunk_size).to(tl.int64)
    t_off = ((b * H + h) * nchunks + c) * chunk_size
    a_s = tl.load(acum + t_off + s, mask=ins, other=0.0)
    d_s = tl.load(dt_out + t_off + s, mask=ins, other=0.0)
    a_end = tl.load(acum + t_off + chunk_size - 1)

    # the outputs after s in the chunk: the diagonal block masked to l >= s, then whole blocks, the decay
    # factored through the column block's last position e as in the forward
    cb_ptr = cb + b * cb_b + c * cb_c + g * cb_g + s[:, None]  # C·Bᵀ read transposed: [s, l]
    dy_ptr = dy + b * dy_b + l0 * dy_l + h * dy_h + p[None, :] * dy_p
    dys = tl.load(dy_ptr + s[:, None] * dy_l, mask=m2, other=0.0)
    causal = (s[None, :] >= s[:, None]) & ms[:, None] & ms[None, :]
    w = tl.load(cb_ptr + s[None, :] * cb_m, mask=causal, other=0.0)
    w *= tl.exp(tl.where(causal, a_s[None, :] - a_s[:, None], float("-inf")))
    acc = _dot(w, dys, tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32), DOT_DTYPE, DOT_PRECISION)
    a_e = tl.load(acum + t_off + tl.minimum(j * BLOCK_M + BLOCK_M - 1, chunk_size - 1))
    cols = tl.where(ms, tl.exp(a_e - a_s), 0.0)
    for k0 in range((j + 1) * BLOCK_M, valid, BLOCK_M):
        l = k0 + tl.arange(0, BLOCK_M)
        ml = l < valid
        rows = tl.where(ml, tl.exp(tl.load(acum + t_off + l, mask=ml, other=0.0) - a_e), 0.0)
        w = tl.load(cb_ptr + l[None, :] * cb_m, mask=ms[:, None] & ml[None, :], other=0.0)
        w = w * cols[:, None] * rows[None, :]
        dyl = tl.load(dy_ptr + l[:, None] * dy_l, mask=ml[:, None] & mp[None, :], other=0.0)
        acc = _dot(w, dyl, acc, DOT_DTYPE, DOT_PRECISION)

    # the chunk's end state: exp(Acum_end - Acum_s) Σ_n B[s, n] dS[p, n]
    st = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    b_ptr = B + b * b_b + l0 * b_l + g * b_g + s[:, None] * b_l
    ds_ptr = dsend + b * ds_b + c * ds_c + h * ds_h + p[None, :] * ds_p
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mn = n < N
        bt = tl.load(b_ptr + n[None, :] * b_n, mask=ms[:, None] & mn[None, :], other=0.0)
        dst = tl.load(ds_ptr + n[:, None], mask=mn[:, None] & mp[None, :], other=0.0)
        st = _dot(bt, dst, st, DOT_DTYPE, DOT_PRECISION)
    st *= tl.where(ms, tl.exp(a_end - a_s), 0.0)[:, None]

    xs = tl.load(x + b * x_b + l0 * x_l + h * x_h + s[:, None] * x_l + p[None, :] * x_p, mask=m2, other=0.0)
    xs = xs.to(tl.float32)
    bracket = acc + st
    dxs = bracket * d_s[:, None]
    if HAS_D:
        dysf = dys.to(tl.float32)
        dxs += dysf * tl.load(D + h * d_h + p * d_p, mask=mp, other=0.0).to(tl.float32)[None, :]
        d_off = ((b * nchunks + c) * m_blocks + j) * H * P + h * P + p
        tl.store(dD_part + d_off, tl.sum(dysf * xs, axis=0), mask=mp)
    dx_ptr = dx + b * dx_b + l0 * dx_l + h * dx_h + s[:, None] * dx_l + p[None, :] * dx_p
    tl.store(dx_ptr, dxs.to(dx.dtype.element_ty), mask=m2)
    part = (tile % p_blocks) * part_t + (b * H + h) * nchunks * chunk_size + c * chunk_size + s
    tl.store(ddt_part + part, tl.sum(xs * bracket, axis=1), mask=ins)
    tl.store(w_part + part, d_s * tl.sum(xs * st, axis=1), mask=ins)


@triton.jit
def _bwd_dc_kernel(
    dcb, B, C, dy, starts, acum, dC, off_part, L, H, P, N, nchunks, chunk_size,
    heads_per_group, heads_per_split, dcb_b, dcb_c, dcb_g, dcb_m, b_b, b_l, b_g, b_n, c_b, c_l, c_g, c_n,
    dy_b, dy_l, dy_h, dy_p,
    st_b, st_c, st_h, st_p, o_s, o_b, o_l, o_g, o_n, part_t,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dC_l = Σ_{s<=l} dCB[l, s] B_s + Σ_h exp(Acum_l) dy_l·H for a block of positions, a block of the state
    and a split of a group's heads (the first split adds the C·Bᵀ part; `dC` holds one sum per split).
    On the way, the start state's part of dAcum_l: Σ_n C[l, n] exp(Acum_l) (dy_l·H)[n], per head."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(chunk_size, BLOCK_M) * n_blocks
    pid = tl.program_id(0)  # (sequence, chunk, tile), the tile fastest
    b = (pid // (nchunks * tiles)).to(tl.int64)
    c = (pid // tiles) % nchunks
    tile = pid % tiles
    splits = tl.cdiv(heads_per_group, heads_per_split)
    g = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    l = (tile // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    nb = tile % n_blocks
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    ml, inl, mn = l < valid, l < chunk_size, n < N
    l0 = (c * chunk_size).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if split == 0:  # through C·Bᵀ: Σ_s dCB[l, s] B_s, dCB summed over the splits
        dcb_ptr = dcb + b * dcb_b + c * dcb_c + g * splits * dcb_g + l[:, None] * dcb_m
        b_ptr = B + b * b_b + l0 * b_l + g * b_g + n[None, :] * b_n
        for k0 in range(0, tl.minimum((tile // n_blocks + 1) * BLOCK_M, valid), BLOCK_M):
            s = k0 + tl.arange(0, BLOCK_M)
            ms = s < valid
            d = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
            for sp in range(splits):
                d += tl.load(dcb_ptr + sp * dcb_g + s[None, :], mask=ml[:, None] & ms[None, :], other=0.0)
            bt = tl.load(b_ptr + s[:, None] * b_l, mask=ms[:, None] & mn[None, :], other=0.0)
            acc = _dot(d, bt, acc, DOT_DTYPE, DOT_PRECISION)
    # through the start state's read-out
    c_ptr = C + b * c_b + (l0 + l[:, None]) * c_l + g * c_g + n[None, :] * c_n
    ct = tl.load(c_ptr, mask=ml[:, None] & mn[None, :], other=0.0).to(tl.float32)
    h0 = g * heads_per_group + split * heads_per_split
    h1 = tl.minimum(h0 + heads_per_split, (g + 1) * heads_per_group)
    for h in range(h0, h1):
        t_off = ((b * H + h) * nchunks + c) * chunk_size
        el = tl.where(ml, tl.exp(tl.load(acum + t_off + l, mask=inl, other=0.0)), 0.0)
        prod = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mp = p < P
            dy_ptr = dy + b * dy_b + (l0 + l[:, None]) * dy_l + h * dy_h + p[None, :] * dy_p
            dyt = tl.load(dy_ptr, mask=ml[:, None] & mp[None, :], other=0.0)
            st_ptr = starts + b * st_b + c * st_c + h * st_h + p[:, None] * st_p + n[None, :]
            sv = tl.load(st_ptr, mask=mp[:, None] & mn[None, :], other=0.0)
            prod = _dot(dyt, sv, prod, DOT_DTYPE, DOT_PRECISION)
        prod *= el[:, None]
        acc += prod
        part = nb * part_t + (b * H + h) * nchunks * chunk_size + c * chunk_size + l
        tl.store(off_part + part, tl.sum(prod * ct, axis=1), mask=inl)
    out = dC + split * o_s + b * o_b + (l0 + l[:, None]) * o_l + g * o_g + n[None, :] * o_n
    tl.store(out, acc.to(dC.dtype.element_ty), mask=ml[:, None] & mn[None, :])


@triton.jit
def _bwd_db_kernel(
    dcb, C, x, dsend, dt_out, acum, dB, L, H, P, N, nchunks, chunk_size, heads_per_group, heads_per_split,
    dcb_b, dcb_c, dcb_g, dcb_m, c_b, c_l, c_g, c_n, x_b, x_l, x_h, x_p, ds_b, ds_c, ds_h, ds_p,
    o_s, o_b, o_l, o_g, o_n,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dB_s = Σ_{l>=s} dCB[l, s] C_l + Σ_h exp(Acum_end - Acum_s) Δ_s x_s·dS, tiled like `_bwd_dc_kernel`."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(chunk_size, BLOCK_M) * n_blocks
    pid = tl.program_id(0)
    b = (pid // (nchunks * tiles)).to(tl.int64)
    c = (pid // tiles) % nchunks
    tile = pid % tiles
    splits = tl.cdiv(heads_per_group, heads_per_split)
    g = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    s = (tile // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tile % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    ms, ins, mn = s < valid, s < chunk_size, n < N
    l0 = (c * chunk_size).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if split == 0:  # through C·Bᵀ: Σ_l dCB[l, s] C_l, dCB read transposed and summed over the splits
        dcb_ptr = dcb + b * dcb_b + c * dcb_c + g * splits * dcb_g + s[:, None]
        c_ptr = C + b * c_b + l0 * c_l + g * c_g + n[None, :] * c_n
        for k0 in range((tile // n_blocks) * BLOCK_M, valid, BLOCK_M):
            l = k0 + tl.arange(0, BLOCK_M)
            ml = l < valid
            d = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
            for sp in range(splits):
                d_ptr = dcb_ptr + sp * dcb_g + l[None, :] * dcb_m
                d += tl.load(d_ptr, mask=ms[:, None] & ml[None, :], other=0.0)
            ct = tl.load(c_ptr + l[:, None] * c_l, mask=ml[:, None] & mn[None, :], other=0.0)
            acc = _dot(d, ct, acc, DOT_DTYPE, DOT_PRECISION)
    # through the chunk's end state
    h0 = g * heads_per_group + split * heads_per_split
    h1 = tl.minimum(h0 + heads_per_split, (g + 1) * heads_per_group)
    for h in range(h0, h1):
        t_off = ((b * H + h) * nchunks + c) * chunk_size
        a_s = tl.load(acum + t_off + s, mask=ins, other=0.0)
        d_s = tl.load(dt_out + t_off + s, mask=ins, other=0.0)
        ws = tl.where(ms, d_s * tl.exp(tl.load(acum + t_off + chunk_size - 1) - a_s), 0.0)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mp = p < P
            x_ptr = x + b * x_b + (l0 + s[:, None]) * x_l + h * x_h + p[None, :] * x_p
            xt = tl.load(x_ptr, mask=ms[:, None] & mp[None, :], other=0.0).to(tl.float32) * ws[:, None]
            ds_ptr = dsend + b * ds_b + c * ds_c + h * ds_h + p[:, None] * ds_p + n[None, :]
            dst = tl.load(ds_ptr, mask=mp[:, None] & mn[None, :], other=0.0)
            acc = _dot(xt, dst, acc, DOT_DTYPE, DOT_PRECISION)
    out = dB + split * o_s + b * o_b + (l0 + s[:, None]) * o_l + g * o_g + n[None, :] * o_n
    tl.store(out, acc.to(dB.dtype.element_ty), mask=ms[:, None] & mn[None, :])


@triton.jit
def _bwd_dt_kernel(
    dt, A, dt_bias, dt_out, intra, off_part, ddt_part, w_part, passes, ddt, dA_part, dbias_part,
    L, H, nchunks, chunk_size, n_intra, n_off, n_ddt, n_pass, dt_min, dt_max,
    dt_b, dt_l, dt_h, a_h, bias_h, ddt_b, ddt_l, ddt_h, part_t, pass_t,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_CS: tl.constexpr,
):  # fmt: skip
    """From dAcum to the steps: Acum_l = Σ_{t<=l} Δ_t A, so step t gets Σ_{l>=t} dAcum_l (a reverse cumsum),
    the end state's Σ_{s<t} w_s and the chunk-to-chunk decay's gradient; then dΔ through clamp, softplus and
    bias. Also the chunk's partial sums of dA and of dt_bias."""
    pid = tl.program_id(0)
    b = (pid // nchunks).to(tl.int64)
    c = pid % nchunks
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.arange(0, BLOCK_CS)
    valid = tl.minimum(chunk_size, L - c * chunk_size)
    mh = h < H
    mt = mh[:, None] & (t < chunk_size)[None, :]
    mv = mh[:, None] & (t < valid)[None, :]
    # the layout of the per-position parts: [..., B, H, nchunks·chunk_size]
    off = ((b * H + h[:, None]) * nchunks + c) * chunk_size + t[None, :]
    dacum = tl.zeros([BLOCK_H, BLOCK_CS], dtype=tl.float32)
    for k in range(n_intra):
        dacum += tl.load(intra + k * part_t + off, mask=mt, other=0.0)
    for k in range(n_off):
        dacum += tl.load(off_part + k * part_t + off, mask=mt, other=0.0)
    w = tl.zeros([BLOCK_H, BLOCK_CS], dtype=tl.float32)
    direct = tl.zeros([BLOCK_H, BLOCK_CS], dtype=tl.float32)
    for k in range(n_ddt):
        w += tl.load(w_part + k * part_t + off, mask=mt, other=0.0)
        direct += tl.load(ddt_part + k * part_t + off, mask=mt, other=0.0)
    decay = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(n_pass):
        decay += tl.load(passes + k * pass_t + (b * H + h) * nchunks + c, mask=mh, other=0.0)
    da = tl.cumsum(dacum, axis=1, reverse=True) + (tl.cumsum(w, axis=1) - w) + decay[:, None]
    a = tl.load(A + h * a_h, mask=mh, other=0.0).to(tl.float32)
    grad = direct + a[:, None] * da
    step = tl.load(dt_out + off, mask=mt, other=0.0)  # Δ, zero past the end
    tl.store(dA_part + pid * H + h, tl.sum(step * da, axis=1), mask=mh)

    ptr = dt + b * dt_b + (c * chunk_size).to(tl.int64) * dt_l + h[:, None] * dt_h + t[None, :] * dt_l
    v = tl.load(ptr, mask=mv, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(dt_bias + h * bias_h, mask=mh, other=0.0).to(tl.float32)[:, None]
    if CLAMP:  # zero outside the limits, as torch.clamp's gradient
        d = _softplus(v) if SOFTPLUS else v
        grad = tl.where((d >= dt_min) & (d <= dt_max), grad, 0.0)
    if SOFTPLUS:
        grad *= tl.where(v > 20.0, 1.0, tl.sigmoid(v))
    grad = tl.where(mv, grad, 0.0)
    out = ddt + b * ddt_b + (c * chunk_size).to(tl.int64) * ddt_l + h[:, None] * ddt_h + t[None, :] * ddt_l
    tl.store(out, grad.to(ddt.dtype.element_ty), mask=mv)
    if HAS_BIAS:
        tl.store(dbias_part + pid * H + h, tl.sum(grad, axis=1), mask=mh)


# Tile sides (caps: small sizes get smaller tiles, down to 16), warps and pipeline stages, by kernel; the
# forward's the fastest found on an H200 for Mamba-2 2.7B (P=64, N=128, chunk 256, bf16), 8 warps and more
# stages slower. The backward's (`*_bwd`, `heads_bwd`: heads per program where a program sums over a
# group's heads) are first guesses, to be swept on the GPU.
TILES = dict(
    positions=64, channels=64, state=128, passing=512,
    warps_cb=4, warps_state=4, warps_scan=4, warps_passing=4, stages_cb=1, stages_state=1, stages_scan=1,
    positions_bwd=64, channels_bwd=64, state_bwd=128, heads_bwd=16,
    warps_passing_bwd=8, warps_dcb_bwd=4, warps_dx_bwd=4, warps_dc_bwd=8, warps_db_bwd=8, warps_dt_bwd=4,
    stages_bwd=1,
)  # fmt: skip
# Operands of the matmuls for 16-bit inputs: "16bit" (the inputs' own dtype; the fp32 intermediates that
# enter a matmul, start states included, are rounded to it) or "tf32" (fp32 operands, rounded to tf32:
# closer to the reference, about 1.5 times slower on an H200).
DOT_16BIT = "16bit"


def _block(size: int, cap: int) -> int:
    """A power-of-two tile side covering `size` up to `cap`, and at least 16 (`tl.dot`'s minimum)."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _dot_operands(*tensors: torch.Tensor):
    """(operand dtype, input precision) of the matmuls for these inputs."""
    dtypes = {t.dtype for t in tensors}
    if torch.version.hip is not None:
        return tl.float32, "ieee"
    if interpreting():  # its 16-bit products are wrong and its casts to 16 bits truncate: stay in fp32
        return tl.float32, "ieee"
    if dtypes == {torch.bfloat16} or dtypes == {torch.float16}:
        if DOT_16BIT == "16bit":
            return (tl.bfloat16 if dtypes == {torch.bfloat16} else tl.float16), "tf32"
        return tl.float32, "tf32"  # 16-bit values are exact in tf32
    return tl.float32, "tf32x3"  # three tf32 products: about fp32's accuracy


class _Plan:
    """Sizes, tiles and matmul operands of one call, shared by its forward and backward."""

    def __init__(self, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int):
        self.batch, self.length, self.nheads, self.headdim = x.shape
        self.groups, self.dstate = B.shape[2], B.shape[3]
        if self.nheads % self.groups:
            raise ValueError(
                f"mamba_chunk_scan_combined: {self.groups} groups do not divide {self.nheads} heads"
            )
        self.heads_per_group = self.nheads // self.groups
        self.cs = int(chunk_size)
        self.nchunks = triton.cdiv(self.length, self.cs)
        dot_dtype, precision = _dot_operands(x, B, C)
        self.f32_dots = dot_dtype == tl.float32
        self.dot = dict(DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
        self.bm = _block(self.cs, TILES["positions"])
        self.bp = _block(self.headdim, TILES["channels"])
        self.bn = _block(self.dstate, TILES["state"])
        self.m_blocks = triton.cdiv(self.cs, self.bm)
        self.p_blocks = triton.cdiv(self.headdim, self.bp)
        self.n_blocks = triton.cdiv(self.dstate, self.bn)

    def backward_tiles(self):
        """(tile sides of positions, channels, state; and how many tiles of each) for the backward."""
        bm = _block(self.cs, TILES["positions_bwd"])
        bp = _block(self.headdim, TILES["channels_bwd"])
        bn = _block(self.dstate, TILES["state_bwd"])
        counts = triton.cdiv(self.cs, bm), triton.cdiv(self.headdim, bp), triton.cdiv(self.dstate, bn)
        return (bm, bp, bn), counts


def _per_channel(D: torch.Tensor | None, plan: _Plan) -> torch.Tensor | None:
    """D as [H, P] (a per-head D is the same for every channel)."""
    if D is not None and D.dim() == 1:
        return D[:, None].expand(plan.nheads, plan.headdim)
    return D


def _scan(plan, cb, x, z, C, starts, dt_out, acum, D, out, gate=None):
    """Step 5, the outputs (`_chunk_scan_kernel`); with `gate` = (dout, dz), the gate's backward."""
    D = _per_channel(D, plan)
    dout, dz = gate if gate is not None else (x, x)
    none4 = (0, 0, 0, 0)
    _chunk_scan_kernel[(plan.batch * plan.nchunks * plan.m_blocks * plan.p_blocks, plan.nheads)](
        cb, x, z if z is not None else x, C, starts, dt_out, acum, D if D is not None else x, out, dout, dz,
        plan.length, plan.nheads, plan.headdim, plan.dstate, plan.nchunks, plan.cs, plan.heads_per_group,
        *cb.stride()[:4], *x.stride(), *(z.stride() if z is not None else none4), *C.stride(),
        *starts.stride()[:4], *(D.stride() if D is not None else (0, 0)), *out.stride(),
        *(dout.stride() if gate is not None else none4), *(dz.stride() if gate is not None else none4),
        HAS_D=D is not None, HAS_Z=z is not None, GATE_BWD=gate is not None, **plan.dot,
        BLOCK_M=plan.bm, BLOCK_P=plan.bp, BLOCK_N=plan.bn,
        num_warps=TILES["warps_scan"], num_stages=TILES["stages_scan"],
    )  # fmt: skip


def _forward(plan, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, dt_limit):
    """y, the final state and what the backward reads: Δ, Acum, C·Bᵀ and the start states (16-bit with
    16-bit operands: the values the outputs were computed from)."""
    batch, nheads, headdim, dstate, nchunks, cs = (
        plan.batch, plan.nheads, plan.headdim, plan.dstate, plan.nchunks, plan.cs,
    )  # fmt: skip
    length = plan.length
    dev, f32 = x.device, torch.float32
    y = torch.empty(x.shape, dtype=x.dtype, device=dev)
    final = torch.empty(batch, nheads, headdim, dstate, dtype=f32, device=dev)
    dt_out = torch.empty(batch, nheads, nchunks, cs, dtype=f32, device=dev)
    acum = torch.empty_like(dt_out)
    cb = torch.empty(batch, nchunks, plan.groups, cs, cs, dtype=f32, device=dev)
    states = torch.empty(batch, nchunks, nheads, headdim, dstate, dtype=f32, device=dev)
    starts = states if plan.f32_dots else torch.empty_like(states, dtype=x.dtype)
    bm, bn = plan.bm, plan.bn

    # 1. Δ and the running sum of Δ·A inside each chunk
    clamp = tuple(dt_limit) != NO_LIMIT
    block_cs = triton.next_power_of_2(cs)
    block_h = max(1, min(triton.next_power_of_2(nheads), 4096 // block_cs))
    _dt_cumsum_kernel[(batch * nchunks, triton.cdiv(nheads, block_h))](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, acum, length, nheads, nchunks, cs,
        float(dt_limit[0]) if clamp else 0.0, float(dt_limit[1]) if clamp else 0.0,
        *dt.stride(), A.stride(0), dt_bias.stride(0) if dt_bias is not None else 0,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), CLAMP=clamp,
        BLOCK_H=block_h, BLOCK_CS=block_cs,
    )  # fmt: skip

    # 2. C·Bᵀ per chunk and group
    _chunk_cb_kernel[(batch * nchunks, plan.groups, plan.m_blocks * plan.m_blocks)](
        C, B, cb, length, dstate, nchunks, cs, *C.stride(), *B.stride(), *cb.stride()[:4],
        **plan.dot, BLOCK_M=bm, BLOCK_K=bm, BLOCK_N=bn,
        num_warps=TILES["warps_cb"], num_stages=TILES["stages_cb"],
    )  # fmt: skip

    # 3. each chunk's own contribution to the state at its end
    _chunk_state_kernel[(batch * nchunks * plan.p_blocks * plan.n_blocks, nheads)](
        x, B, dt_out, acum, states, length, nheads, headdim, dstate, nchunks, cs, plan.heads_per_group,
        *x.stride(), *B.stride(), *states.stride()[:4],
        **plan.dot, BLOCK_P=plan.bp, BLOCK_N=bn, BLOCK_K=bm,
        num_warps=TILES["warps_state"], num_stages=TILES["stages_state"],
    )  # fmt: skip

    # 4. start state of every chunk, and the final state
    pn = headdim * dstate
    block = min(TILES["passing"], triton.next_power_of_2(pn))
    init = initial_states
    _state_passing_kernel[(batch, nheads, triton.cdiv(pn, block))](
        states, acum, init if init is not None else states, starts, final, nheads, dstate, pn, nchunks, cs,
        states.stride(0), states.stride(1), states.stride(2),
        *(init.stride() if init is not None else (0, 0, 0, 0)), final.stride(0), final.stride(1),
        HAS_INIT=init is not None, BLOCK=block, num_warps=TILES["warps_passing"],
    )  # fmt: skip

    # 5. the outputs
    _scan(plan, cb, x, z, C, starts, dt_out, acum, D, y)
    return y, final, (dt_out, acum, cb, starts)


def _backward(plan, saved, dt_softplus, dt_limit, dout, dfinal):
    """The gradients of (x, dt, A, B, C, D, z, dt_bias, initial_states) from y's and the final state's."""
    x, dt, A, B, C, D, z, dt_bias, init, dt_out, acum, cb, starts = saved
    batch, length, nheads, headdim, dstate, nchunks, cs = (
        plan.batch, plan.length, plan.nheads, plan.headdim, plan.dstate, plan.nchunks, plan.cs,
    )  # fmt: skip
    hpg, groups = plan.heads_per_group, plan.groups
    (bm, bp, bn), (m_blocks, p_blocks, n_blocks) = plan.backward_tiles()
    dev, f32 = x.device, torch.float32
    pos = nchunks * cs
    if dout is None:
        dout = torch.zeros_like(x)

    # 0. the gate: dy = dout·silu(z), and dz from y recomputed
    dz = None
    if z is not None:
        dy = torch.empty(x.shape, dtype=dout.dtype, device=dev)
        dz = torch.empty(z.shape, dtype=z.dtype, device=dev)
        _scan(plan, cb, x, z, C, starts, dt_out, acum, D, dy, gate=(dout, dz))
    else:
        dy = dout

    # 1. back through the recurrence over chunks: each chunk's end-state gradient dS, and dinit
    dsend = torch.empty(starts.shape, dtype=starts.dtype, device=dev)
    passes = torch.empty(p_blocks * n_blocks, batch, nheads, nchunks, dtype=f32, device=dev)
    dinit = torch.empty(batch, nheads, headdim, dstate, dtype=f32, device=dev)
    _state_passing_bwd_kernel[(batch * p_blocks * n_blocks, nheads)](
        dy, C, starts, acum, dfinal if dfinal is not None else dinit, dsend, dinit, passes,
        length, nheads, headdim, dstate, nchunks, cs, hpg, *dy.stride(), *C.stride(), *starts.stride()[:4],
        *(dfinal.stride() if dfinal is not None else (0, 0, 0, 0)), passes.stride(0),
        HAS_DFINAL=dfinal is not None, **plan.dot, BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bm,
        num_warps=TILES["warps_passing_bwd"], num_stages=TILES["stages_bwd"],
    )  # fmt: skip

    # 2. the gradient of C·Bᵀ, per split of a group's heads, and the intra-chunk part of dAcum
    per_split = max(1, min(hpg, TILES["heads_bwd"]))
    splits = triton.cdiv(hpg, per_split)
    dcb = torch.empty(batch, nchunks, groups * splits, cs, cs, dtype=f32, device=dev)
    intra = torch.empty(m_blocks, batch, nheads, pos, dtype=f32, device=dev)
    _bwd_dcb_kernel[(batch * nchunks, groups * splits, m_blocks * m_blocks)](
        dy, x, cb, dt_out, acum, dcb, intra, length, nheads, headdim, nchunks, cs, hpg, per_split,
        *dy.stride(), *x.stride(), *cb.stride()[:4], *dcb.stride()[:4], intra.stride(0),
        **plan.dot, BLOCK_M=bm, BLOCK_P=bp,
        num_warps=TILES["warps_dcb_bwd"], num_stages=TILES["stages_bwd"],
    )  # fmt: skip

    # 3. dx, the direct part of dΔ, the end state's part of dAcum, dD
    Dm = _per_channel(D, plan)
    dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
    ddt_part = torch.empty(p_blocks, batch, nheads, pos, dtype=f32, device=dev)
    w_part = torch.empty_like(ddt_part)
    dD_part = dx  # a placeholder without D
    if D is not None:
        dD_part = torch.empty(batch * nchunks * m_blocks, nheads, headdim, dtype=f32, device=dev)
    _bwd_dx_kernel[(batch * nchunks * m_blocks * p_blocks, nheads)](
        x, dy, cb, B, dsend, dt_out, acum, Dm if D is not None else x, dx, ddt_part, w_part, dD_part,
        length, nheads, headdim, dstate, nchunks, cs, hpg,
        *x.stride(), *dy.stride(), *cb.stride()[:4], *B.stride(), *dsend.stride()[:4],
        *(Dm.stride() if D is not None else (0, 0)), *dx.stride(), ddt_part.stride(0),
        HAS_D=D is not None, **plan.dot, BLOCK_M=bm, BLOCK_P=bp, BLOCK_N=bn,
        num_warps=TILES["warps_dx_bwd"], num_stages=TILES["stages_bwd"],
    )  # fmt: skip

    # 4, 5. dC (and the start state's part of dAcum), dB: one sum per split of the heads
    def per_split_out(like: torch.Tensor) -> torch.Tensor:
        if splits == 1:
            return torch.empty(like.shape, dtype=like.dtype, device=dev)[None]
        return torch.empty(splits, *like.shape, dtype=f32, device=dev)

    dC, dB = per_split_out(C), per_split_out(B)
    off_part = torch.empty(n_blocks, batch, nheads, pos, dtype=f32, device=dev)
    grid = (batch * nchunks * m_blocks * n_blocks, groups * splits)
    _bwd_dc_kernel[grid](
        dcb, B, C, dy, starts, acum, dC, off_part, length, nheads, headdim, dstate, nchunks, cs,
        hpg, per_split,
        *dcb.stride()[:4], *B.stride(), *C.stride(), *dy.stride(), *starts.stride()[:4], *dC.stride(),
        off_part.stride(0), **plan.dot, BLOCK_M=bm, BLOCK_P=bp, BLOCK_N=bn,
        num_warps=TILES["warps_dc_bwd"], num_stages=TILES["stages_bwd"],
    )  # fmt: skip
    _bwd_db_kernel[grid](
        dcb, C, x, dsend, dt_out, acum, dB, length, nheads, headdim, dstate, nchunks, cs, hpg, per_split,
        *dcb.stride()[:4], *C.stride(), *x.stride(), *dsend.stride()[:4], *dB.stride(),
        **plan.dot, BLOCK_M=bm, BLOCK_P=bp, BLOCK_N=bn,
        num_warps=TILES["warps_db_bwd"], num_stages=TILES["stages_bwd"],
    )  # fmt: skip

    # 6. dAcum -> dΔ -> ddt, dA, ddt_bias
    clamp = tuple(dt_limit) != NO_LIMIT
    ddt = torch.empty(dt.shape, dtype=dt.dtype, device=dev)
    dA_part = torch.empty(batch * nchunks, nheads, dtype=f32, device=dev)
    dbias_part = torch.empty_like(dA_part) if dt_bias is not None else dA_part
    block_cs = triton.next_power_of_2(cs)
    block_h = max(1, min(triton.next_power_of_2(nheads), 4096 // block_cs))
    _bwd_dt_kernel[(batch * nchunks, triton.cdiv(nheads, block_h))](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, intra, off_part, ddt_part, w_part, passes,
        ddt, dA_part, dbias_part, length, nheads, nchunks, cs, m_blocks, n_blocks, p_blocks, passes.shape[0],
        float(dt_limit[0]) if clamp else 0.0, float(dt_limit[1]) if clamp else 0.0,
        *dt.stride(), A.stride(0), dt_bias.stride(0) if dt_bias is not None else 0, *ddt.stride(),
        intra.stride(0), passes.stride(0),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), CLAMP=clamp,
        BLOCK_H=block_h, BLOCK_CS=block_cs, num_warps=TILES["warps_dt_bwd"],
    )  # fmt: skip

    dD = None
    if D is not None:
        dD = dD_part.sum(0)
        dD = (dD.sum(-1) if D.dim() == 1 else dD).to(D.dtype)
    return (
        dx,
        ddt,
        dA_part.sum(0).to(A.dtype),
        dB[0] if splits == 1 else dB.sum(0).to(B.dtype),
        dC[0] if splits == 1 else dC.sum(0).to(C.dtype),
        dD,
        dz,
        dbias_part.sum(0).to(dt_bias.dtype) if dt_bias is not None else None,
        dinit.to(init.dtype) if init is not None else None,
    )


class _ChunkScan(torch.autograd.Function):
    """The chunked scan with its backward. Saved: the inputs, Δ and Acum ([B, H, L] each, fp32), C·Bᵀ per
    chunk and group (fp32), and every chunk's start state (as the forward's matmuls read it: 16-bit with
    16-bit operands); y is recomputed when the gate needs it."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_limit):
        plan = _Plan(x, B, C, chunk_size)
        y, final, extra = _forward(plan, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, dt_limit)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, *extra)
        ctx.plan, ctx.options = plan, (dt_softplus, dt_limit)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        grads = _backward(ctx.plan, ctx.saved_tensors, *ctx.options, dout, dfinal)
        return (*grads, None, None, None)


def mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
    initial_states=None, return_final_states=False, dt_limit=NO_LIMIT,
):  # fmt: skip
    """Same contract as `mambavl.ops.mamba_chunk_scan_combined`, with gradients for every tensor input and
    through the final state. Inputs may be strided views; y comes back contiguous, in x's dtype."""
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    if x.shape[1] == 0:
        _Plan(x, B, C, chunk_size)  # the same checks
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if initial_states is None:
            final = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3], dtype=torch.float32)
        else:
            final = initial_states.float().clone()
        return (y, final) if return_final_states else y
    if needs_grad(*inputs):
        y, final = _ChunkScan.apply(*inputs, chunk_size, dt_softplus, tuple(dt_limit))
    else:
        plan = _Plan(x, B, C, chunk_size)
        y, final, _ = _forward(plan, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states, dt_limit)
    return (y, final) if return_final_states else y
