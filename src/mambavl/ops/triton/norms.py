"""RMSNorm in Triton, forward and backward: the plain norm with the residual add fused (pre-norm blocks)
and Mamba-2's gated, grouped norm. One kernel pair serves both (flags pick the parts).

Forward: one program per (row, group), the group held whole in registers; statistics in fp32.
Backward: each program walks a run of rows of one group, writes dx (and dresidual, dz) per row and keeps
its dweight partial sum in registers; the partials are summed afterwards (fp32, deterministic).
Saved for the backward: the inputs and 1/rms per (row, group) — nothing the size of x beyond them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambavl.ops.dispatch import needs_grad

# Launch parameters: backward programs per SM (each walks rows/programs rows of one group), and the
# group's elements per thread that set num_warps (at most 16), forward and backward; the backward keeps
# more values per element live, so it spreads a row over more threads.
PROGRAMS_PER_SM = 4
PER_THREAD = {"fwd": 16, "bwd": 8}
MAX_BLOCK = 65536


def _warps(block: int, direction: str) -> int:
    return min(16, max(1, block // (32 * PER_THREAD[direction])))


@triton.jit
def _norm_fwd_kernel(
    x, residual, z, weight, out, res_out, rstd,
    G, eps,
    x_row, r_row, z_row, o_row, ro_row,
    HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, HAS_W: tl.constexpr, STORE_RES: tl.constexpr,
    STORE_RSTD: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    m = offs < G
    cols = group * G + offs
    v = tl.load(x + row * x_row + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(residual + row * r_row + cols, mask=m, other=0.0).to(tl.float32)
    if STORE_RES:
        tl.store(res_out + row * ro_row + cols, v.to(res_out.dtype.element_ty), mask=m)
    if HAS_Z:
        zv = tl.load(z + row * z_row + cols, mask=m, other=0.0).to(tl.float32)
        gate = zv * tl.sigmoid(zv)
        if not NORM_BEFORE_GATE:
            v *= gate
    r = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / G + eps)
    if STORE_RSTD:
        tl.store(rstd + row * tl.num_programs(1) + group, r)
    y = v * r
    if HAS_W:
        y *= tl.load(weight + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_Z and NORM_BEFORE_GATE:
        y *= gate
    tl.store(out + row * o_row + cols, y.to(out.dtype.element_ty), mask=m)


@triton.jit
def _norm_bwd_kernel(
    x, residual, z, weight, rstd, dy, dres_out, dx, dres, dz, dw_part,
    M, N, G, ROWS,
    x_row, r_row, z_row, dy_row, dro_row, dx_row, dr_row, dz_row,
    HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, HAS_W: tl.constexpr, HAS_DRES_OUT: tl.constexpr,
    STORE_DRES: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # With u the normed vector (x + residual, gated first when not NORM_BEFORE_GATE), û = u·rstd and
    # gu the gradient at û·w: du = rstd (gu w - û mean(gu w û)); dw = Σ_rows gu û.
    pid = tl.program_id(0)
    group = tl.program_id(1)
    groups = tl.num_programs(1)
    offs = tl.arange(0, BLOCK)
    m = offs < G
    cols = group * G + offs
    if HAS_W:
        dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * ROWS
    for i in range(0, tl.minimum(ROWS, M - pid * ROWS)):
        row = first + i
        v = tl.load(x + row * x_row + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            v += tl.load(residual + row * r_row + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(dy + row * dy_row + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.load(rstd + row * groups + group)
        if HAS_W:  # reloaded per row (a cache hit): registers are the limit here, not bandwidth
            w = tl.load(weight + cols, mask=m, other=0.0).to(tl.float32)
        u = v
        if HAS_Z:
            zv = tl.load(z + row * z_row + cols, mask=m, other=0.0).to(tl.float32)
            sg = tl.sigmoid(zv)
            gate = zv * sg
            dgate = sg * (1.0 + zv * (1.0 - sg))
            if not NORM_BEFORE_GATE:
                u = v * gate
        uhat = u * r
        if HAS_Z and NORM_BEFORE_GATE:  # y = (û w) · silu(z)
            normed = uhat
            if HAS_W:
                normed = uhat * w
            tl.store(dz + row * dz_row + cols, (g * normed * dgate).to(dz.dtype.element_ty), mask=m)
            g = g * gate
        if HAS_W:
            dw += g * uhat
            g = g * w
        du = r * (g - uhat * (tl.sum(g * uhat, axis=0) / G))
        dv = du
        if HAS_Z and not NORM_BEFORE_GATE:  # u = v · silu(z)
            tl.store(dz + row * dz_row + cols, (du * v * dgate).to(dz.dtype.element_ty), mask=m)
            dv = du * gate
        if HAS_DRES_OUT:  # the new residual (v itself) is an output too
            dv += tl.load(dres_out + row * dro_row + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(dx + row * dx_row + cols, dv.to(dx.dtype.element_ty), mask=m)
        if STORE_DRES:
            tl.store(dres + row * dr_row + cols, dv.to(dres.dtype.element_ty), mask=m)
    if HAS_W:
        tl.store(dw_part + pid.to(tl.int64) * N + cols, dw, mask=m)


def _rows(t: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """t as [rows, width] with unit column stride (a copy only when it must)."""
    if t is None:
        return None
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _group_size(width: int, group_size: int | None) -> int:
    size = group_size or width
    if width % size:
        raise ValueError(f"group_size {size} must divide the normalised width {width}")
    if size > MAX_BLOCK:
        raise ValueError(
            f"the Triton norm holds a group in registers: at most {MAX_BLOCK} channels, got {size}"
        )
    return size


def _forward(x2, residual, z, weight, eps, size, res_dtype, norm_before_gate, save_rstd):
    """(y, new residual or None, rstd or None) for rows x2 [M, N]."""
    rows, width = x2.shape
    groups = width // size
    out = torch.empty_like(x2)
    res_out = torch.empty(x2.shape, dtype=res_dtype, device=x2.device) if res_dtype is not None else None
    rstd = torch.empty(rows, groups, dtype=torch.float32, device=x2.device) if save_rstd else None
    block = triton.next_power_of_2(size)
    _norm_fwd_kernel[(rows, groups)](
        x2, residual if residual is not None else x2, z if z is not None else x2,
        weight if weight is not None else x2, out, res_out if res_out is not None else out,
        rstd if rstd is not None else out,
        size, float(eps),
        x2.stride(0), residual.stride(0) if residual is not None else 0, z.stride(0) if z is not None else 0,
        out.stride(0), res_out.stride(0) if res_out is not None else 0,
        HAS_RES=residual is not None, HAS_Z=z is not None, HAS_W=weight is not None,
        STORE_RES=res_out is not None, STORE_RSTD=save_rstd, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK=block, num_warps=_warps(block, "fwd"),
    )  # fmt: skip
    return out, res_out, rstd


def _programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM
    return 4  # the interpreter: few programs, each walking more rows


def _backward(
    x2, residual, z, weight, rstd, dy, dres_out, size, norm_before_gate, x_dtype, res_dtype, dz_out=None
):  # fmt: skip
    """(dx, dresidual or None, dz or None, dweight fp32 or None) for rows x2 [M, N]; dx in x_dtype,
    dresidual in res_dtype (None: not wanted); dz written into `dz_out` when given (rows shaped like z,
    unit column stride)."""
    rows, width = x2.shape
    groups = width // size
    programs = max(1, min(rows, triton.cdiv(_programs_target(x2.device), groups)))
    per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, per_program)
    dx = torch.empty(x2.shape, dtype=x_dtype, device=x2.device)
    dres = torch.empty(x2.shape, dtype=res_dtype, device=x2.device) if res_dtype is not None else None
    dz = (dz_out if dz_out is not None else torch.empty_like(z)) if z is not None else None
    dw_part = (
        torch.empty(programs, width, dtype=torch.float32, device=x2.device) if weight is not None else None
    )
    block = triton.next_power_of_2(size)
    _norm_bwd_kernel[(programs, groups)](
        x2, residual if residual is not None else x2, z if z is not None else x2,
        weight if weight is not None else x2, rstd, dy, dres_out if dres_out is not None else dy,
        dx, dres if dres is not None else dx, dz if dz is not None else dx,
        dw_part if dw_part is not None else dx,
        rows, width, size, per_program,
        x2.stride(0), residual.stride(0) if residual is not None else 0, z.stride(0) if z is not None else 0,
        dy.stride(0), dres_out.stride(0) if dres_out is not None else 0, dx.stride(0),
        dres.stride(0) if dres is not None else 0, dz.stride(0) if dz is not None else 0,
        HAS_RES=residual is not None, HAS_Z=z is not None, HAS_W=weight is not None,
        HAS_DRES_OUT=dres_out is not None, STORE_DRES=dres is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK=block, num_warps=_warps(block, "bwd"),
    )  # fmt: skip
    return dx, dres, dz, dw_part.sum(0) if dw_part is not None else None


class _RMSNorm(torch.autograd.Function):
    """Saves x, the residual and 1/rms; with an fp32 new residual, that instead of x and the residual."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, prenorm, residual_in_fp32):
        shape, width = x.shape, x.shape[-1]
        x2, r2 = _rows(x, width), _rows(residual, width)
        res_dtype = (torch.float32 if residual_in_fp32 else x.dtype) if prenorm else None
        y, res_out, rstd = _forward(x2, r2, None, weight, eps, width, res_dtype, True, True)
        # The norm read v = x + residual in fp32; an fp32 new residual is exactly that, one tensor to keep.
        if res_out is not None and res_out.dtype == torch.float32 and r2 is not None:
            ctx.save_for_backward(res_out, None, weight, rstd)
        else:
            ctx.save_for_backward(x2, r2, weight, rstd)
        ctx.shape, ctx.x_dtype = shape, x.dtype
        ctx.res_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        if not prenorm:
            return y.reshape(shape)
        return y.reshape(shape), res_out.reshape(shape)

    @staticmethod
    def backward(ctx, dy, dres_out=None):
        v, r2, weight, rstd = ctx.saved_tensors
        shape, width = ctx.shape, ctx.shape[-1]
        dy2 = _rows(dy, width) if dy is not None else torch.zeros(v.shape, dtype=ctx.x_dtype, device=v.device)
        want_dres = ctx.needs_input_grad[2]
        dx, dres, _, dw = _backward(
            v, r2, None, weight, rstd, dy2, _rows(dres_out, width), width, True, ctx.x_dtype,
            ctx.res_dtype if want_dres else None,
        )  # fmt: skip
        return (
            dx.reshape(shape),
            dw.to(weight.dtype) if dw is not None else None,
            dres.reshape(shape) if dres is not None else None,
            None,
            None,
            None,
        )


