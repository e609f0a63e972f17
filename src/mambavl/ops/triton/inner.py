"""The Mamba-1 mixer for training, as autograd nodes.

`mamba1_inner`: the conv, the two small projections and the scan run forward as the composed ops do; the
node keeps x and z (views of in_proj's output, kept for in_proj's backward anyway), x_proj's output
[B, L, R + 2N] and the scan's chunk states, and the backward recomputes the conv's output and Δ before the
scan's backward. Projections run under the caller's autocast, as F.linear would, so the forward equals the
composed ops exactly.

`mamba1_mixer`: the same with in_proj and out_proj taken in (mamba_ssm's `mamba_inner_fn` and its in_proj).
Every [B, D, L] tensor between the two projections is channel-major and time-contiguous ([D, B, L'] in
memory): in_proj runs as W·hᵀ, Δ as W_dt·dtᵀ, out_proj and every weight gradient read the [D, B·L'] matrix
as it is, and the gradients of x and z are written into one [2D, B·L'] buffer, in_proj's. L' is L rounded up
to 16 (rows then start on 16-element boundaries, which the scan's tiles want): the padded steps come after
each row's end, take zero inputs, and their outputs are dropped, so they change nothing before them; their
gradients are zero. Its backward keeps h (padded), in_proj's output, x_proj's small output, the scan's
output before out_proj and the chunk states, and recomputes the conv's output and Δ.

`mamba2_inner`: the Mamba-2 mixer from in_proj's output to out_proj's (mamba_ssm's
`mamba_split_conv1d_scan_combined`): conv → SSD → gated RMSNorm → out_proj. It keeps in_proj's output, the
norm's 1/rms and what the SSD backward reads besides its inputs (Δ, its running sum, C·Bᵀ and the chunk start
states); the backward recomputes the conv's output, the scan's output and the norm's, and writes the
gradients of z, xBC and dt into one buffer shaped like in_proj's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.triton import conv, norms, scan, ssd


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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections run in: autocast's where it is on, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _delta_bc(x_dbl, dt_proj_weight, dt_rank, d_state, batch, padded):
    """Δ before its bias [B, D, L'] channel-major (W_dt·dtᵀ), and B, C [B, N, L'] time-contiguous, from
    x_proj's output [B·L', R + 2N]."""
    dim = dt_proj_weight.shape[0]
    delta = (dt_proj_weight.to(x_dbl.dtype) @ x_dbl[:, :dt_rank].t()).view(dim, batch, padded).transpose(0, 1)
    B, C = (
        x_dbl[:, start : start + d_state].reshape(batch, padded, d_state).transpose(1, 2)
        for start in (dt_rank, dt_rank + d_state)
    )
    B, C, _, _ = scan.kernel_inputs(B, C, None, None)
    return delta, B, C


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """[D, B·L'] view of a channel-major [B, D, L'] tensor."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _weight_grad(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a @ b, a weight's gradient, in the weight's dtype: for fp32 master weights and half-precision
    factors on the GPU the GEMM writes fp32 itself (no half-precision result cast up afterwards)."""
    if a.is_cuda and weight.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(weight.dtype)


def _padded_rows(t: torch.Tensor, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, W] t as [B·L', W] rows in `dtype`, zeros after each row's L positions: t itself where it is
    so already (a row length of a multiple of 16, the dtype, contiguous), else a copy."""
    batch, length, width = t.shape
    if length == padded and t.dtype == dtype and t.is_contiguous():
        return t.view(batch * padded, width)
    out = torch.empty(batch, padded, width, device=t.device, dtype=dtype)
    out[:, length:].zero_()
    out[:, :length].copy_(t)
    return out.view(batch * padded, width)


