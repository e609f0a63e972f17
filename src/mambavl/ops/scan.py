"""Mamba-1 selective scan and the single-step state update, as pure-PyTorch references.

Signatures follow mamba_ssm (`selective_scan_fn`, `selective_state_update`) so a fused kernel can
replace these functions without any change to the models. Everything is computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.dispatch import backend_for, needs_grad
from mambavl.ops.timestep import NO_LIMIT, timestep

# Time steps processed together (bounds the [B, block, D, N] working set) and the chunk length inside.
SCAN_BLOCK = 2048
SCAN_CHUNK = 16


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None, chunk: int | None = None):
    """All states of h_t = a_t * h_{t-1} + x_t along dim 1, as a chunked parallel scan.

    a, x: [B, L, ...]; h0: [B, ...] or None (zeros). Returns h: [B, L, ...].
    Inside chunks of `chunk` steps, a Hillis-Steele scan (log2(chunk) vectorised steps over all chunks
    at once) gives each chunk's local states and prefix decays; a short recurrence over chunk ends then
    gives every chunk's start state, added back through the prefix decays. All factors are products of
    decays in [0, 1], so nothing overflows (unlike exp(-cumsum) tricks for strong decay).
    Time is the outer dimension so that every shifted slice is one contiguous block.

    The gradient is the same kind of recurrence run backwards in time (`_LinearScan`), not autograd
    through the scan's steps: one reverse scan instead of a graph of log2(chunk) sliced copies.
    """
    chunk = chunk or SCAN_CHUNK
    if needs_grad(a, x, h0):
        return _LinearScan.apply(a, x, h0, chunk)
    return _scan(a, x, h0, chunk)


class _LinearScan(torch.autograd.Function):
    """d loss / d h_t = g_t + a_{t+1} * (d loss / d h_{t+1}) =: G_t, a reverse linear scan; then
    d/dx_t = G_t, d/da_t = G_t * h_{t-1}, d/dh0 = a_0 * G_0."""

    @staticmethod
    def forward(ctx, a, x, h0, chunk):
        h = _scan(a, x, h0, chunk)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        # a_{t+1} for each t (the last step's value is never used: nothing follows it)
        a_next = torch.cat([a[:, 1:], a.new_zeros(a[:, :1].shape)], dim=1)
        G = _scan(a_next.flip(1), grad_h.to(h.dtype).flip(1), None, ctx.chunk).flip(1)
        h_prev = torch.cat(
            [(h0.to(h.dtype) if h0 is not None else torch.zeros_like(h[:, 0]))[:, None], h[:, :-1]], 1
        )
        grad_a = G * h_prev if ctx.needs_input_grad[0] else None
        grad_x = G if ctx.needs_input_grad[1] else None
        grad_h0 = (a[:, 0] * G[:, 0]).to(h0.dtype) if h0 is not None and ctx.needs_input_grad[2] else None
        return grad_a, grad_x, grad_h0, None


def _scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None, chunk: int) -> torch.Tensor:
    if x.device.type == "cpu":
        return _sequential_scan(a, x, h0)
    return _chunked_scan(a, x, h0, chunk)


def _sequential_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """One fused multiply-add per time step, in place into the output: on a CPU, where every step is
    memory-bound anyway, this beats the parallel scan's extra passes over [B, L, ...] many times over."""
    out = torch.empty_like(x)
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0.to(x.dtype)
    for t in range(x.shape[1]):
        h = torch.addcmul(x[:, t], a[:, t], h, out=out[:, t])
    return out


def _chunked_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None, chunk: int) -> torch.Tensor:
    batch, length = x.shape[:2]
    rest = x.shape[2:]
    pad = (-length) % chunk
    if pad:  # identity steps: decay 1, input 0
        a = torch.cat([a, a.new_ones(batch, pad, *rest)], dim=1)
        x = torch.cat([x, x.new_zeros(batch, pad, *rest)], dim=1)
    n_chunks = (length + pad) // chunk
    a = a.reshape(batch, n_chunks, chunk, *rest)
    x = x.reshape(batch, n_chunks, chunk, *rest)
    # Each step writes fresh tensors (clone, then update the shifted part in place): a step reads the
    # previous step's values, which an in-place update of overlapping slices would overwrite.
    k = 1
    while k < chunk:
        new_x = x.clone()
        new_x[:, :, k:].addcmul_(a[:, :, k:], x[:, :, :-k])
        new_a = a.clone()
        new_a[:, :, k:].mul_(a[:, :, :-k])
        x, a = new_x, new_a
        k *= 2
    h = torch.zeros_like(x[:, 0, 0]) if h0 is None else h0.to(x.dtype)
    starts = []
    for c in range(n_chunks):
        starts.append(h)
        h = torch.addcmul(x[:, c, -1], a[:, c, -1], h)
    x = torch.addcmul(x, a, torch.stack(starts, dim=1)[:, :, None])
    return x.reshape(batch, n_chunks * chunk, *rest)[:, :length]


