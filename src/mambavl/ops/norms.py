"""RMSNorm with an optional fused residual add, and the gated, grouped RMSNorm of Mamba-2.

Semantics of mamba_ssm's `rms_norm_fn` and `layernorm_gated.rmsnorm_fn`: statistics in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.dispatch import backend_for, needs_grad


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str | None = None,
):
    """RMSNorm(x + residual) · weight, in x's dtype. `weight=None` is the weight-free norm.

    With `prenorm=True` also returns the new residual (x + residual), kept in fp32 when
    `residual_in_fp32` — the residual stream of a pre-norm block. `backend`: see `ops.dispatch`; the
    Triton kernel is forward-only, so calls that need a gradient run the reference under `auto`.
    """
    if backend_for(x, backend) == "triton" and x.shape[-1] <= 65536:
        grad = needs_grad(x, weight, residual)
        if not grad:
            from mambavl.ops.triton.norms import rms_norm as fused

            return fused(x, weight, eps, residual, prenorm, residual_in_fp32)
        if backend == "triton":
            raise NotImplementedError("the Triton rms_norm has no backward yet: use backend='torch' to train")
    dtype = x.dtype
    xf = x.float()
    if residual is not None:
        xf = xf + residual.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(dtype)
    if not prenorm:
        return y
    return y, (xf if residual_in_fp32 else xf.to(dtype))


def rms_norm_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """RMSNorm over groups of `group_size` channels, gated by silu(z) before or after the norm."""
    dtype = x.dtype
    xf = x.float()
    gate = F.silu(z.float()) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    size = group_size or xf.shape[-1]
    g = xf.unflatten(-1, (-1, size))
    y = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(dtype)