class _Mamba1Mixer(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx, hidden, in_w, in_b, conv_w, conv_b, x_w, dt_w, dt_bias, A, D, out_w, out_b, dt_rank, d_state
    ):
        dtype = _compute_dtype(hidden)
        batch, length, width = hidden.shape
        dim = conv_w.shape[0]
        padded = -(-length // 16) * 16
        tiles = scan.DEFAULT_TILES
        h = _padded_rows(hidden, padded, dtype)  # [B·L', width], zeros past each row's end
        xz = in_w.to(dtype) @ h.t()  # [2D, B·L']
        if in_b is not None:
            xz += in_b.to(dtype)[:, None]
        xz3 = xz.view(2 * dim, batch, padded).transpose(0, 1)
        x, z = xz3[:, :dim], xz3[:, dim:]
        xc = conv._conv_forward(x, conv_w, conv_b, None, "silu")
        x_dbl = _matrix(xc).t() @ x_w.to(dtype).t()  # [B·L', R + 2N]
        delta, B, C = _delta_bc(x_dbl, dt_w, dt_rank, d_state, batch, padded)
        _, _, D_k, bias_k = scan.kernel_inputs(B, C, D, dt_bias)
        y, _, states = scan._forward(xc, delta, A, B, C, D_k, z, bias_k, True, None, tiles, save_states=True)
        y = _matrix(y)  # [D, B·L']
        out = y.t() @ out_w.to(dtype).t()
        if out_b is not None:
            out += out_b.to(dtype)
        ctx.save_for_backward(h, xz, conv_w, conv_b, x_w, dt_w, dt_bias, A, D, x_dbl, states, y, in_w, out_w)
        ctx.sizes = (dt_rank, d_state, batch, length, padded, dim)
        ctx.tiles, ctx.dtype, ctx.hidden_dtype = tiles, dtype, hidden.dtype
        ctx.biases = (in_b is not None, out_b is not None)
        return out.view(batch, padded, width)[:, :length]

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        h, xz, conv_w, conv_b, x_w, dt_w, dt_bias, A, D, x_dbl, states, y, in_w, out_w = ctx.saved_tensors
        dt_rank, d_state, batch, length, padded, dim = ctx.sizes
        dtype, width = ctx.dtype, h.shape[1]
        d_out = _padded_rows(dout, padded, dtype)
        d_out_w = _weight_grad(d_out.t(), y.t(), out_w)
        d_out_b = d_out.sum(0) if ctx.biases[1] else None
        dy = (out_w.to(dtype).t() @ d_out.t()).view(dim, batch, padded).transpose(0, 1)
        xz3 = xz.view(2 * dim, batch, padded).transpose(0, 1)
        x, z = xz3[:, :dim], xz3[:, dim:]
        xc = conv._conv_forward(x, conv_w, conv_b, None, "silu")
        delta, B, C = _delta_bc(x_dbl, dt_w, dt_rank, d_state, batch, padded)
        d_xz = torch.empty_like(xz)  # [2D, B·L']: dx then dz, in_proj's output gradient
        d_xz3 = d_xz.view(2 * dim, batch, padded).transpose(0, 1)
        g = scan._backward(
            xc, delta, A, B, C, D, z, dt_bias, states, True, ctx.tiles, dy, None, dz_out=d_xz3[:, dim:]
        )
        d_delta = _matrix(g["delta"])  # [D, B·L']
        d_dt = d_delta.t() @ dt_w.to(dtype)  # [B·L', R]
        d_dt_w = _weight_grad(d_delta, x_dbl[:, :dt_rank], dt_w)
        dB, dC = (g[k].transpose(1, 2).reshape(batch * padded, d_state).to(dtype) for k in ("B", "C"))
        d_x_dbl = torch.cat((d_dt, dB, dC), -1)  # [B·L', R + 2N]
        xc = _matrix(xc)
        d_x_w = _weight_grad(d_x_dbl.t(), xc.t(), x_w)
        d_xc = _matrix(g["u"]).addmm_(x_w.to(dtype).t(), d_x_dbl.t())  # through x_proj too
        d_xc = d_xc.view(dim, batch, padded).transpose(0, 1)
        _, _, d_conv_w, d_conv_b = conv._conv_backward(
            x, conv_w, conv_b, None, "silu", d_xc, None, False, dx_out=d_xz3[:, :dim]
        )
        d_in_w = _weight_grad(d_xz, h, in_w)
        d_in_b = d_xz.sum(1) if ctx.biases[0] else None
        dh = (d_xz.t() @ in_w.to(dtype)).view(batch, padded, width)[:, :length].to(ctx.hidden_dtype)
        return (
            dh, d_in_w, d_in_b, d_conv_w, d_conv_b, d_x_w, d_dt_w,
            g["delta_bias"], g["A"], g["D"], d_out_w, d_out_b, None, None,
        )  # fmt: skip


def mamba1_mixer(
    hidden, in_w, in_b, conv_w, conv_b, x_w, dt_w, dt_bias, A, D, out_w, out_b, dt_rank, d_state
):  # fmt: skip
    """`ops.mamba1_mixer`, differentiable in every tensor input."""
    return _Mamba1Mixer.apply(
        hidden, in_w, in_b, conv_w, conv_b, x_w, dt_w, dt_bias, A, D, out_w, out_b, dt_rank, d_state
    )


class _Mamba2Inner(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, out_b, sizes, norm_opts, dt_limit):
        dtype = _compute_dtype(zxbcdt)
        zxbcdt = zxbcdt.to(dtype)
        parts = _Mamba2Parts(zxbcdt, conv_w, conv_b, out_w.shape[1], sizes)
        y, _, extra = ssd._forward(
            parts.plan, parts.x, parts.dt, A, parts.B, parts.C, parts.D(D), None, dt_bias, True, None,
            dt_limit,
        )  # fmt: skip
        eps, group, before = norm_opts
        y = y.view(-1, parts.dim)
        yn, _, rstd = norms._forward(y, None, parts.z, norm_w, eps, group, None, before, True)
        out = yn @ out_w.to(dtype).t()
        if out_b is not None:
            out += out_b.to(dtype)
        ctx.save_for_backward(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, rstd, *extra)
        ctx.opts = (sizes, norm_opts, dt_limit, out_b is not None)
        return out.view(*zxbcdt.shape[:2], -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, rstd, dt_out, acum, cb, starts = (
            ctx.saved_tensors
        )
        sizes, (eps, group, before), dt_limit, has_out_b = ctx.opts
        dtype, dim = zxbcdt.dtype, out_w.shape[1]
        parts = _Mamba2Parts(zxbcdt, conv_w, conv_b, dim, sizes)
        Dk = parts.D(D)
        y = torch.empty(parts.x.shape, dtype=dtype, device=zxbcdt.device)  # the scan's output, recomputed
        ssd._scan(parts.plan, cb, parts.x, None, parts.C, starts, dt_out, acum, Dk, y)
        y = y.view(-1, dim)
        yn, _, _ = norms._forward(y, None, parts.z, norm_w, eps, group, None, before, False)
        d_out = dout.reshape(-1, dout.shape[-1]).to(dtype)
        d_out_w = _weight_grad(d_out.t(), yn, out_w)
        d_out_b = d_out.sum(0) if has_out_b else None
        d_zxbcdt = torch.empty_like(zxbcdt)
        d_rows = d_zxbcdt.view(-1, zxbcdt.shape[-1])
        dy, _, _, d_norm_w = norms._backward(
            y, None, parts.z, norm_w, rstd, d_out @ out_w.to(dtype), None, group, before, dtype, None,
            dz_out=d_rows[:, :dim],
        )  # fmt: skip
        saved = (parts.x, parts.dt, A, parts.B, parts.C, Dk, None, dt_bias, None, dt_out, acum, cb, starts)
        dx, ddt, dA, dB, dC, dD, _, d_dt_bias, _ = ssd._backward(
            parts.plan, saved, True, dt_limit, dy.view(parts.x.shape), None
        )
        gn = parts.B.shape[2] * parts.B.shape[3]
        d_xbc = torch.cat((dx.flatten(2), dB.flatten(2), dC.flatten(2)), -1)  # [B, L, D + 2GN]
        _, _, d_conv_w, d_conv_b = conv._conv_backward(
            parts.xbc, conv_w, conv_b, None, "silu", d_xbc.transpose(1, 2), None, False,
            dx_out=d_zxbcdt[..., dim : 2 * dim + 2 * gn].transpose(1, 2),
        )  # fmt: skip
        d_zxbcdt[..., 2 * dim + 2 * gn :].copy_(ddt)
        return (
            d_zxbcdt, d_conv_w, d_conv_b, d_dt_bias, dA, dD.reshape(D.shape), d_norm_w, d_out_w, d_out_b,
            None, None, None,
        )  # fmt: skip


class _Mamba2Parts:
    """The views of in_proj's output that the Mamba-2 node reads, and the conv's output (recomputed)."""

    def __init__(self, zxbcdt, conv_w, conv_b, dim, sizes):
        headdim, ngroups, d_state, chunk_size = sizes
        batch, length, _ = zxbcdt.shape
        gn, heads = ngroups * d_state, dim // headdim
        self.dim, self.heads, self.headdim = dim, heads, headdim
        z, xbc, self.dt = zxbcdt.split([dim, dim + 2 * gn, heads], dim=-1)
        self.z = z.reshape(-1, dim)  # rows of in_proj's output: a view
        self.xbc = xbc.transpose(1, 2)  # [B, D + 2GN, L], channel-contiguous
        xc = conv._conv_forward(self.xbc, conv_w, conv_b, None, "silu").transpose(1, 2)
        x, B, C = xc.split([dim, gn, gn], dim=-1)
        self.x = x.view(batch, length, heads, headdim)
        self.B = B.view(batch, length, ngroups, d_state)
        self.C = C.view(batch, length, ngroups, d_state)
        self.plan = ssd._Plan(self.x, self.B, self.C, chunk_size)

    def D(self, D):
        """D as the scan takes it: [H, P] when it is per channel, else [H]."""
        return D.view(self.heads, self.headdim) if D.numel() == self.dim else D


def mamba2_inner(
    zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, out_b, headdim, ngroups, d_state, chunk_size,
    norm_eps, norm_group_size, norm_before_gate, dt_limit,
):  # fmt: skip
    """`ops.mamba2_inner`, differentiable in every tensor input."""
    return _Mamba2Inner.apply(
        zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, out_b, (headdim, ngroups, d_state, chunk_size),
        (norm_eps, norm_group_size, norm_before_gate), tuple(dt_limit),
    )  # fmt: skip
