"""RMSNorm with the residual add fused (forward: inference and decode). One program per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x, residual, weight, out, res_out, D, eps, x_row, r_row, o_row, ro_row,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, STORE_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    v = tl.load(x + row * x_row + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(residual + row * r_row + cols, mask=m, other=0.0).to(tl.float32)
    if STORE_RES:
        tl.store(res_out + row * ro_row + cols, v.to(res_out.dtype.element_ty), mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps)
    y = v * rstd
    if HAS_W:
        y *= tl.load(weight + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out + row * o_row + cols, y.to(out.dtype.element_ty), mask=m)


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False):
    """Same contract as `mambavl.ops.rms_norm` (no autograd: the dispatcher sends training elsewhere)."""
    shape, D = x.shape, x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, D)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x2.shape, dtype=torch.float32 if residual_in_fp32 else x.dtype, device=x.device)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2 if r2 is not None else x2, weight if weight is not None else x2, out, res_out, D, float(eps),
        x2.stride(0), r2.stride(0) if r2 is not None else 0, out.stride(0), res_out.stride(0),
        HAS_RES=r2 is not None, HAS_W=weight is not None, STORE_RES=prenorm, BLOCK=triton.next_power_of_2(D),
    )  # fmt: skip
    y = out.reshape(shape)
    return (y, res_out.reshape(shape)) if prenorm else y