class _GatedRMSNorm(torch.autograd.Function):
    """Saves x, z and 1/rms per (row, group)."""

    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size, norm_before_gate):
        shape, width = x.shape, x.shape[-1]
        x2, z2 = _rows(x, width), _rows(z, width)
        y, _, rstd = _forward(x2, None, z2, weight, eps, group_size, None, norm_before_gate, True)
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.shape, ctx.group_size, ctx.norm_before_gate = shape, group_size, norm_before_gate
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        shape = ctx.shape
        size, before = ctx.group_size, ctx.norm_before_gate
        dy2 = _rows(dy, shape[-1])
        dx, _, dz, dw = _backward(x2, None, z2, weight, rstd, dy2, None, size, before, x2.dtype, None)
        return (
            dx.reshape(shape),
            dw.to(weight.dtype),
            dz.reshape(shape) if dz is not None else None,
            None,
            None,
            None,
        )


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False):
    """Same contract as `mambavl.ops.rms_norm`, differentiable in x, weight and residual (the new
    residual of `prenorm` carries gradient too)."""
    width = x.shape[-1]
    _group_size(width, None)
    if needs_grad(x, weight, residual):
        return _RMSNorm.apply(x, weight, residual, eps, prenorm, residual_in_fp32)
    res_dtype = (torch.float32 if residual_in_fp32 else x.dtype) if prenorm else None
    y, res_out, _ = _forward(
        _rows(x, width), _rows(residual, width), None, weight, eps, width, res_dtype, True, False
    )
    y = y.reshape(x.shape)
    return (y, res_out.reshape(x.shape)) if prenorm else y


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Same contract as `mambavl.ops.rms_norm_gated`, differentiable in x, weight and z."""
    width = x.shape[-1]
    size = _group_size(width, group_size)
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must be shaped like x {tuple(x.shape)}, got {tuple(z.shape)}")
    if needs_grad(x, weight, z):
        return _GatedRMSNorm.apply(x, weight, z, eps, size, norm_before_gate)
    y, _, _ = _forward(
        _rows(x, width), None, _rows(z, width), weight, eps, size, None, norm_before_gate, False
    )
    return y.reshape(x.shape)