class _SelectiveScanCPU(torch.autograd.Function):
    """The scan and its read-out through C on a CPU, for B and C shared by all channels ([B, L, N]).

    Forward: h_t = exp(Δ_t A)·h_{t-1} + Δ_t u_t B_t, one in-place multiply-add per time step, then
    y_t = C_t·h_t as one batched product. Backward, by hand rather than through autograd's graph of
    per-step slices: the adjoint G_t = C_t dy_t + exp(Δ_{t+1} A)·G_{t+1} is the same recurrence run
    backwards in time (in place, no flipped copies), and every other gradient is one contraction of G:
    d(Δu) = B·G, dB = Σ_d G Δu, and through the decay s = G·h_{t-1}·exp(Δ A): dΔ = Σ_n s A, dA = Σ s Δ.
    States are laid out [B, L, N, D] (channels innermost), which keeps every contraction over N or over
    (B, L) a contiguous reduction — several times faster on a CPU than reducing a short last axis.

    dt, du: [B, L, D] (Δ after bias and softplus, and Δ·u); A: [D, N]; Bt, Ct: [B, L, N]; h0: [B, D, N].
    Returns y [B, L, D] and the last state [B, D, N], all fp32.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # fp32 inside, under autocast too
    def forward(ctx, dt, du, A, Bt, Ct, h0):
        # Channels innermost and contiguous in every operand: strided broadcasts are many times slower.
        # Contractions over N or D are batched matrix products (no [B, L, N, D] temporaries).
        dt, du, Bt, Ct = dt.contiguous(), du.contiguous(), Bt.contiguous(), Ct.contiguous()
        batch, length, dim = dt.shape
        n = A.shape[1]
        At = A.t().contiguous()  # [N, D]
        decay = torch.mul(dt[:, :, None, :], At).exp_()  # [B, L, N, D]
        hs = Bt[..., None] * du[:, :, None, :]  # the drive
        h = h0.transpose(1, 2)
        for t in range(length):  # overwritten in place by the states
            h = hs[:, t].addcmul_(decay[:, t], h)
        y = torch.bmm(Ct.view(-1, 1, n), hs.view(-1, n, dim)).view(batch, length, dim)
        ctx.save_for_backward(dt, du, At, Bt, Ct, h0, hs, decay)
        return y, h.transpose(1, 2).contiguous()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy, dh_last):
        dt, du, At, Bt, Ct, h0, hs, decay = ctx.saved_tensors
        batch, length, n, dim = hs.shape
        dy, dh_last = dy.float().contiguous(), dh_last.float()
        # d loss / d h_t from the read-out, then the adjoint (in place, backwards in time)
        G = Ct[..., None] * dy[:, :, None, :]
        G[:, -1] += dh_last.transpose(1, 2)
        for t in range(length - 2, -1, -1):
            G[:, t].addcmul_(decay[:, t + 1], G[:, t + 1])
        flat = (-1, n, dim)
        d_ct = torch.bmm(hs.view(flat), dy.view(-1, dim, 1)).view(batch, length, n)
        d_du = torch.bmm(Bt.view(-1, 1, n), G.view(flat)).view(batch, length, dim)
        d_bt = torch.bmm(G.view(flat), du.view(-1, dim, 1)).view(batch, length, n)
        s = G.mul_(decay)  # G is not needed past this point: G·exp(ΔA), then times h_{t-1}
        d_h0 = s[:, 0].transpose(1, 2).clone()
        s[:, 1:].mul_(hs[:, :-1])
        s[:, 0].mul_(h0.transpose(1, 2))
        d_dt = torch.zeros_like(dt)
        for k in range(n):  # Σ_n s·A, without a [B, L, N, D] temporary
            d_dt.addcmul_(s[:, :, k], At[k])
        d_a = s.mul_(dt[:, :, None, :]).sum((0, 1)).t()
        return d_dt, d_du, d_a, d_bt, d_ct, d_h0


def _per_channel(M: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as [B, L, D or 1, N] from mamba_ssm's accepted layouts ([D, N], [B, N, L], [B, G, N, L])."""
    if M.dim() == 2:  # input-independent: [D, N]
        return M[None, None]
    if M.dim() == 3:  # [B, N, L]
        return M.transpose(1, 2)[:, :, None]
    groups = M.shape[1]
    if dim % groups:
        raise ValueError(f"selective_scan: {groups} groups do not divide {dim} channels")
    return M.repeat_interleave(dim // groups, dim=1).permute(0, 3, 1, 2)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    backend: str | None = None,
):
    """y_t = C_t·h_t + D·u_t, h_t = exp(Δ_t A)·h_{t-1} + Δ_t B_t u_t; optionally gated by silu(z).

    u, delta, z: [B, D, L]; A: [D, N]; B, C: [B, N, L] (or [B, G, N, L], or [D, N]); D, delta_bias: [D].
    `initial_state` [B, D, N] continues a sequence (an extension of mamba_ssm's signature, which always
    starts from zeros). Returns y [B, D, L] in u's dtype, and with `return_last_state` the fp32 state.
    `backend`: see `ops.dispatch`. The Triton kernel (`ops.triton.scan`, forward and backward: every input
    and the last state are differentiable) takes input-dependent B and C; under `auto` calls with B and C
    of shape [D, N] run this reference, and an explicit `triton` refuses them.
    """
    if backend_for(u, backend) == "triton":
        if B.dim() >= 3 and C.dim() >= 3:  # forward and backward fused (an autograd Function)
            from mambavl.ops.triton.scan import selective_scan as fused

            return fused(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
            )
        import os

        if (backend or os.environ.get("MAMBAVL_BACKEND", "auto")) == "triton":  # asked for: never fall back
            raise NotImplementedError(
                "the Triton selective_scan needs input-dependent B and C ([B, N, L] or [B, G, N, L]), got "
                f"B {tuple(B.shape)} and C {tuple(C.shape)}: use backend='torch'"
            )
    dtype = u.dtype
    batch, dim, length = u.shape
    u = u.float()
    delta = timestep(delta, None if delta_bias is None else delta_bias[:, None], delta_softplus)
    A = A.float()
    Bt = _per_channel(B.float(), dim)  # [B, L, D|1, N]
    Ct = _per_channel(C.float(), dim)
    dt = delta.transpose(1, 2)[..., None]  # [B, L, D, 1]
    du = (delta * u).transpose(1, 2)[..., None]
    h = (
        initial_state.float()
        if initial_state is not None
        else u.new_zeros(batch, dim, A.shape[-1], dtype=torch.float32)
    )
    ys = []
    fused_cpu = u.device.type == "cpu" and B.dim() == 3 and C.dim() == 3
    for t0 in range(0, length, SCAN_BLOCK):
        sl = slice(t0, min(t0 + SCAN_BLOCK, length))
        if fused_cpu:  # B, C [B, N, L]: one autograd node with a hand-written backward
            y_block, h = _SelectiveScanCPU.apply(
                dt[:, sl, :, 0], du[:, sl, :, 0], A, Bt[:, sl, 0], Ct[:, sl, 0], h
            )
            ys.append(y_block)
            continue
        hs = linear_scan(torch.exp(dt[:, sl] * A), du[:, sl] * Bt[:, sl], h)  # [B, l, D, N]
        ys.append((hs * Ct[:, sl]).sum(-1))
        h = hs[:, -1]
    y = torch.cat(ys, dim=1).transpose(1, 2) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h) if return_last_state else y


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
    backend: str | None = None,
) -> torch.Tensor:
    """One recurrent step, updating `state` in place (mamba_ssm's `selective_state_update`).

    Mamba-1 layout: state [B, D, N], x/dt/z [B, D], A [D, N], B/C [B, N], D/dt_bias [D].
    Mamba-2 layout: state [B, H, P, N], x/dt/z [B, H, P], A [H, P, N], B/C [B, G, N], D/dt_bias [H, P].
    Returns y shaped like x, in x's dtype. `dt_limit` clamps dt after softplus (Mamba-2's time_step_limit).
    `backend`: "torch" (this reference), "triton" (`ops.triton.state_update`) or "auto" (see `ops.dispatch`).
    """
    if backend_for(state, backend) == "triton":
        from mambavl.ops.triton.state_update import selective_state_update as fused

        return fused(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    heads = state.dim() == 4
    if not heads:
        state_v, x, dt, A = state[:, None], x[:, None], dt[:, None], A[None]
        B, C = B[:, None], C[:, None]
        z = z[:, None] if z is not None else None
        D = D[None] if D is not None else None
        dt_bias = dt_bias[None] if dt_bias is not None else None
    else:
        state_v = state
    dtype = x.dtype
    nheads, groups = state_v.shape[1], B.shape[1]
    dt = timestep(dt, dt_bias, dt_softplus, dt_limit)
    B = B.float().repeat_interleave(nheads // groups, dim=1)  # [B, H, N]
    C = C.float().repeat_interleave(nheads // groups, dim=1)
    xf = x.float()
    dA = torch.exp(dt[..., None] * A.float())  # [B, H, P, N]
    new = state_v.float() * dA + (dt * xf)[..., None] * B[:, :, None, :]
    state_v.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, C)
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return y if heads else y[:, 0]
