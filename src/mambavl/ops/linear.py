"""The projections' matrix product. For a few rows in 16-bit weights (a decode step) a Triton kernel
that streams the weight at memory speed replaces cuBLAS's matrix-vector path; everything else is
F.linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.dispatch import backend_for, needs_grad


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias). `backend`: see `ops.dispatch`. Under `triton` or `auto` on CUDA, the
    kernel (`ops.triton.gemv`) runs forward-only calls of at most 16 rows with x and weight in one
    16-bit dtype and autocast off; all other calls (prefill, training, fp32) are cuBLAS's, through
    F.linear, under every backend."""
    if backend_for(x, backend) == "triton":
        from mambavl.ops.triton.gemv import MAX_ROWS, skinny_linear

        rows = x.numel() // max(x.shape[-1], 1)
        grad = needs_grad(x, weight, bias)
        fits = (
            0 < rows <= MAX_ROWS
            and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16)
            and (bias is None or bias.dtype == x.dtype)
            and not torch.is_autocast_enabled(x.device.type)
        )
        if fits and not grad:
            return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
