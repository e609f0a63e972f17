"""The [B, D, L] layouts the sequence kernels meet: a transposed view of a channel-contiguous [B, L, D]
projection (as the mixers hand x, Δ and z over), or time-contiguous. Outputs and gradients take their
input's layout, so that writes stay coalesced and nothing downstream needs a transposing copy."""

from __future__ import annotations

import torch


def channels_last(x: torch.Tensor) -> bool:
    """Whether [B, D, L] x is channel-contiguous."""
    return x.stride(1) == 1 and x.shape[2] > 1


def empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty [B, D, L] tensor laid out as x is: channel-contiguous, or time-contiguous."""
    batch, dim, length = x.shape
    dtype = dtype or x.dtype
    if channels_last(x):
        return torch.empty(batch, length, dim, device=x.device, dtype=dtype).transpose(1, 2)
    return torch.empty(batch, dim, length, device=x.device, dtype=dtype)
