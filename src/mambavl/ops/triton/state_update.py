"""One recurrent step of the selective SSM (decode), fused: Δ (bias, softplus, clamp), the state update
in place, the read-out through C, the skip D and the SiLU gate, in one pass over the state.

One program per (sequence, head, block of head channels); the state block [BLOCK_P, N] stays in
registers. Mamba-1's layout is the one-head case of Mamba-2's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambavl.ops.timestep import NO_LIMIT


@triton.jit
def _state_update_kernel(
    state, x, dt, A, B, C, D, z, dt_bias, out,
    P, N, heads_per_group, dt_min, dt_max,
    s_b, s_h, s_p, s_n,
    x_b, x_h, x_p,
    dt_b, dt_h, dt_p,
    a_h, a_p, a_n,
    b_b, b_g, b_n,
    c_b, c_g, c_n,
    d_h, d_p,
    z_b, z_h, z_p,
    bias_h, bias_p,
    o_b, o_h, o_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    mp, mn = p < P, n < N
    m2 = mp[:, None] & mn[None, :]
    g = h // heads_per_group

    xv = tl.load(x + b * x_b + h * x_h + p * x_p, mask=mp, other=0.0).to(tl.float32)
    dtv = tl.load(dt + b * dt_b + h * dt_h + p * dt_p, mask=mp, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dtv += tl.load(dt_bias + h * bias_h + p * bias_p, mask=mp, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dtv = tl.where(dtv <= 20.0, tl.log(1.0 + tl.exp(dtv)), dtv)
    if CLAMP:
        dtv = tl.minimum(tl.maximum(dtv, dt_min), dt_max)
    a = tl.load(A + h * a_h + p[:, None] * a_p + n[None, :] * a_n, mask=m2, other=0.0).to(tl.float32)
    bv = tl.load(B + b * b_b + g * b_g + n * b_n, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(C + b * c_b + g * c_g + n * c_n, mask=mn, other=0.0).to(tl.float32)
    s_ptr = state + b * s_b + h * s_h + p[:, None] * s_p + n[None, :] * s_n
    s = tl.load(s_ptr, mask=m2, other=0.0).to(tl.float32)
    s = s * tl.exp(dtv[:, None] * a) + (dtv * xv)[:, None] * bv[None, :]
    tl.store(s_ptr, s.to(state.dtype.element_ty), mask=m2)
    y = tl.sum(s * cv[None, :], axis=1)
    if HAS_D:
        y += xv * tl.load(D + h * d_h + p * d_p, mask=mp, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z + b * z_b + h * z_h + p * z_p, mask=mp, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(out + b * o_b + h * o_h + p * o_p, y.to(out.dtype.element_ty), mask=mp)


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT
) -> torch.Tensor:
    """Same contract as `mambavl.ops.selective_state_update` (either layout; state updated in place)."""
    heads = state.dim() == 4
    if not heads:  # Mamba-1: one head of D channels
        state, x, dt, A = state[:, None], x[:, None], dt[:, None], A[None]
        B, C = B[:, None], C[:, None]
        z = z[:, None] if z is not None else None
        D = D[None] if D is not None else None
        dt_bias = dt_bias[None] if dt_bias is not None else None
    batch, nheads, P, N = state.shape
    groups = B.shape[1]
    if nheads % groups:
        raise ValueError(f"selective_state_update: {groups} groups do not divide {nheads} heads")
    out = torch.empty_like(x)
    dummy = x  # pointer for absent optional inputs (never read)

    def st(t, n):
        return (0,) * n if t is None else tuple(t.stride())

    block_n = triton.next_power_of_2(N)
    block_p = max(1, min(triton.next_power_of_2(P), max(16, 4096 // block_n)))
    grid = (batch, nheads, triton.cdiv(P, block_p))
    clamp = tuple(dt_limit) != NO_LIMIT
    _state_update_kernel[grid](
        state, x, dt, A, B, C,
        D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, out,
        P, N, nheads // groups, float(dt_limit[0]) if clamp else 0.0, float(dt_limit[1]) if clamp else 0.0,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *st(D, 2), *st(z, 3), *st(dt_bias, 2), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        CLAMP=clamp, BLOCK_P=block_p, BLOCK_N=block_n,
    )  # fmt: skip
    return out if heads else out[:, 0]
