"""Mamba-2 state-space duality (SSD): the chunked scan as a pure-PyTorch reference.

Signature of mamba_ssm's `mamba_chunk_scan_combined`. Inside a chunk the scan is a masked
(attention-like) matmul; across chunks a small recurrence over chunk states. Computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.dispatch import backend_for
from mambavl.ops.timestep import NO_LIMIT, timestep


def segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[i, j] = x[j+1] + ... + x[i] for j <= i, else -inf.

    Summed with a masked cumsum rather than cumsum differences, which lose precision when the
    cumulative decay grows large.
    """
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)  # x[..., i, j] = x_i
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    out = torch.cumsum(x.masked_fill(~strict, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return out.masked_fill(~lower, float("-inf"))


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
    backend: str | None = None,
):
    """x: [B, L, H, P]; dt: [B, L, H]; A: [H]; B, C: [B, L, G, N]; D: [H] or [H, P]; z like x;
    dt_bias: [H]; initial_states: [B, H, P, N]. Returns y like x (and the fp32 final state).

    `backend`: "torch" (this reference), "triton" (`ops.triton.ssd`, with its own backward: gradients for
    every tensor input and through the final state) or "auto" (see `ops.dispatch`).
    """
    if backend_for(x, backend) == "triton":
        from mambavl.ops.triton.ssd import mamba_chunk_scan_combined as fused

        args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus)
        return fused(*args, initial_states, return_final_states, dt_limit)
    dtype = x.dtype
    batch, length, nheads, headdim = x.shape
    groups = B.shape[2]
    if nheads % groups:
        raise ValueError(f"mamba_chunk_scan_combined: {groups} groups do not divide {nheads} heads")
    dt = timestep(dt, dt_bias, dt_softplus, dt_limit)
    xf = x.float()
    Bh = B.float().repeat_interleave(nheads // groups, dim=2)
    Ch = C.float().repeat_interleave(nheads // groups, dim=2)

    # Zero padding to whole chunks is exact: dt = 0 means decay 1 and no input, so the state at the
    # end of the padding is the state after the last real token.
    pad = (-length) % chunk_size
    n_chunks = (length + pad) // chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, n_chunks, chunk_size, *t.shape[2:])

    xdt = chunks(xf * dt[..., None])  # [b, c, l, h, p]
    Bc, Cc = chunks(Bh), chunks(Ch)  # [b, c, l, h, n]
    Adt = chunks(dt * A.float()).permute(0, 3, 1, 2)  # [b, h, c, l]
    A_cum = torch.cumsum(Adt, dim=-1)

    # 1. within each chunk: y = (C Bᵀ ∘ decay) x
    decay = torch.exp(segsum(Adt))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. each chunk's contribution to the state at its end
    to_end = torch.exp(A_cum[..., -1:] - A_cum)  # [b, h, c, l]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xdt)

    # 3. recurrence over chunks: state at the start of every chunk, and the final state
    h0 = (
        initial_states.float()
        if initial_states is not None
        else xf.new_zeros(batch, nheads, headdim, Bh.shape[-1])
    )
    states = torch.cat([h0[:, None], states], dim=1)  # [b, c+1, h, p, n]
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    starts, final = states[:, :-1], states[:, -1]

    # 4. contribution of each chunk's start state to its outputs
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, starts, torch.exp(A_cum))
    y = y.reshape(batch, n_chunks * chunk_size, nheads, headdim)[:, :length]
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, final) if return_final_states else y
