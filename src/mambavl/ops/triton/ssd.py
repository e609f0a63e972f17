"""Mamba-2's chunked SSD scan, forward only (prefill and inference), in five kernels.

1. `_dt_cumsum_kernel`: Δ (bias, softplus, clamp) and Acum, the running sum of Δ·A inside each chunk.
2. `_chunk_cb_kernel`: C·Bᵀ of every chunk, once per group (its heads share it), above the diagonal skipped.
3. `_chunk_state_kernel`: each chunk's own part of its end state, Σ_s exp(Acum_end - Acum_s) Δ_s x_s B_sᵀ.
4. `_state_passing_kernel`: the recurrence over chunks: every chunk's start state, and the final state.
5. `_chunk_scan_kernel`: y_l = Σ_{s<=l} (C_l·B_s) exp(Acum_l - Acum_s) Δ_s x_s + exp(Acum_l) C_l·start
   + D x_l, then the SiLU gate.

The matmuls are `tl.dot` on tiles of at least 16 along every side, masked where a size is smaller or odd
(a partial last chunk included), and accumulate in fp32; Δ, Acum, C·Bᵀ and the states are fp32. Operands:
fp32 inputs multiply as tf32x3 (about fp32's accuracy); 16-bit inputs, by default, as 16-bit values, the
fp32 intermediates that enter a matmul rounded to them (`DOT_16BIT`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambavl.ops.dispatch import interpreting
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
    cb, x, z, C, starts, dt_out, acum, D, out, L, H, P, N, nchunks, chunk_size, heads_per_group,
    cb_b, cb_c, cb_g, cb_m,
    x_b, x_l, x_h, x_p, z_b, z_l, z_h, z_p, c_b, c_l, c_g, c_n,
    st_b, st_c, st_h, st_p, d_h, d_p, o_b, o_l, o_h, o_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
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
        acc *= zm * tl.sigmoid(zm)
    o_ptr = out + b * o_b + l0 * o_l + h * o_h + m[:, None] * o_l + p[None, :] * o_p
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=m2)


# Tile sides (caps: small sizes get smaller tiles, down to 16), warps and pipeline stages, by kernel; the
# fastest found on an H200 for Mamba-2 2.7B (P=64, N=128, chunk 256, bf16), 8 warps and more stages slower.
TILES = dict(
    positions=64, channels=64, state=128, passing=512,
    warps_cb=4, warps_state=4, warps_scan=4, warps_passing=4, stages_cb=1, stages_state=1, stages_scan=1,
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


def mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
    initial_states=None, return_final_states=False, dt_limit=NO_LIMIT,
):  # fmt: skip
    """Same contract as `mambavl.ops.mamba_chunk_scan_combined` (no autograd: the dispatcher sends
    training elsewhere). Inputs may be strided views; y comes back contiguous, in x's dtype."""
    batch, length, nheads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    if nheads % groups:
        raise ValueError(f"mamba_chunk_scan_combined: {groups} groups do not divide {nheads} heads")
    dev, f32 = x.device, torch.float32
    y = torch.empty(x.shape, dtype=x.dtype, device=dev)
    final = torch.empty(batch, nheads, headdim, dstate, dtype=f32, device=dev)
    if length == 0:
        if initial_states is None:
            final.zero_()
        else:
            final.copy_(initial_states)
        return (y, final) if return_final_states else y
    cs = int(chunk_size)
    nchunks = triton.cdiv(length, cs)
    dt_out = torch.empty(batch, nheads, nchunks, cs, dtype=f32, device=dev)
    acum = torch.empty_like(dt_out)
    cb = torch.empty(batch, nchunks, groups, cs, cs, dtype=f32, device=dev)
    states = torch.empty(batch, nchunks, nheads, headdim, dstate, dtype=f32, device=dev)
    dot_dtype, precision = _dot_operands(x, B, C)
    starts = states if dot_dtype == tl.float32 else torch.empty_like(states, dtype=x.dtype)
    bm = _block(cs, TILES["positions"])
    bp = _block(headdim, TILES["channels"])
    bn = _block(dstate, TILES["state"])

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
    tiles = triton.cdiv(cs, bm)
    _chunk_cb_kernel[(batch * nchunks, groups, tiles * tiles)](
        C, B, cb, length, dstate, nchunks, cs, *C.stride(), *B.stride(), *cb.stride()[:4],
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_K=bm, BLOCK_N=bn,
        num_warps=TILES["warps_cb"], num_stages=TILES["stages_cb"],
    )  # fmt: skip

    # 3. each chunk's own contribution to the state at its end
    _chunk_state_kernel[(batch * nchunks * triton.cdiv(headdim, bp) * triton.cdiv(dstate, bn), nheads)](
        x, B, dt_out, acum, states, length, nheads, headdim, dstate, nchunks, cs, nheads // groups,
        *x.stride(), *B.stride(), *states.stride()[:4],
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bm,
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
    if D is not None and D.dim() == 1:  # per head: the same for every channel
        D = D[:, None].expand(nheads, headdim)
    _chunk_scan_kernel[(batch * nchunks * tiles * triton.cdiv(headdim, bp), nheads)](
        cb, x, z if z is not None else x, C, starts, dt_out, acum, D if D is not None else x, y,
        length, nheads, headdim, dstate, nchunks, cs, nheads // groups,
        *cb.stride()[:4], *x.stride(), *(z.stride() if z is not None else (0, 0, 0, 0)), *C.stride(),
        *states.stride()[:4], *(D.stride() if D is not None else (0, 0)), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_N=bn,
        num_warps=TILES["warps_scan"], num_stages=TILES["stages_scan"],
    )  # fmt: skip
    return (y, final) if return_final_states else y
