"""RMSNorm with an optional fused residual add, and the gated, grouped RMSNorm of Mamba-2.

Semantics of mamba_ssm's `rms_norm_fn` and `layernorm_gated.rmsnorm_fn`: statistics in fp32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mambavl.ops.dispatch import backend_for


def _use_triton(x: torch.Tensor, backend: str | None, group: int) -> bool:
    """The Triton kernels hold a group of channels in registers: under `auto`, wider groups run the
    reference; asked for by name, the kernel refuses them loudly."""
    if backend_for(x, backend) != "triton":
        return False
    from mambavl.ops.triton.norms import MAX_BLOCK

    return group <= MAX_BLOCK or (backend or os.environ.get("MAMBAVL_BACKEND", "auto")) == "triton"


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
    Triton kernels have a backward (gradients for x, residual and weight, the new residual's included).
    """
    if _use_triton(x, backend, x.shape[-1]):
        from mambavl.ops.triton.norms import rms_norm as fused

        return fused(x, weight, eps, residual, prenorm, residual_in_fp32)
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
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm over groups of `group_size` channels, gated by silu(z) before or after the norm.

    `backend`: see `ops.dispatch`; the Triton kernels have a backward (x, weight and z)."""
    if _use_triton(x, backend, group_size or x.shape[-1]):
        from mambavl.ops.triton.norms import rms_norm_gated as fused

        return fused(x, weight, z, eps, group_size, norm_before_gate)
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
