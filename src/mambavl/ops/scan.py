"""Mamba-1 selective scan and the single-step state update, as pure-PyTorch references.

Signatures follow mamba_ssm (`selective_scan_fn`, `selective_state_update`) so a fused kernel can
replace these functions without any change to the models. Everything is computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Time steps processed together by one parallel scan; bounds the [B, D, block, N] working set.
SCAN_BLOCK = 256


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of h_t = a_t * h_{t-1} + x_t along dim 2, by a Hillis-Steele parallel scan.

    a, x: [B, D, L, N]; h0: [B, D, N] or None (zeros). Returns h: [B, D, L, N].
    log2(L) vectorised steps; every factor is a product of decays in [0, 1], so nothing can overflow
    (unlike the cumsum/exp(-cumsum) trick, which does for long chunks with large |dt·A|).
    """
    if h0 is not None:
        x = torch.cat([torch.addcmul(x[:, :, :1], a[:, :, :1], h0[:, :, None]), x[:, :, 1:]], dim=2)
    length = x.shape[2]
    k = 1
    while k < length:
        x = torch.cat([x[:, :, :k], torch.addcmul(x[:, :, k:], a[:, :, k:], x[:, :, :-k])], dim=2)
        if 2 * k < length:
            a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], dim=2)
        k *= 2
    return x


def _per_channel(M: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as [B, D or 1, L, N] from mamba_ssm's accepted layouts ([D, N], [B, N, L], [B, G, N, L])."""
    if M.dim() == 2:  # input-independent: [D, N]
        return M[None, :, None, :]
    if M.dim() == 3:  # [B, N, L]
        return M.transpose(1, 2)[:, None]
    groups = M.shape[1]
    if dim % groups:
        raise ValueError(f"selective_scan: {groups} groups do not divide {dim} channels")
    return M.repeat_interleave(dim // groups, dim=1).transpose(2, 3)


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
):
    """y_t = C_t·h_t + D·u_t, h_t = exp(Δ_t A)·h_{t-1} + Δ_t B_t u_t; optionally gated by silu(z).

    u, delta, z: [B, D, L]; A: [D, N]; B, C: [B, N, L] (or [B, G, N, L], or [D, N]); D, delta_bias: [D].
    `initial_state` [B, D, N] continues a sequence (an extension of mamba_ssm's signature, which always
    starts from zeros). Returns y [B, D, L] in u's dtype, and with `return_last_state` the fp32 state.
    """
    dtype = u.dtype
    batch, dim, length = u.shape
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.float()
    Bc = _per_channel(B.float(), dim)
    Cc = _per_channel(C.float(), dim)
    h = (
        initial_state.float()
        if initial_state is not None
        else u.new_zeros(batch, dim, A.shape[-1], dtype=torch.float32)
    )
    ys = []
    for t0 in range(0, length, SCAN_BLOCK):
        sl = slice(t0, min(t0 + SCAN_BLOCK, length))
        d_blk = delta[:, :, sl, None]
        a = torch.exp(d_blk * A[:, None, :])
        x = (d_blk * u[:, :, sl, None]) * Bc[:, :, sl]
        hs = linear_scan(a, x, h)
        ys.append((hs * Cc[:, :, sl]).sum(-1))
        h = hs[:, :, -1]
    y = torch.cat(ys, dim=2) if ys else u.new_zeros(batch, dim, 0)
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
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """One recurrent step, updating `state` in place (mamba_ssm's `selective_state_update`).

    Mamba-1 layout: state [B, D, N], x/dt/z [B, D], A [D, N], B/C [B, N], D/dt_bias [D].
    Mamba-2 layout: state [B, H, P, N], x/dt/z [B, H, P], A [H, P, N], B/C [B, G, N], D/dt_bias [H, P].
    Returns y shaped like x, in x's dtype. `dt_limit` clamps dt after softplus (Mamba-2's time_step_limit).
    """
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
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
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
